"""SD 3.x / Flux.1 model files for tests: key tables in the published layouts, random-weight writers.

The transformer key tables are written from the published layouts (SAI's MMDiT reference, Black Forest
Labs' ``flux/model.py``), not from diffusers' converters, so a wrong mapping in a converter is caught by
loading these files. Full-size shapes (``sd3_shapes(24)``, ``flux_shapes(19, 38)``) serve detection tests;
load tests use reduced depth and width with the same keys. Encoders and VAEs are written from the
transformers / diffusers modules (their files are those modules' state dicts; the VAE goes through our
own LDM layout table).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..models.convert import canonical_text_state, component_to_ldm

Shapes = dict[str, tuple[int, ...]]
SD3_PREFIX = "model.diffusion_model."


def _linear(out: dict, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[name + ".weight"] = (n_out, n_in)
    if bias:
        out[name + ".bias"] = (n_out,)


# ---- SD 3 / 3.5 (MMDiT) -----------------------------------------------------------------------------

def sd3_shapes(depth: int = 24, *, patch: int = 2, in_channels: int = 16, pos_embed_max: int = 192,
               context_dim: int = 4096, pooled_dim: int = 2048, qk_norm: bool = False, dual: tuple[int, ...] = (),
               prefix: str = SD3_PREFIX) -> Shapes:
    """The MMDiT keys of an SD3 single file. Hidden size 64 * depth, 64-wide heads, as published: depth 24
    = SD3 Medium (``qk_norm`` + ``dual=range(13)`` + ``pos_embed_max=384``: SD3.5 Medium), 38 = SD3.5 Large."""
    h = 64 * depth
    s: Shapes = {"pos_embed": (1, pos_embed_max * pos_embed_max, h), "x_embedder.proj.weight": (h, in_channels, patch, patch),
                 "x_embedder.proj.bias": (h,)}
    _linear(s, "t_embedder.mlp.0", h, 256)
    _linear(s, "t_embedder.mlp.2", h, h)
    _linear(s, "y_embedder.mlp.0", h, pooled_dim)
    _linear(s, "y_embedder.mlp.2", h, h)
    _linear(s, "context_embedder", h, context_dim)
    for i in range(depth):
        for part in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{part}."
            pre_only = part == "context_block" and i == depth - 1  # the last context block only feeds attention
            attn2 = part == "x_block" and i in dual
            _linear(s, b + "adaLN_modulation.1", (9 if attn2 else 2 if pre_only else 6) * h, h)
            for attn in ("attn", "attn2") if attn2 else ("attn",):
                _linear(s, f"{b}{attn}.qkv", 3 * h, h)
                if not pre_only:
                    _linear(s, f"{b}{attn}.proj", h, h)
                if qk_norm:
                    s[f"{b}{attn}.ln_q.weight"] = (64,)
                    s[f"{b}{attn}.ln_k.weight"] = (64,)
            if not pre_only:
                _linear(s, b + "mlp.fc1", 4 * h, h)
                _linear(s, b + "mlp.fc2", h, 4 * h)
    _linear(s, "final_layer.linear", patch * patch * in_channels, h)
    _linear(s, "final_layer.adaLN_modulation.1", 2 * h, h)
    return {prefix + k: v for k, v in s.items()}


def sd35_medium_shapes(**kw) -> Shapes:
    return sd3_shapes(24, qk_norm=True, dual=tuple(range(13)), pos_embed_max=384, **kw)


def sd35_large_shapes(**kw) -> Shapes:
    return sd3_shapes(38, qk_norm=True, **kw)


# ---- Flux.1 -----------------------------------------------------------------------------------------

def flux_shapes(double: int = 19, single: int = 38, *, hidden: int = 3072, in_channels: int = 64,
                context_dim: int = 4096, pooled_dim: int = 768, guidance: bool = True, prefix: str = "") -> Shapes:
    """Flux.1 in Black Forest Labs' layout (``prefix="model.diffusion_model."`` for ComfyUI's). 128-wide
    heads, MLP 4x wide; ``guidance_in`` only in dev (guidance-distilled)."""
    h, mlp = hidden, 4 * hidden
    s: Shapes = {}
    _linear(s, "img_in", h, in_channels)
    for emb, n_in in (("time_in", 256), ("vector_in", pooled_dim)) + ((("guidance_in", 256),) if guidance else ()):
        _linear(s, f"{emb}.in_layer", h, n_in)
        _linear(s, f"{emb}.out_layer", h, h)
    _linear(s, "txt_in", h, context_dim)
    for i in range(double):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}_"
            _linear(s, b + "mod.lin", 6 * h, h)
            _linear(s, b + "attn.qkv", 3 * h, h)
            s[b + "attn.norm.query_norm.scale"] = (128,)
            s[b + "attn.norm.key_norm.scale"] = (128,)
            _linear(s, b + "attn.proj", h, h)
            _linear(s, b + "mlp.0", mlp, h)
            _linear(s, b + "mlp.2", h, mlp)
    for i in range(single):
        b = f"single_blocks.{i}."
        _linear(s, b + "linear1", 3 * h + mlp, h)
        _linear(s, b + "linear2", h, h + mlp)
        s[b + "norm.query_norm.scale"] = (128,)
        s[b + "norm.key_norm.scale"] = (128,)
        _linear(s, b + "modulation.lin", 3 * h, h)
    _linear(s, "final_layer.linear", 64, h)
    _linear(s, "final_layer.adaLN_modulation.1", 2 * h, h)
    return {prefix + k: v for k, v in s.items()}


def flux_diffusers_shapes(double: int = 19, single: int = 38, *, hidden: int = 3072, guidance: bool = True,
                          context_dim: int = 4096, pooled_dim: int = 768) -> Shapes:
    """Flux.1 as diffusers stores it (``transformer/diffusion_pytorch_model*.safetensors``): the module's own
    state dict, from a meta-device FluxTransformer2DModel."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        m = FluxTransformer2DModel(num_layers=double, num_single_layers=single, num_attention_heads=hidden // 128,
                                   guidance_embeds=guidance, joint_attention_dim=context_dim,
                                   pooled_projection_dim=pooled_dim)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


