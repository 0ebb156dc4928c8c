"""DeepCache-style feature reuse (Ma, Fang & Wang 2023): between two sampling steps the UNet's deep features
change little, so most calls can reuse the last full call's and run only the shallow outer level.

A *full* call runs the whole UNet and keeps what enters its last up block (the deep path's result: the
middle block and every level below the first, upsampled back to the full resolution). A *shallow* call
runs the time embedding, ``conv_in``, the first down block (whose outputs are the last up block's skip
connections), the last up block on the kept features, and the output convolution: the levels below the
first are skipped. With interval N, denoiser call k (Heun's two calls a step count twice, as for NGMS) is
full when ``k % N == 0`` and shallow otherwise; N = 0 or 1 is off.

What a shallow call reuses must come from the same kind of call: kept features are looked up by the UNet,
the call's place within its denoiser call (prompt and negative prompt batches, one image after the other on
the CPU) and its shapes; a call that finds none (the first, or a batch NGMS just shrank) runs full. Calls
with ControlNet / T2I-Adapter residuals always run full (their residuals feed the deep levels), and so do
models that are not a diffusers UNet (SD 3.x / Flux.1 transformers).

This is our option, not A1111's: request field / setting ``deepcache_interval``, infotext ``DeepCache
interval: N``. The same seed gives the same picture; it differs from the picture without it.
"""

from __future__ import annotations

import torch

_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual",
              "down_intrablock_additional_residuals")


class DeepCache:
    """The kept features of one sampling pass and the choice between full and shallow calls."""

    def __init__(self, interval: int):
        self.interval = int(interval)
        self.features: dict[tuple, torch.Tensor] = {}
        self.full_calls = self.shallow_calls = 0

    @staticmethod
    def fits(unet) -> bool:
        return all(hasattr(unet, name) for name in ("down_blocks", "up_blocks", "conv_in", "conv_out",
                                                     "get_time_embed", "get_aug_embed"))

    def __call__(self, unet, call: int, slot: int, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor,
                 **extra):
        if self.interval < 2 or not self.fits(unet) or any(extra.get(k) is not None for k in _RESIDUALS):
            return unet(x, t, encoder_hidden_states=hidden, **extra)
        key = (id(unet), slot, tuple(x.shape), tuple(hidden.shape))
        if call % self.interval and key in self.features:
            self.shallow_calls += 1
            return _Output(self._shallow(unet, x, t, hidden, extra.get("added_cond_kwargs"), self.features[key]))
        kept = []

        def keep(module, args, kwargs):
            kept.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        handle = unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            out = unet(x, t, encoder_hidden_states=hidden, **extra)
        finally:
            handle.remove()
        self.features[key] = kept[-1]
        self.full_calls += 1
        return out

    @staticmethod
    def _shallow(unet, x, t, hidden, added_cond_kwargs, deep: torch.Tensor) -> torch.Tensor:
        """The UNet's forward at the outer level only, ``deep`` standing for what the inner levels gave."""
        if unet.config.center_input_sample:
            x = 2 * x - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
        class_emb = unet.get_class_embed(sample=x, class_labels=None)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=added_cond_kwargs or {})
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.process_encoder_hidden_states(encoder_hidden_states=hidden,
                                                    added_cond_kwargs=added_cond_kwargs or {})
        sample = unet.conv_in(x)
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        if getattr(first, "has_cross_attention", False):
            _, res = first(hidden_states=sample, temb=emb, encoder_hidden_states=hidden)
        else:
            _, res = first(hidden_states=sample, temb=emb)
        skips = ((sample, *res))[:len(last.resnets)]  # what the full forward hands the last up block
        if getattr(last, "has_cross_attention", False):
            sample = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=hidden)
        else:
            sample = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips)
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)


class _Output:
    """What the denoiser reads of a UNet call (``.sample``)."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample
