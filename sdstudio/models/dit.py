"""SD 3.x and Flux.1 model files: detection from keys and shapes, safe loading, and the text encoders and
VAE they need from their own folders.

Detection is pure (``{key: shape}`` in, spec out) as in :mod:`.detect`; the few facts shapes cannot tell
(attention head width without qk-norm, rotary axes, latent scaling factors) come from the published
configurations. Files are read through :class:`WeightSource`, which hands out tensors as the model uses
them: fp8 upcast, ComfyUI's "scaled fp8" multiplied back by its per-tensor scales, GGUF blocks dequantized.

Layouts understood:

* SD 3 / 3.5 single files (SAI and ComfyUI): ``model.diffusion_model.joint_blocks.N...``, VAE under
  ``first_stage_model.``, optional encoders under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.``.
* Flux.1 in Black Forest Labs' layout (``double_blocks.N...``, bare or under ``model.diffusion_model.``, VAE
  under ``vae.`` or ``first_stage_model.``) and in diffusers' layout (``transformer_blocks.N...``).
* Stand-alone text encoders (CLIP-L, CLIP-G in transformers or OpenCLIP layout, T5-XXL) and 16-channel VAEs.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import init_empty_weights

from .convert import convert_component
from .detect import TextEncoderSpec, _vae_config
from .errors import ModelFileError
from .loader import build_vae
from .safe_load import open_state_dict, usable_weight

log = logging.getLogger(__name__)
Shapes = dict[str, tuple[int, ...]]

DIT_PREFIXES = ("model.diffusion_model.", "")
VAE_PREFIXES = ("first_stage_model.", "vae.")
TEXT_ENCODER_KINDS = ("clip_l", "clip_g", "t5xxl")
# Latent normalisation, from the published VAE configs (shapes cannot tell an SD3 VAE from a Flux one).
VAE_FACTORS = {"sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609},
               "flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159}}
FLUX_ROPE_AXES = {128: (16, 56, 56)}  # head width -> rotary axes (time, height, width), BFL's config
SD3_HEAD_DIM = 64  # MMDiT's published head width (64 * depth = hidden size)
CLIP_G_MIN_WIDTH = 1024  # CLIP-L is 768 wide, OpenCLIP bigG 1280: anything from 1024 up is the G encoder

# Keys a file may carry that the model does not use: never warned about. Everything else unused is warned
# about once; a tensor the model uses and the file lacks is an error (or filled where the table below says).
OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "clip": (r"(^|\.)position_ids$", r"(^|\.)logit_scale$", r"^vision_model\.", r"^visual_projection\.",
             r"^visual\.", r"(^|\.)text_projection(\.weight)?$", r"(^|\.)attn_mask$"),
    "t5": (r"^encoder\.embed_tokens\.weight$", r"^shared\.weight$", r"^decoder\.", r"^lm_head\.",
           r"(^|\.)scaled_fp8$"),
    "dit": (r"(^|\.)scaled_fp8$", r"\.scale_input$", r"^model_ema\.", r"(^|\.)__.*__$"),
}
FILLED_KEYS = {
    "t5": "encoder.embed_tokens.weight and shared.weight are one tensor; either is enough",
    "clip": "text_projection: identity when the file has none (ComfyUI does the same)",
}
_KIND_TITLE = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
_KIND_FILE = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors",
              "t5xxl": "t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors)"}


# ---- specs ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderSpec:
    """A text encoder found in a file: which one, where its keys are, and the transformers config."""

    kind: str  # clip_l, clip_g, t5xxl
    prefix: str  # keys live under this ("" for a stand-alone file)
    layout: str  # clip_hf (transformers names), openclip, t5
    config: dict  # CLIPTextConfig / T5Config kwargs
    root: str = ""  # clip_hf: full prefix of embeddings./encoder./final_layer_norm.
    projection: str | None = None  # full key of text_projection, when the file has one
    projection_transposed: bool = False  # stored [in, out] (OpenCLIP) instead of Linear's [out, in]

    @property
    def title(self) -> str:
        return _KIND_TITLE[self.kind]

    def clip_spec(self, hidden_layer: int = -2, final_norm: bool = False) -> TextEncoderSpec:
        """The same encoder as :mod:`.detect` describes CLIP encoders (for code shared with SD/SDXL)."""
        pad = "!" if self.kind == "clip_g" else "<|endoftext|>"
        return TextEncoderSpec(self.prefix, self.layout, self.config, True, pad, hidden_layer, final_norm)


@dataclass(frozen=True)
class DitSpec:
    family: str  # "sd3" or "flux"
    variant: str  # sd3_medium, sd3.5_medium, sd3.5_large, sd3 | flux_dev, flux_schnell (+ _fill, _depth)
    layout: str  # "sd3" (SAI/ComfyUI), "bfl" (Black Forest Labs / ComfyUI), "diffusers"
    prefix: str  # transformer keys live under this
    transformer: dict  # SD3Transformer2DModel / FluxTransformer2DModel kwargs
    vae: dict | None = None  # AutoencoderKL kwargs of a bundled VAE
    vae_prefix: str | None = None
    vae_levels: int = 4
    text_encoders: tuple[EncoderSpec, ...] = ()  # bundled in the file
    required_encoders: tuple[str, ...] = ()
    optional_encoders: tuple[str, ...] = ()  # SD3 runs without T5 (zeros in its place), as SAI's reference
    guidance_distilled: bool = False  # Flux dev: guidance is an input of the model, not CFG

    @property
    def is_flux(self) -> bool:
        return self.family == "flux"

    def bundled(self, kind: str) -> EncoderSpec | None:
        return next((e for e in self.text_encoders if e.kind == kind), None)

    def describe(self) -> str:
        names = {"sd3_medium": "SD 3 Medium", "sd3.5_medium": "SD 3.5 Medium", "sd3.5_large": "SD 3.5 Large",
                 "sd3": "SD 3", "flux_dev": "Flux.1 dev", "flux_schnell": "Flux.1 schnell"}
        base, _, extra = self.variant.partition("+")
        return names.get(base, base) + (f" ({extra})" if extra else "")


# ---- small shape helpers ----------------------------------------------------------------------------

def _indices(shapes: Iterable[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _need(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelFileError(f"not a complete {what}: missing {key}")
    return shapes[key]


def _contiguous(found: list[int], what: str) -> int:
    if not found or found != list(range(len(found))):
        raise ModelFileError(f"{what} blocks are not numbered 0..N-1 (found {found[:5]}...)")
    return len(found)


def _refuse_nf4(shapes: Shapes) -> None:
    if any(k.endswith((".absmax", ".quant_map")) or "bitsandbytes__" in k for k in shapes):
        raise ModelFileError("NF4 / bitsandbytes checkpoints cannot be loaded here (bitsandbytes has no CPU "
                             "kernels in this build); use an fp16, fp8 or GGUF version of the model")


# ---- detection: transformers --------------------------------------------------------------------------

def _sd3_config(shapes: Shapes, p: str) -> dict:
    depth = _contiguous(_indices(shapes, rf"{re.escape(p)}joint_blocks\.(\d+)\."), "MMDiT joint")
    hidden, in_ch, patch, _ = _need(shapes, p + "x_embedder.proj.weight", "SD3 transformer")
    pos = _need(shapes, p + "pos_embed", "SD3 transformer")
    side = round(pos[-2] ** 0.5)
    if side * side != pos[-2]:
        raise ModelFileError(f"SD3 pos_embed has {pos[-2]} positions, not a square grid")
    ctx_out, ctx_in = _need(shapes, p + "context_embedder.weight", "SD3 transformer")
    ln_q = shapes.get(p + "joint_blocks.0.x_block.attn.ln_q.weight")
    if p + "joint_blocks.0.x_block.attn.ln_q.bias" in shapes:
        raise ModelFileError("SD3 transformer with LayerNorm qk-norm is not a published layout")
    head_dim = ln_q[0] if ln_q else SD3_HEAD_DIM
    if hidden % head_dim:
        raise ModelFileError(f"SD3 hidden size {hidden} is not a multiple of the head width {head_dim}")
    final = _need(shapes, p + "final_layer.linear.weight", "SD3 transformer")
    return {
        "sample_size": 128, "patch_size": patch, "in_channels": in_ch, "num_layers": depth,
        "attention_head_dim": head_dim, "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": ctx_in, "caption_projection_dim": ctx_out,
        "pooled_projection_dim": _need(shapes, p + "y_embedder.mlp.0.weight", "SD3 transformer")[1],
        "out_channels": final[0] // (patch * patch), "pos_embed_max_size": side,
        "dual_attention_layers": tuple(_indices(shapes, rf"{re.escape(p)}joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight")),
        "qk_norm": "rms_norm" if ln_q else None,
    }


def _sd3_variant(cfg: dict) -> str:
    if cfg["num_layers"] == 38 and cfg["qk_norm"]:
        return "sd3.5_large"
    if cfg["num_layers"] == 24 and cfg["dual_attention_layers"]:
        return "sd3.5_medium"
    if cfg["num_layers"] == 24 and not cfg["qk_norm"]:
        return "sd3_medium"
    return "sd3"


def _flux_config(shapes: Shapes, p: str, layout: str) -> dict:
    bfl = layout == "bfl"
    names = {  # what each config fact is read from, per layout
        "img_in": "img_in.weight" if bfl else "x_embedder.weight",
        "txt_in": "txt_in.weight" if bfl else "context_embedder.weight",
        "vector_in": "vector_in.in_layer.weight" if bfl else "time_text_embed.text_embedder.linear_1.weight",
        "guidance": "guidance_in.in_layer.weight" if bfl else "time_text_embed.guidance_embedder.linear_1.weight",
        "qnorm": "double_blocks.0.img_attn.norm.query_norm.scale" if bfl else "transformer_blocks.0.attn.norm_q.weight",
        "mlp": "double_blocks.0.img_mlp.0.weight" if bfl else "transformer_blocks.0.ff.net.0.proj.weight",
        "final": "final_layer.linear.weight" if bfl else "proj_out.weight",
        "double": r"double_blocks\.(\d+)\." if bfl else r"transformer_blocks\.(\d+)\.",
        "single": r"single_blocks\.(\d+)\." if bfl else r"single_transformer_blocks\.(\d+)\.",
    }
    hidden, in_ch = _need(shapes, p + names["img_in"], "Flux transformer")
    head_dim = _need(shapes, p + names["qnorm"], "Flux transformer")[0]
    if head_dim not in FLUX_ROPE_AXES:
        raise ModelFileError(f"Flux transformer with {head_dim}-wide heads: rotary layout unknown (Flux.1 uses 128)")
    if _need(shapes, p + names["mlp"], "Flux transformer")[0] != 4 * hidden:
        raise ModelFileError("Flux transformer MLP is not 4x its width, as Flux.1's is")
    return {
        "patch_size": 1, "in_channels": in_ch,
        "out_channels": _need(shapes, p + names["final"], "Flux transformer")[0],
        "num_layers": _contiguous(_indices(shapes, re.escape(p) + names["double"]), "Flux double"),
        "num_single_layers": _contiguous(_indices(shapes, re.escape(p) + names["single"]), "Flux single"),
        "attention_head_dim": head_dim, "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": _need(shapes, p + names["txt_in"], "Flux transformer")[1],
        "pooled_projection_dim": _need(shapes, p + names["vector_in"], "Flux transformer")[1],
        "guidance_embeds": p + names["guidance"] in shapes,
        "axes_dims_rope": FLUX_ROPE_AXES[head_dim],
    }


def detect_dit(shapes: Shapes) -> DitSpec | None:
    """SD 3.x / Flux.1 architecture of a file from its keys and shapes; None when it is neither."""
    for p in DIT_PREFIXES:
        if p + "joint_blocks.0.x_block.attn.qkv.weight" in shapes:
            _refuse_nf4(shapes)
            cfg = _sd3_config(shapes, p)
            return _with_extras(DitSpec("sd3", _sd3_variant(cfg), "sd3", p, cfg, required_encoders=("clip_l", "clip_g"),
                                        optional_encoders=("t5xxl",)), shapes)
        bfl = p + "double_blocks.0.img_attn.qkv.weight" in shapes
        hf = p + "single_transformer_blocks.0.proj_mlp.weight" in shapes or (
            p + "transformer_blocks.0.attn.add_q_proj.weight" in shapes and p + "x_embedder.weight" in shapes)
        if bfl or hf:
            _refuse_nf4(shapes)
            if bfl and p + "vector_in.in_layer.weight" not in shapes:
                raise ModelFileError("a Flux-like transformer without vector_in (Chroma or a later Flux): not supported")
            layout = "bfl" if bfl else "diffusers"
            cfg = _flux_config(shapes, p, layout)
            variant = "flux_dev" if cfg["guidance_embeds"] else "flux_schnell"
            extra = {64: "", 384: "+fill", 128: "+depth/canny"}.get(cfg["in_channels"], f"+{cfg['in_channels']} inputs")
            return _with_extras(DitSpec("flux", variant + extra, layout, p, cfg, required_encoders=("clip_l", "t5xxl"),
                                        guidance_distilled=cfg["guidance_embeds"]), shapes)
    return None


def _with_extras(spec: DitSpec, shapes: Shapes) -> DitSpec:
    vae = next(((pre, found) for pre in VAE_PREFIXES if (found := detect_dit_vae(shapes, pre, spec.family))), None)
    if vae:
        spec = replace(spec, vae_prefix=vae[0], vae=vae[1][0], vae_levels=vae[1][1])
    return replace(spec, text_encoders=bundled_text_encoders(shapes))


# ---- detection: VAE ---------------------------------------------------------------------------------

def detect_dit_vae(shapes: Shapes, prefix: str = "", family: str = "flux") -> tuple[dict, int] | None:
    """A 16-channel VAE (SD3's, Flux's ``ae.safetensors``) under ``prefix``: (AutoencoderKL kwargs, levels).
    None when there is none, or it is a 4-channel SD/SDXL VAE. ``family`` picks the latent factors."""
    if prefix + "encoder.conv_in.weight" not in shapes or prefix + "decoder.conv_out.weight" not in shapes:
        return None
    config, levels = _vae_config(shapes, prefix, "sdxl")
    if config["latent_channels"] != 16:
        return None
    config.update(VAE_FACTORS[family], sample_size=1024,
                  use_quant_conv=prefix + "quant_conv.weight" in shapes,
                  use_post_quant_conv=prefix + "post_quant_conv.weight" in shapes)
    return config, levels


# ---- detection: text encoders -----------------------------------------------------------------------

def _t5_spec(shapes: Shapes, prefix: str) -> EncoderSpec:
    p = prefix
    emb = shapes.get(p + "shared.weight") or _need(shapes, p + "encoder.embed_tokens.weight", "T5 encoder")
    bias = _need(shapes, p + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "T5 encoder")
    heads = bias[1]
    gated = p + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff = _need(shapes, p + "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight",
               "T5 encoder")
    config = {
        "vocab_size": emb[0], "d_model": emb[1], "d_kv": shapes[p + "encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        "d_ff": ff[0], "num_layers": _contiguous(_indices(shapes, rf"{re.escape(p)}encoder\.block\.(\d+)\."), "T5"),
        "num_heads": heads, "relative_attention_num_buckets": bias[0], "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu" if gated else "relu", "layer_norm_epsilon": 1e-6,
        "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": False,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    }
    return EncoderSpec("t5xxl", prefix, "t5", config)


def _clip_kind(width: int, hint: str | None) -> str:
    if hint in ("clip_l", "clip_g"):
        return hint
    return "clip_g" if width >= CLIP_G_MIN_WIDTH else "clip_l"


def _clip_hf_spec(shapes: Shapes, prefix: str, hint: str | None) -> EncoderSpec | None:
    root = next((prefix + mid for mid in ("text_model.", "transformer.text_model.", "transformer.", "")
                 if prefix + mid + "embeddings.token_embedding.weight" in shapes), None)
    if root is None:
        return None
    vocab, width = shapes[root + "embeddings.token_embedding.weight"]
    kind = _clip_kind(width, hint)
    top = root.removesuffix("text_model.")
    proj = next((k for k in (top + "text_projection.weight", top + "text_projection") if k in shapes), None)
    config = {
        "vocab_size": vocab, "hidden_size": width, "num_attention_heads": max(1, width // 64),
        "num_hidden_layers": _contiguous(_indices(shapes, rf"{re.escape(root)}encoder\.layers\.(\d+)\."), "CLIP"),
        "intermediate_size": _need(shapes, root + "encoder.layers.0.mlp.fc1.weight", "CLIP text encoder")[0],
        "max_position_embeddings": _need(shapes, root + "embeddings.position_embedding.weight", "CLIP text encoder")[0],
        "hidden_act": "gelu" if kind == "clip_g" else "quick_gelu",
        "projection_dim": (shapes[proj][0] if proj.endswith(".weight") else shapes[proj][1]) if proj else width,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407 if kind == "clip_l" else 0,
    }
    return EncoderSpec(kind, prefix, "clip_hf", config, root, proj, bool(proj and not proj.endswith(".weight")))


def _openclip_spec(shapes: Shapes, prefix: str, hint: str | None) -> EncoderSpec | None:
    p = next((prefix + mid for mid in ("", "model.", "transformer.") if prefix + mid + "token_embedding.weight" in shapes
              and prefix + mid + "transformer.resblocks.0.attn.in_proj_weight" in shapes), None)
    if p is None:
        return None
    vocab, width = shapes[p + "token_embedding.weight"]
    kind = _clip_kind(width, hint)
    proj = p + "text_projection" if p + "text_projection" in shapes else None
    config = {
        "vocab_size": vocab, "hidden_size": width, "num_attention_heads": max(1, width // 64),
        "num_hidden_layers": _contiguous(_indices(shapes, rf"{re.escape(p)}transformer\.resblocks\.(\d+)\."), "CLIP"),
        "intermediate_size": _need(shapes, p + "transformer.resblocks.0.mlp.c_fc.weight", "CLIP text encoder")[0],
        "max_position_embeddings": _need(shapes, p + "positional_embedding", "CLIP text encoder")[0],
        "hidden_act": "gelu" if kind == "clip_g" else "quick_gelu",
        "projection_dim": shapes[proj][1] if proj else width,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407 if kind == "clip_l" else 0,
    }
    return EncoderSpec(kind, p, "openclip", config, p, proj, True)


def detect_text_encoder(shapes: Shapes, prefix: str = "", hint: str | None = None) -> EncoderSpec | None:
    """CLIP-L, CLIP-G or T5 encoder under ``prefix``; None when the keys are none of them. ``hint`` (the
    bundle's name, e.g. ``clip_g``) settles L vs G for scaled-down test models; real ones differ in width."""
    if any(k.startswith(prefix + "encoder.block.0.layer.0.SelfAttention.") for k in shapes) or \
            any(k.startswith(prefix + "transformer.encoder.block.0.") for k in shapes):
        inner = prefix if prefix + "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes else prefix + "transformer."
        return _t5_spec(shapes, inner)
    return _clip_hf_spec(shapes, prefix, hint) or _openclip_spec(shapes, prefix, hint)


def bundled_text_encoders(shapes: Shapes) -> tuple[EncoderSpec, ...]:
    """Encoders stored inside a checkpoint under ``text_encoders.NAME.`` (SD3 "incl_clips" files, ComfyUI)."""
    groups = sorted({m.group(1) for k in shapes if (m := re.match(r"(text_encoders\.([^.]+)\.)", k))})
    found = []
    for prefix in groups:
        name = prefix.split(".")[1]
        spec = detect_text_encoder(shapes, prefix, hint=name if name in TEXT_ENCODER_KINDS else None)
        if spec:
            found.append(spec)
    return tuple(found)


# ---- reading tensors --------------------------------------------------------------------------------

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))
# Precision of a weight format, for picking among files of the same encoder (higher wins).
_PRECISION = {"F64": 9, "F32": 8, "BF16": 7, "F16": 7, "F8_E4M3:scaled": 5, "F8_E5M2:scaled": 5, "Q8_0": 4,
              "F8_E4M3": 3, "F8_E5M2": 3, "Q6_K": 2, "Q5_0": 2, "Q5_1": 2, "Q5_K": 2}
_TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _safetensors_dtypes(path: Path) -> dict[str, str]:
    """Each tensor's stored dtype, from the header alone (the header was checked by :mod:`.safe_load`)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


class WeightSource(Mapping):
    """``name -> tensor`` over a model file, as the model uses the tensors: fp8 upcast to ``compute_dtype``,
    scaled fp8 multiplied back (``X.weight * X.scale_weight``), GGUF blocks dequantized. The scale keys are
    consumed here and do not appear among the keys."""

    def __init__(self, path: Path, shapes: Shapes, getter: Callable[[str], torch.Tensor], dtypes: dict[str, str],
                 compute_dtype: torch.dtype = torch.float32):
        self.path = path
        self._get = getter
        self.compute_dtype = compute_dtype
        self.raw_dtypes = dtypes
        self.scaled = {k[: -len("scale_weight")] + "weight" for k in shapes if k.endswith(".scale_weight")}
        self.shapes = {k: v for k, v in shapes.items()
                       if not k.endswith((".scale_weight", ".scale_input")) and not k.endswith("scaled_fp8")}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        t = self._get(key)
        if key in self.scaled:
            scale = self._get(key[: -len("weight")] + "scale_weight").to(torch.float32)
            return (t.to(torch.float32) * scale).to(self.compute_dtype)
        if t.dtype in _FP8:
            return t.to(self.compute_dtype)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def precision(self) -> str:
        """The format of most of the file's matrices: F32, F16, BF16, F8_E4M3, F8_E4M3:scaled, Q8_0..."""
        counts: dict[str, int] = {}
        for k, shape in self.shapes.items():
            if len(shape) >= 2:
                d = self.raw_dtypes.get(k, "F32")
                d = d + ":scaled" if k in self.scaled else d
                counts[d] = counts.get(d, 0) + 1
        return max(counts, key=counts.get) if counts else "F32"