# ---- text encoders and VAE --------------------------------------------------------------------------

CLIP_SIZES = {  # (width, layers, mlp width, heads)
    "clip_l": {"full": (768, 12, 3072, 12), "tiny": (64, 2, 128, 1)},  # heads = width / 64, as published
    "clip_g": {"full": (1280, 32, 5120, 20), "tiny": (128, 2, 256, 2)},
}
# tiny T5 is as wide as the tiny CLIP-L + CLIP-G concatenation (SD3 pads CLIP's 2048 to T5's 4096)
T5_SIZES = {"full": {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64},
            "tiny": {"d_model": 192, "d_kv": 32, "d_ff": 256, "num_layers": 2, "num_heads": 6}}


def clip_module(kind: str, size: str = "tiny", seed: int = 0, meta: bool = False, vocab: int = 49408):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    width, layers, mlp, heads = CLIP_SIZES[kind][size]
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, intermediate_size=mlp,
                            num_attention_heads=heads, projection_dim=width, max_position_embeddings=77,
                            hidden_act="gelu" if kind == "clip_g" else "quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if kind == "clip_g" else 49407)
    torch.manual_seed(seed)
    if meta:
        with init_empty_weights():
            return CLIPTextModelWithProjection(config)
    return _realistic(CLIPTextModelWithProjection(config).eval())


def t5_module(size: str = "tiny", seed: int = 0, meta: bool = False, vocab: int = 32128):
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128, **T5_SIZES[size])
    torch.manual_seed(seed)
    if meta:
        with init_empty_weights():
            return T5EncoderModel(config)
    return _realistic(T5EncoderModel(config).eval())


