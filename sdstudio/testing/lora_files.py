"""SD 3.x / Flux.1 LoRA files for tests: one set of random factors, written in the layouts trainers publish.

The factors are per module of the *original* layout (Black Forest Labs' / Stability's names, as in
``dit_files.flux_shapes`` / ``sd3_shapes``): ``down`` [rank, in], ``up`` [out, rank], ``alpha``. The writers
follow the published files: sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``alpha``),
ComfyUI / BFL (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``), diffusers / PEFT / AI-toolkit
(``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, no alpha: the scale is baked into B), XLabs
(``double_blocks.0.processor.qkv_lora1.down.weight``). The diffusers names here are written from diffusers'
module layout, not from :mod:`sdstudio.engine.lora`, so a wrong mapping there is caught; ``merged`` gives the
independent reference: the original-layout weights with ``W + mult * alpha / rank * up @ down``.
"""

from __future__ import annotations

import torch

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (down, up, alpha)

# Flux.1 original module -> diffusers module(s); a list = the original's rows split in this order
FLUX_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
            "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
            "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
            "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
            "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
            "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
            "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
FLUX_DOUBLE = {"img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
               "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
               "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
               "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
               "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
               "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear"}
FLUX_SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": "proj_out",
               "modulation.lin": "norm.linear"}


def factors(shapes: dict[str, tuple[int, ...]], rank: int = 4, alpha: float = 2.0, seed: int = 0,
            keep=lambda name: True) -> Factors:
    """Random factors for every matrix (and conv) weight of an original-layout key table."""
    g = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for key, shape in sorted(shapes.items()):
        name = key.removesuffix(".weight")
        if not key.endswith(".weight") or len(shape) not in (2, 4) or not keep(name):
            continue
        n_in = int(torch.tensor(shape[1:]).prod())
        down = torch.randn(rank, *shape[1:], generator=g) / n_in ** 0.5
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.3
        out[name] = (down, up, alpha)
    return out


def kohya(f: Factors, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """sd-scripts' names: the module path with ``_`` for ``.``, ``lora_down`` / ``lora_up`` / ``alpha``."""
    sd = {}
    for name, (down, up, alpha) in f.items():
        k = prefix + name.replace(".", "_")
        sd |= {k + ".lora_down.weight": down, k + ".lora_up.weight": up, k + ".alpha": torch.tensor(alpha)}
    return sd


def comfy(f: Factors, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """ComfyUI / BFL names: the dotted module path, ``lora_A`` / ``lora_B``, and ``alpha``."""
    sd = {}
    for name, (down, up, alpha) in f.items():
        sd |= {prefix + name + ".lora_A.weight": down, prefix + name + ".lora_B.weight": up,
               prefix + name + ".alpha": torch.tensor(alpha)}
    return sd


def _flux_targets(name: str) -> tuple[str, list[str] | str] | None:
    parts = name.split(".")
    if parts[0] in ("double_blocks", "single_blocks"):
        table = FLUX_DOUBLE if parts[0] == "double_blocks" else FLUX_SINGLE
        block = ("transformer_blocks." if parts[0] == "double_blocks" else "single_transformer_blocks.") + parts[1] + "."
        target = table.get(".".join(parts[2:]))
        return None if target is None else (block, target)
    if name == "final_layer.adaLN_modulation.1":
        return "", "norm_out.linear"
    return ("", FLUX_TOP[name]) if name in FLUX_TOP else None


def flux_diffusers(f: Factors, hidden: int, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """diffusers / PEFT (AI-toolkit) names for Flux factors: a fused weight's B split by rows (A shared),
    the final adaLN's rows swapped to diffusers' (scale, shift) order; alpha / rank baked into B."""
    sd = {}
    for name, (down, up, alpha) in f.items():
        found = _flux_targets(name)
        if found is None:
            raise KeyError(name)
        block, target = found
        up = up * (alpha / down.shape[0])
        if name == "final_layer.adaLN_modulation.1":
            shift, scale = up.chunk(2)
            up = torch.cat([scale, shift])
        if isinstance(target, str):
            pieces = [(target, up)]
        else:
            sizes = [hidden] * 3 + ([up.shape[0] - 3 * hidden] if len(target) == 4 else [])
            pieces = list(zip(target, up.split(sizes)))
        for module, rows in pieces:
            sd[f"{prefix}{block}{module}.lora_A.weight"] = down.clone()  # a copy each: files hold no shared tensors
            sd[f"{prefix}{block}{module}.lora_B.weight"] = rows.contiguous()
    return sd


def xlabs_part(f: Factors, hidden: int) -> Factors:
    """The part of Flux factors an XLabs file can hold: attention qkv / proj of both streams, a single
    block's q, k, v rows of ``linear1`` (its MLP rows zero) and ``linear2``."""
    out: Factors = {}
    for name, (down, up, alpha) in f.items():
        if name.startswith("double_blocks.") and name.endswith(("_attn.qkv", "_attn.proj")) or \
                name.startswith("single_blocks.") and name.endswith(".linear2"):
            out[name] = (down, up, alpha)
        elif name.startswith("single_blocks.") and name.endswith(".linear1"):
            up = up.clone()
            up[3 * hidden:] = 0
            out[name] = (down, up, alpha)
    return out


def xlabs(f: Factors, hidden: int) -> dict[str, torch.Tensor]:
    """x-flux's LoRA processor names for :func:`xlabs_part` factors (no alpha in the file: baked into up)."""
    names = {"img_attn.qkv": "qkv_lora1", "txt_attn.qkv": "qkv_lora2", "img_attn.proj": "proj_lora1",
             "txt_attn.proj": "proj_lora2", "linear1": "qkv_lora", "linear2": "proj_lora"}
    sd = {}
    for name, (down, up, alpha) in f.items():
        kind, block, rest = name.split(".", 2)
        up = up * (alpha / down.shape[0])
        if rest == "linear1":
            up = up[: 3 * hidden]
        k = f"{kind}.{block}.processor.{names[rest]}"
        sd |= {k + ".down.weight": down, k + ".up.weight": up.contiguous()}
    return sd


def merged(state: dict[str, torch.Tensor], f: Factors, mult: float = 1.0, prefix: str = "") -> dict[str, torch.Tensor]:
    """Original-layout weights with the factors merged in: ``W + mult * alpha / rank * up @ down``."""
    out = dict(state)
    for name, (down, up, alpha) in f.items():
        w = state[prefix + name + ".weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        out[prefix + name + ".weight"] = w + mult * alpha / down.shape[0] * delta
    return out