def _open_gguf(path: Path, compute_dtype: torch.dtype) -> WeightSource:
    try:
        import gguf
    except ImportError:
        raise ModelFileError(f"{path.name}: GGUF files need the 'gguf' package (pip install gguf)") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, struct.error, IndexError) as exc:
        raise ModelFileError(f"{path.name}: corrupt or truncated GGUF file ({str(exc)[:200]})") from None
    tensors = {t.name: t for t in reader.tensors}
    shapes: Shapes = {}
    for name, t in tensors.items():
        field_ = reader.get_field(f"comfy.gguf.orig_shape.{name}")  # ComfyUI-GGUF: shape before flattening
        if field_ is not None:
            shapes[name] = tuple(int(field_.parts[i][0]) for i in field_.data)
        else:
            shapes[name] = tuple(int(d) for d in reversed(t.shape.tolist()))

    def get(name: str) -> torch.Tensor:
        t = tensors[name]
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(array.copy()).reshape(shapes[name]).to(compute_dtype)

    return WeightSource(path, shapes, get, {n: t.tensor_type.name for n, t in tensors.items()}, compute_dtype)


def open_weights(path: str | Path, compute_dtype: torch.dtype = torch.float32) -> WeightSource:
    """Open a ``.safetensors`` / pickle (via :func:`.safe_load.open_state_dict`) or ``.gguf`` file lazily."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelFileError(f"{path}: no such file")
        return _open_gguf(path, compute_dtype)
    lazy = open_state_dict(path)
    if path.suffix.lower() == ".safetensors":
        dtypes = _safetensors_dtypes(path)
    else:
        dtypes = {k: _TORCH_TO_ST.get(lazy[k].dtype, str(lazy[k].dtype)) for k in lazy}
    return WeightSource(path, dict(lazy.shapes), lazy.__getitem__, dtypes, compute_dtype)


def _as_source(source, compute_dtype: torch.dtype) -> WeightSource:
    if isinstance(source, WeightSource):
        return source
    if isinstance(source, (str, Path)):
        return open_weights(source, compute_dtype)
    path = Path(getattr(source, "path", "<memory>"))
    if hasattr(source, "shapes"):  # a LazyStateDict: keep it lazy
        dtypes = _safetensors_dtypes(path) if path.suffix.lower() == ".safetensors" else {}
        return WeightSource(path, dict(source.shapes), source.__getitem__, dtypes, compute_dtype)
    shapes = {k: tuple(v.shape) for k, v in source.items()}
    return WeightSource(path, shapes, source.__getitem__,
                        {k: _TORCH_TO_ST.get(v.dtype, str(v.dtype)) for k, v in source.items()}, compute_dtype)


class _Used(Mapping):
    """A view of a source that remembers which tensors were read, to report the ones nothing used."""

    def __init__(self, source: Mapping):
        self.source, self.read = source, set()
        self.path = getattr(source, "path", None)

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return self.source[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def report(self, prefix: str, table: str, what: str, exclude: tuple[str, ...] = ()) -> list[str]:
        """Log the tensors under ``prefix`` that were not read and are not optional (OPTIONAL_KEYS[table])."""
        rx = [re.compile(r) for r in OPTIONAL_KEYS[table]]
        left = [k for k in self.source if k.startswith(prefix) and k not in self.read
                and not (exclude and k.startswith(exclude)) and not any(r.search(k[len(prefix):]) for r in rx)]
        if left:
            log.warning("%s: %d tensor(s) in the file are not used (%s)", what, len(left), ", ".join(left[:3]))
        return left


# ---- conversion -------------------------------------------------------------------------------------

def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) as the originals store adaLN output -> (scale, shift) as diffusers reads it."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


_FLUX_TOP = {
    "time_in.in_layer.": "time_text_embed.timestep_embedder.linear_1.",
    "time_in.out_layer.": "time_text_embed.timestep_embedder.linear_2.",
    "vector_in.in_layer.": "time_text_embed.text_embedder.linear_1.",
    "vector_in.out_layer.": "time_text_embed.text_embedder.linear_2.",
    "guidance_in.in_layer.": "time_text_embed.guidance_embedder.linear_1.",
    "guidance_in.out_layer.": "time_text_embed.guidance_embedder.linear_2.",
    "txt_in.": "context_embedder.", "img_in.": "x_embedder.", "final_layer.linear.": "proj_out.",
}
_FLUX_DOUBLE = {
    "img_mod.lin.": "norm1.linear.", "txt_mod.lin.": "norm1_context.linear.",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj.": "attn.to_out.0.", "txt_attn.proj.": "attn.to_add_out.",
    "img_mlp.0.": "ff.net.0.proj.", "img_mlp.2.": "ff.net.2.",
    "txt_mlp.0.": "ff_context.net.0.proj.", "txt_mlp.2.": "ff_context.net.2.",
}
_FLUX_SINGLE = {"modulation.lin.": "norm.linear.", "norm.query_norm.scale": "attn.norm_q.weight",
                "norm.key_norm.scale": "attn.norm_k.weight", "linear2.": "proj_out."}


def _renamed(name: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def flux_bfl_to_diffusers(get: Callable[[str], torch.Tensor], names: Iterable[str], hidden: int) -> dict[str, torch.Tensor]:
    """Black Forest Labs' Flux names -> diffusers' FluxTransformer2DModel names, for any width (diffusers' own
    converter assumes 3072). ``names`` are relative to the transformer prefix; unknown ones are skipped."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name.startswith("final_layer.adaLN_modulation.1."):
            out["norm_out.linear." + name.rsplit(".", 1)[1]] = _swap_halves(get(name))
        elif top := _renamed(name, _FLUX_TOP):
            out[top] = get(name)
        elif m := re.match(r"double_blocks\.(\d+)\.(.+)", name):
            block, rest = f"transformer_blocks.{m[1]}.", m[2]
            if qkv := re.match(r"(img|txt)_attn\.qkv\.(weight|bias)", rest):
                targets = ("to_q", "to_k", "to_v") if qkv[1] == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
                for target, part in zip(targets, get(name).chunk(3, dim=0)):
                    out[f"{block}attn.{target}.{qkv[2]}"] = part
            elif mapped := _renamed(rest, _FLUX_DOUBLE):
                out[block + mapped] = get(name)
        elif m := re.match(r"single_blocks\.(\d+)\.(.+)", name):
            block, rest = f"single_transformer_blocks.{m[1]}.", m[2]
            if lin := re.match(r"linear1\.(weight|bias)", rest):
                t = get(name)
                q, k, v, mlp = t.split([hidden, hidden, hidden, t.shape[0] - 3 * hidden], dim=0)
                for target, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                    out[f"{block}{target}.{lin[1]}"] = part
            elif mapped := _renamed(rest, _FLUX_SINGLE):
                out[block + mapped] = get(name)
    return out


