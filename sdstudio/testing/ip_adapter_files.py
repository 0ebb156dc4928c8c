"""Random-weight IP-Adapter files and CLIP vision encoders in the published layouts, for tests.

The IP-Adapter writer produces the keys and shapes of the published files (``image_proj.*`` and
``ip_adapter.N.to_{k,v}_ip.weight``, N = 1, 3, 5, ...) for a UNet configuration, by shape alone: it does not
go through :mod:`sdstudio.models.ip_adapter`'s conversion, so loading a written file tests that conversion.
``.safetensors`` files are flat; ``.bin`` files nest the two parts, as the published pickles do.

The CLIP writer saves a tiny ``CLIPVisionModelWithProjection`` (224×224 input in 14-pixel patches, as the
real encoders, so a "plus" adapter sees 257 hidden states) in transformers' layout or in OpenCLIP's. Same seed,
same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .synthetic import unet_config

TINY_CLIP = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2,
             "image_size": 224, "patch_size": 14, "projection_dim": 48, "hidden_act": "gelu", "layer_norm_eps": 1e-5}


# ---- CLIP vision ---------------------------------------------------------------------------------------------
def tiny_clip_vision(seed: int = 0, projection_dim: int | None = None) -> CLIPVisionModelWithProjection:
    """A random tiny encoder whose LayerNorms are not the fresh 1/0 (trained ones are not); ``projection_dim``:
    the width of its ``image_embeds`` (default 48; a tiny SDXL's pooled prompt is 128 wide, for ReVision)."""
    torch.manual_seed(seed)
    config = {**TINY_CLIP, **({"projection_dim": projection_dim} if projection_dim else {})}
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
    return model


def hf_to_openclip_visual(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' vision names -> OpenCLIP's ``visual.*`` (q, k, v fused into ``in_proj``, projection
    transposed), written out name by name so the loader's own table is what a test checks."""
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers.")})
    out["visual.class_embedding"] = state["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = state["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = state["vision_model.embeddings.patch_embedding.weight"]
    for p in ("weight", "bias"):
        out[f"visual.ln_pre.{p}"] = state[f"vision_model.pre_layrnorm.{p}"]
        out[f"visual.ln_post.{p}"] = state[f"vision_model.post_layernorm.{p}"]
    for i in layers:
        hf, oc = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{oc}ln_1.{p}"] = state[f"{hf}layer_norm1.{p}"]
            out[f"{oc}ln_2.{p}"] = state[f"{hf}layer_norm2.{p}"]
            out[f"{oc}attn.in_proj_{p}"] = torch.cat([state[f"{hf}self_attn.{n}_proj.{p}"] for n in "qkv"])
            out[f"{oc}attn.out_proj.{p}"] = state[f"{hf}self_attn.out_proj.{p}"]
            out[f"{oc}mlp.c_fc.{p}"] = state[f"{hf}mlp.fc1.{p}"]
            out[f"{oc}mlp.c_proj.{p}"] = state[f"{hf}mlp.fc2.{p}"]
    out["visual.proj"] = state["visual_projection.weight"].t()
    return out


def write_clip_vision(path: str | Path, layout: str = "hf", seed: int = 0, with_text: bool = False,
                      projection_dim: int | None = None) -> Path:
    """A tiny encoder at ``path`` in ``layout`` ``"hf"`` or ``"openclip"``; ``with_text`` adds a few text-side
    tensors, as a whole CLIP model's file has (the loader skips them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = tiny_clip_vision(seed, projection_dim)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    if layout == "openclip":
        state = hf_to_openclip_visual(state)
        if with_text:
            state |= {"token_embedding.weight": torch.randn(16, 8, generator=g), "logit_scale": torch.tensor(4.6),
                      "positional_embedding": torch.randn(77, 8, generator=g)}
    elif layout == "hf":
        if with_text:
            state |= {"text_model.embeddings.token_embedding.weight": torch.randn(16, 8, generator=g),
                      "text_projection.weight": torch.randn(8, 8, generator=g), "logit_scale": torch.tensor(4.6)}
    else:
        raise ValueError(f"unknown CLIP layout {layout!r}")
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return path


# ---- IP-Adapter ----------------------------------------------------------------------------------------------
def cross_attention_widths(config: dict) -> list[int]:
    """Each cross-attention layer's inner width, in diffusers' ``attn_processors`` order (the files' order)."""
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    names = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    return [unet.get_submodule(n).to_k.out_features for n in names]


def ip_adapter_state(kind: str = "plain", config: dict | None = None, clip_dim: int | None = None,
                     tokens: int | None = None, heads: int = 2, depth: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Flat published keys of a random IP-Adapter for the UNet ``config`` (default: the tiny SD 1.x UNet).
    ``clip_dim``: the CLIP feature width it takes (default: the tiny encoder's projection width for ``plain``,
    its hidden width for ``plus`` / ``full``; for ``faceid`` the face embedding's, 512)."""
    config = config or unet_config("sd1", "tiny")
    cross = config["cross_attention_dim"]
    g = torch.Generator().manual_seed(seed)

    def lin(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) / cols ** 0.5

    def vec(n: int, around: float = 0.0) -> torch.Tensor:
        return around + 0.1 * torch.randn(n, generator=g)

    def resampler(prefix: str, hidden: int, inner: int, clip_dim: int) -> dict[str, torch.Tensor]:
        """A Perceiver resampler's tensors (the published names; no latents): proj_in / proj_out / norm_out and
        ``depth`` attention + feed-forward layers of ``inner``-wide attention."""
        out = {prefix + "proj_in.weight": lin(hidden, clip_dim), prefix + "proj_in.bias": vec(hidden),
               prefix + "proj_out.weight": lin(cross, hidden), prefix + "proj_out.bias": vec(cross),
               prefix + "norm_out.weight": vec(cross, 1.0), prefix + "norm_out.bias": vec(cross)}
        for i in range(depth):
            a, f = f"{prefix}layers.{i}.0.", f"{prefix}layers.{i}.1."
            out |= {a + "norm1.weight": vec(hidden, 1.0), a + "norm1.bias": vec(hidden),
                    a + "norm2.weight": vec(hidden, 1.0), a + "norm2.bias": vec(hidden),
                    a + "to_q.weight": lin(inner, hidden), a + "to_kv.weight": lin(2 * inner, hidden),
                    a + "to_out.weight": lin(hidden, inner),
                    f + "0.weight": vec(hidden, 1.0), f + "0.bias": vec(hidden),
                    f + "1.weight": lin(4 * hidden, hidden), f + "3.weight": lin(hidden, 4 * hidden)}
        return out

    sd: dict[str, torch.Tensor] = {}
    if kind == "plain":
        clip_dim = clip_dim or TINY_CLIP["projection_dim"]
        tokens = tokens or 4
        sd |= {"proj.weight": lin(tokens * cross, clip_dim), "proj.bias": vec(tokens * cross),
               "norm.weight": vec(cross, 1.0), "norm.bias": vec(cross)}
    elif kind == "full":
        clip_dim = clip_dim or TINY_CLIP["hidden_size"]
        sd |= {"proj.0.weight": lin(clip_dim, clip_dim), "proj.0.bias": vec(clip_dim),
               "proj.2.weight": lin(cross, clip_dim), "proj.2.bias": vec(cross),
               "proj.3.weight": vec(cross, 1.0), "proj.3.bias": vec(cross)}
    elif kind == "plus":
        clip_dim = clip_dim or TINY_CLIP["hidden_size"]
        tokens = tokens or 16
        hidden, inner = cross, 64 * heads  # SD 1.5 plus: the resampler is as wide as the context
        sd |= {"latents": torch.randn(1, tokens, hidden, generator=g) / hidden ** 0.5,
               **resampler("", hidden, inner, clip_dim)}
    elif kind == "faceid":  # the published MLPProjModelFaceId: 512 -> 1024 -> tokens x context, LayerNorm
        clip_dim = clip_dim or 512
        tokens = tokens or 4
        sd |= {"proj.0.weight": lin(2 * clip_dim, clip_dim), "proj.0.bias": vec(2 * clip_dim),
               "proj.2.weight": lin(tokens * cross, 2 * clip_dim), "proj.2.bias": vec(tokens * cross),
               "norm.weight": vec(cross, 1.0), "norm.bias": vec(cross)}
    elif kind == "faceid_plus":  # ProjModelFaceIdPlus: the face MLP, then FacePerceiverResampler over CLIP
        clip_dim = clip_dim or TINY_CLIP["hidden_size"]
        tokens, inner = tokens or 4, 64 * heads
        sd |= {"proj.0.weight": lin(1024, 512), "proj.0.bias": vec(1024),
               "proj.2.weight": lin(tokens * cross, 1024), "proj.2.bias": vec(tokens * cross),
               "norm.weight": vec(cross, 1.0), "norm.bias": vec(cross)}
        sd |= resampler("perceiver_resampler.", cross, inner, clip_dim)
    else:
        raise ValueError(f"unknown IP-Adapter kind {kind!r}")
    out = {f"image_proj.{k}": v for k, v in sd.items()}
    for i, width in enumerate(cross_attention_widths(config)):
        out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = lin(width, cross)
        out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = lin(width, cross)
    return out


def write_ip_adapter(path: str | Path, kind: str = "plain", **kwargs) -> Path:
    """A random IP-Adapter file: flat keys in ``.safetensors``, the nested published dict in ``.bin``/``.pth``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ip_adapter_state(kind, **kwargs).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in state.items():
            part, _, rest = key.partition(".")
            nested[part][rest] = value
        torch.save(nested, str(path))
    return path
