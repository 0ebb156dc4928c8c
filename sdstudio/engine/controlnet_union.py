"""ControlNet++ union models (xinsir's ``controlnet-union-sdxl-1.0``, its "promax"): one ControlNet for many kinds
of control map, told which kind by the unit's ``union_control_type``, computed as sd-webui-controlnet does.

The types and their indices are the extension's (:data:`~sdstudio.core.controlnet.UNION_TYPES`): OpenPose 0,
Depth 1, Soft Edge 2, Hard Edge 3 (canny, lineart, MLSD), Normal Map 4, Segmentation 5, Tile 6, Inpaint 7;
"Unknown" (the default) names none.

:func:`union_forward` runs diffusers' :class:`ControlNetUnionModel` modules in the extension's order:

- the time embedding gets the control-type embedding: the one-hot type vector (all zeros for Unknown) through
  sinusoidal features (``control_type_proj``) and ``control_add_embedding``; SDXL's size conditioning as usual;
- with a type, the hint's features ``c = controlnet_cond_embedding(hint)`` are pooled, the type's
  ``task_embedding`` added, the one-token sequence goes through the transformer layers, and
  ``c + spatial_ch_projs(token)`` is added to ``conv_in(x)``; with Unknown, ``c`` alone is added (a plain
  ControlNet's hint);
- then the down blocks, the middle block and the zero convolutions, as for a ControlNet.

diffusers' own forward appends the latent's pooled features as a second token and fuses nothing without a
type; with a type and one hint per call its result is the same (its attention runs across the batch rows,
which share the hint), which the tests check.
"""

from __future__ import annotations

import torch

from ..core.controlnet import UNION_TYPES, UNION_UNKNOWN, ControlNetError


def type_index(name: str) -> int | None:
    """The model's index of a type from :data:`~sdstudio.core.controlnet.UNION_TYPES`; None for "Unknown"."""
    return None if name == UNION_UNKNOWN else UNION_TYPES.index(name)


def control_type_embedding(module, index: int | None, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, time embedding width): the one-hot type vector's embedding (zeros vector for Unknown)."""
    count = module.config.num_control_type
    one_hot = torch.zeros(count, device=module.device)
    if index is not None:
        if index >= count:
            raise ControlNetError(f"this union model knows {count} control types; {UNION_TYPES[index]} is number "
                                  f"{index} (the promax model has all {len(UNION_TYPES)})")
        one_hot[index] = 1.0
    features = module.control_type_proj(one_hot).reshape(1, -1).to(dtype)
    return module.control_add_embedding(features).expand(rows, -1)


def _guided(module, sample: torch.Tensor, hint: torch.Tensor, index: int | None) -> torch.Tensor:
    condition = module.controlnet_cond_embedding(hint)
    if index is None:
        return sample + condition
    token = (condition.mean(dim=(2, 3)) + module.task_embedding[index])[:, None]
    for layer in module.transformer_layes:
        token = layer(token)
    return sample + condition + module.spatial_ch_projs(token[:, 0])[:, :, None, None]


def union_forward(module, x: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  hint: torch.Tensor, index: int | None, added_cond_kwargs: dict | None = None
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The union model's residuals (down list, mid) for one unit of control type ``index`` (None: Unknown)."""
    rows = x.shape[0]
    t = timestep if timestep.ndim else timestep[None]
    t_emb = module.time_proj(t.to(x.device).expand(rows)).to(x.dtype)
    emb = module.time_embedding(t_emb)
    if module.config.addition_embed_type == "text_time":
        text = added_cond_kwargs["text_embeds"]
        sizes = module.add_time_proj(added_cond_kwargs["time_ids"].flatten()).reshape(text.shape[0], -1)
        emb = emb + module.add_embedding(torch.cat([text, sizes], dim=-1).to(emb.dtype))
    emb = emb + control_type_embedding(module, index, rows, emb.dtype)
    sample = _guided(module, module.conv_in(x), hint, index)
    residuals = [sample]
    for block in module.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        residuals += list(res)
    if module.mid_block is not None:
        sample = module.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
    down = [zero(r) for r, zero in zip(residuals, module.controlnet_down_blocks)]
    mid = module.controlnet_mid_block(sample)
    if module.config.global_pool_conditions:
        down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
        mid = mid.mean(dim=(2, 3), keepdim=True)
    return down, mid