def _component(source: Mapping, prefix: str, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    skip_rx = [re.compile(r) for r in skip]
    return {k[len(prefix):]: source[k] for k in source
            if k.startswith(prefix) and not any(r.search(k[len(prefix):]) for r in skip_rx)}


# Prefixes in a file that are not the transformer's (they matter when the transformer's prefix is "").
_OTHER_COMPONENTS = (*VAE_PREFIXES, "text_encoders.", "cond_stage_model.", "conditioner.", "model_ema.")


def _transformer_state(spec: DitSpec, source: Mapping) -> dict[str, torch.Tensor]:
    p = spec.prefix
    names = [k[len(p):] for k in source if k.startswith(p) and not (p == "" and k.startswith(_OTHER_COMPONENTS))]
    names = [n for n in names if not any(re.search(r, n) for r in OPTIONAL_KEYS["dit"])]
    if spec.layout == "bfl":
        return flux_bfl_to_diffusers(lambda n: source[p + n], names, spec.transformer["num_attention_heads"]
                                     * spec.transformer["attention_head_dim"])
    if spec.layout == "diffusers":
        return {n: source[p + n] for n in names}
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    plain = {n: source[p + n] for n in names}  # the converter pops from (and renames in) the dict it gets
    try:
        return convert_sd3_transformer_checkpoint_to_diffusers(plain)
    except KeyError as exc:
        raise ModelFileError(f"SD3 transformer: missing {exc.args[0]}") from None


# ---- building modules -------------------------------------------------------------------------------

def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str,
            keep_fp32: tuple[str, ...] = ()) -> None:
    """Put converted tensors into a meta-device module; every tensor it uses must be there, with its shape."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelFileError(f"{what}: the file lacks {len(missing)} tensor(s) the model uses "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    unused = [k for k in state if k not in expected]
    if unused:
        log.warning("%s: %d tensor(s) in the file are not used (%s)", what, len(unused), ", ".join(unused[:3]))
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelFileError(f"{what}: {key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}")
    module.load_state_dict({k: usable_weight(what, k, state[k], tensor,
                                             torch.float32 if any(f in k.split(".") for f in keep_fp32) else dtype)
                            for k, tensor in expected.items()}, strict=True, assign=True)
    module.eval().requires_grad_(False)


def _where(source: Mapping) -> str:
    return getattr(getattr(source, "path", None), "name", None) or "model file"


def build_dit(spec: DitSpec, source, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The diffusers transformer (SD3Transformer2DModel or FluxTransformer2DModel) with the file's weights."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    source = _Used(_as_source(source, dtype))
    what = f"{_where(source)}: {spec.describe()} transformer"
    cls = FluxTransformer2DModel if spec.is_flux else SD3Transformer2DModel
    with init_empty_weights(include_buffers=False):
        model = cls(**spec.transformer)
    _assign(model, _transformer_state(spec, source), dtype, what)
    source.report(spec.prefix, "dit", what, _OTHER_COMPONENTS if spec.prefix == "" else ())
    return model


def build_dit_vae(config: dict, levels: int, source, prefix: str, dtype: torch.dtype = torch.float32):
    """A 16-channel AutoencoderKL (bundled under ``prefix``, or a stand-alone file with ``prefix=""``)."""
    source = _as_source(source, dtype)
    try:
        return build_vae(config, levels, source, prefix, dtype)
    except ModelFileError as exc:
        raise ModelFileError(f"{_where(source)}: {exc}") from None


def _clip_state(enc: EncoderSpec, source: Mapping) -> dict[str, torch.Tensor]:
    """Canonical transformers names (``text_model.*`` + ``text_projection.weight``) of a CLIP encoder."""
    if enc.layout == "openclip":
        state = convert_component(source, enc.root, "openclip")
    else:
        state = {}
        for key in source:
            if key.startswith(enc.root):
                name = key[len(enc.root):]
                if name.startswith(("embeddings.", "encoder.", "final_layer_norm.")) and not name.endswith("position_ids"):
                    state["text_model." + name] = source[key]
        if enc.projection:
            proj = source[enc.projection]
            state["text_projection.weight"] = proj.t() if enc.projection_transposed else proj
    return state


def build_encoder(enc: EncoderSpec, source, dtype: torch.dtype = torch.float32, projection: bool | None = None):
    """A transformers text encoder. CLIP: ``CLIPTextModelWithProjection`` when ``projection`` is True (SD3's
    pooled output) or None and the file has one; ``CLIPTextModel`` otherwise (Flux reads CLIP-L's pooler
    output). T5: ``T5EncoderModel``, its ``wo`` kept in fp32 under fp16 (it overflows otherwise)."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )
    from transformers.initialization import no_init_weights

    source = _Used(_as_source(source, dtype))
    what = f"{_where(source)}: {enc.title} text encoder"
    if enc.layout == "t5":
        with init_empty_weights(include_buffers=False), no_init_weights():
            model = T5EncoderModel(T5Config(**enc.config))
        state = {k[len(enc.prefix):]: source[k] for k in source if k.startswith(enc.prefix)
                 and k[len(enc.prefix):].startswith(("encoder.", "shared."))}
        shared = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
        if shared is not None:
            state["shared.weight"] = state["encoder.embed_tokens.weight"] = shared
        _assign(model, state, dtype, what, keep_fp32=("wo",) if dtype == torch.float16 else ())
        source.report(enc.prefix, "t5", what)
        return model
    state = _clip_state(enc, source)
    with_projection = bool(enc.projection) if projection is None else projection
    if with_projection and "text_projection.weight" not in state:
        log.warning("%s: no text_projection in the file; using identity", what)
        state["text_projection.weight"] = torch.eye(enc.config["hidden_size"])
    config = dict(enc.config)
    if with_projection:
        config["projection_dim"] = state["text_projection.weight"].shape[0]
    else:
        state.pop("text_projection.weight", None)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = cls(CLIPTextConfig(**config))
    if "text_model.embeddings.token_embedding.weight" not in model.state_dict():
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    _assign(model, state, dtype, what)
    source.report(enc.prefix, "clip", what)
    return model