def encoder_state(kind: str, size: str = "tiny", seed: int = 0, layout: str = "clip_hf", meta: bool = False,
                  projection: bool = True, vocab: int | None = None) -> dict[str, torch.Tensor]:
    """A stand-alone encoder file's tensors. CLIP ``layout``: ``clip_hf`` (``text_model.*`` +
    ``text_projection.weight``, as SD3's clip_l/clip_g files) or ``openclip``; T5: transformers' names with
    ``shared.weight`` and ``encoder.embed_tokens.weight`` (the published t5xxl files carry both)."""
    if kind == "t5xxl":
        sd = dict(t5_module(size, seed, meta, **({"vocab": vocab} if vocab else {})).state_dict())
        sd["encoder.embed_tokens.weight"] = sd["encoder.embed_tokens.weight"].clone()  # tied: a file holds two copies
        return sd
    m = clip_module(kind, size, seed, meta, **({"vocab": vocab} if vocab else {}))
    sd = canonical_text_state(m.state_dict())
    sd.pop("text_model.embeddings.position_ids", None)
    if not projection:
        sd.pop("text_projection.weight")
    if layout == "openclip":
        sd = component_to_ldm(sd, "", "openclip")
    return sd


def dit_vae_state(size: str = "tiny", seed: int = 0, prefix: str = "", levels: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """A 16-channel VAE without quant convs (SD3's / Flux's ``ae.safetensors``), in the LDM layout. The tiny
    one has 2 levels (2x downscale) unless ``levels`` says otherwise (4: the real 8x, for whole-job tests)."""
    from diffusers import AutoencoderKL

    channels = [128, 256, 512, 512] if size == "full" else [32] * (levels or 2)
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * len(channels),
                        up_block_types=["UpDecoderBlock2D"] * len(channels), block_out_channels=channels,
                        layers_per_block=2 if size == "full" else 1, latent_channels=16, norm_num_groups=32,
                        use_quant_conv=False, use_post_quant_conv=False)
    _realistic(vae)
    return component_to_ldm(vae.state_dict(), prefix, "vae", levels=len(channels))


def _realistic(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.normal_(1.0, 0.1)
                if m.bias is not None:
                    m.bias.normal_(0.05, 0.1)
    return module


# ---- random tensors for a key table -----------------------------------------------------------------

def random_state(shapes: Shapes, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Tensors for a transformer key table: matrices ~ N(0, 1/fan_in), biases small, norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in sorted(shapes.items()):
        if k.endswith(("scale", "ln_q.weight", "ln_k.weight")):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("pos_embed"):
            t = 0.5 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            t = 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:]))
            t = torch.randn(shape, generator=g) / fan_in ** 0.5
        out[k] = t.to(dtype).contiguous()
    return out


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def to_fp8(state: dict[str, torch.Tensor], scaled: bool = False, fmt: torch.dtype = torch.float8_e4m3fn,
           marker: str = "scaled_fp8") -> dict[str, torch.Tensor]:
    """fp8 copy of a state dict's matrices (1-D tensors stay as they are, as in published fp8 files).
    ``scaled``: ComfyUI's scaled-fp8 variant: ``X.weight / X.scale_weight`` stored, plus a ``marker`` key
    (``scaled_fp8``, or ``model.diffusion_model.scaled_fp8`` in a checkpoint)."""
    out: dict[str, torch.Tensor] = {}
    top = float(torch.finfo(fmt).max)
    for k, v in state.items():
        if v.ndim < 2 or not k.endswith("weight"):
            out[k] = v
            continue
        if scaled:
            scale = v.float().abs().max().clamp(min=1e-12) / top
            out[k] = (v.float() / scale).to(fmt)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v.to(fmt)
    if scaled:
        out[marker] = torch.zeros(0, dtype=fmt)
    return out


def save(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_gguf(state: dict[str, torch.Tensor], path: str | Path, qtype: str = "Q8_0") -> Path:
    """A GGUF file as city96's ComfyUI-GGUF writes Flux: matrices quantized (``qtype``), 1-D tensors in F32."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="flux")
    q = gguf.GGMLQuantizationType[qtype]
    for k, v in state.items():
        a = v.float().numpy()
        if a.ndim >= 2 and a.shape[-1] % gguf.GGML_QUANT_SIZES[q][0] == 0:
            data = gguf.quants.quantize(a, q)
            writer.add_tensor(k, data, raw_shape=data.shape, raw_dtype=q)
        else:
            writer.add_tensor(k, a.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