def load_text_encoder(path_or_source, kind: str | None = None, dtype: torch.dtype = torch.float32,
                      projection: bool | None = None) -> tuple[torch.nn.Module, EncoderSpec]:
    """A stand-alone text-encoder file (models/text_encoder, models/clip). ``kind`` is checked if given."""
    source = _as_source(path_or_source, dtype)
    enc = detect_text_encoder(source.shapes, hint=kind if kind in ("clip_l", "clip_g") else None)
    if enc is None:
        raise ModelFileError(f"{_where(source)}: not a CLIP or T5 text encoder")
    if kind and enc.kind != kind:
        raise ModelFileError(f"{_where(source)}: is a {enc.title} encoder, not {_KIND_TITLE.get(kind, kind)}")
    return build_encoder(enc, source, dtype, projection), enc


# ---- finding companion files ------------------------------------------------------------------------

def _weight_files(dirs: Iterable[Path], suffixes=(".safetensors", ".gguf")) -> list[Path]:
    files = []
    for d in dirs:
        d = Path(d)
        if d.is_dir():
            files += sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    return files


def scan_text_encoders(dirs: Iterable[Path]) -> dict[str, list[tuple[Path, str]]]:
    """Every text-encoder file in ``dirs`` by kind, best precision first: ``{kind: [(path, format)]}``. Files
    are told apart by their keys and shapes (headers only), never by name; unreadable files are skipped."""
    found: dict[str, list[tuple[Path, str]]] = {}
    for path in _weight_files(dirs):
        try:
            source = open_weights(path)
            enc = detect_text_encoder(source.shapes)
        except (ModelFileError, OSError, ValueError) as exc:
            log.warning("skipping %s: %s", path.name, exc)
            continue
        if enc is not None:
            found.setdefault(enc.kind, []).append((path, source.precision()))
    for files in found.values():
        files.sort(key=lambda f: (-_PRECISION.get(f[1], 1), f[0].name))
    return found


def missing_encoder_message(family: str, kind: str, dirs: list[Path]) -> str:
    where = Path(dirs[0]) if dirs else Path("models/text_encoder")
    return f"{family} needs a {_KIND_TITLE[kind]} text encoder: put {_KIND_FILE[kind]} in {where}"


def find_text_encoders(dirs: Iterable[Path], needed: Iterable[str], optional: Iterable[str] = (),
                       family: str = "this model") -> dict[str, Path]:
    """One file per encoder kind: ``needed`` kinds must be found (else one-line ModelFileError saying what to
    put where), ``optional`` ones are returned when present. The higher precision wins."""
    dirs = [Path(d) for d in dirs]
    found = scan_text_encoders(dirs)
    picked: dict[str, Path] = {}
    for kind in list(needed) + list(optional):
        if found.get(kind):
            picked[kind] = found[kind][0][0]
        elif kind in needed:
            raise ModelFileError(missing_encoder_message(family, kind, dirs))
    return picked


def find_dit_vae(dirs: Iterable[Path], family: str) -> Path | None:
    """A 16-channel VAE file among ``dirs``. SD3's and Flux's VAEs have the same shapes, so when several are
    present the one whose name mentions the family (``ae``/``flux`` or ``sd3``) is preferred, then by name."""
    candidates = []
    for path in _weight_files(dirs, (".safetensors",)):
        try:
            shapes = open_weights(path).shapes
        except ModelFileError:
            continue
        if any(detect_dit_vae(shapes, pre) for pre in ("",) + VAE_PREFIXES):
            candidates.append(path)
    words = ("flux", "ae") if family == "flux" else ("sd3",)

    def named_for_family(p: Path) -> bool:
        stem = p.stem.lower()
        return any(w in re.split(r"[^a-z0-9]+", stem) or (len(w) > 2 and w in stem) for w in words)

    candidates.sort(key=lambda p: (not named_for_family(p), p.name))
    return candidates[0] if candidates else None


# ---- the whole model --------------------------------------------------------------------------------

@dataclass
class DitModel:
    path: Path
    spec: DitSpec
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # by kind; SD3 without T5 lacks "t5xxl"
    sources: dict[str, str] = field(default_factory=dict)  # component -> "checkpoint" or a file path
    dtype: torch.dtype = torch.float32


def load_dit(path: str | Path, dtype: torch.dtype = torch.float32, *, text_encoder_dirs: Iterable[Path] = (),
             vae_dirs: Iterable[Path] = (), vae_file: str | Path | None = None,
             vae_dtype: torch.dtype | None = None) -> DitModel:
    """An SD3 / Flux checkpoint with its encoders and VAE: bundled ones first, then files found by detection
    in ``text_encoder_dirs`` / ``vae_dirs`` (``vae_file`` overrides the VAE)."""
    path = Path(path)
    source = open_weights(path, dtype)
    try:
        spec = detect_dit(source.shapes)
    except ModelFileError as exc:
        raise ModelFileError(f"{path.name}: {exc}") from None
    if spec is None:
        raise ModelFileError(f"{path.name}: not an SD 3 or Flux.1 model")
    family = "Flux" if spec.is_flux else "SD 3"
    transformer = build_dit(spec, source, dtype)
    sources = {"transformer": "checkpoint"}
    vae_dtype = vae_dtype or dtype
    if vae_file is None and spec.vae is not None:
        vae = build_dit_vae(spec.vae, spec.vae_levels, source, spec.vae_prefix, vae_dtype)
        sources["vae"] = "checkpoint"
    else:
        vae_path = Path(vae_file) if vae_file else find_dit_vae(vae_dirs, spec.family)
        if vae_path is None:
            where = next(iter(vae_dirs), Path("models/VAE"))
            raise ModelFileError(f"{path.name}: {family} needs its 16-channel VAE: put "
                                 f"{'ae.safetensors' if spec.is_flux else 'the SD3 VAE'} in {where}")
        vae_source = open_weights(vae_path, vae_dtype)
        prefix = next((pre for pre in ("",) + VAE_PREFIXES if detect_dit_vae(vae_source.shapes, pre)), None)
        if prefix is None:
            raise ModelFileError(f"{vae_path.name}: not a 16-channel (SD3 / Flux) VAE")
        config, levels = detect_dit_vae(vae_source.shapes, prefix, spec.family)
        vae = build_dit_vae(config, levels, vae_source, prefix, vae_dtype)
        sources["vae"] = str(vae_path)
    encoders: dict[str, torch.nn.Module] = {}
    wanted = [k for k in spec.required_encoders + spec.optional_encoders if spec.bundled(k) is None]
    files = find_text_encoders(text_encoder_dirs, [k for k in wanted if k in spec.required_encoders],
                               [k for k in wanted if k in spec.optional_encoders], family) if wanted else {}
    projection = not spec.is_flux  # SD3 pools through the projections; Flux takes CLIP-L's pooler output
    for kind in spec.required_encoders + spec.optional_encoders:
        enc = spec.bundled(kind)
        if enc is not None:
            encoders[kind] = build_encoder(enc, source, dtype, projection if kind != "t5xxl" else None)
            sources[kind] = "checkpoint"
        elif kind in files:
            encoders[kind], _ = load_text_encoder(files[kind], kind, dtype, projection if kind != "t5xxl" else None)
            sources[kind] = str(files[kind])
    return DitModel(path, spec, transformer, vae, encoders, sources, dtype)
