"""IP-Adapter files and the CLIP vision encoders they read images with: detection, safe loading, conversion.

An IP-Adapter ("image prompt adapter", ``ip-adapter_sd15.safetensors``, ``ip-adapter-plus_sdxl_vit-h.bin``)
is not a ControlNet. It holds two parts, under two prefixes:

* ``image_proj.*``: the *projection* from a CLIP vision feature of the prompt image to a few extra context
  tokens. The plain adapters project the encoder's ``image_embeds`` (one vector) with a Linear + LayerNorm
  into ``tokens`` tokens (``proj``/``norm``); the "plus" adapters run a Perceiver resampler (``latents``,
  ``proj_in``, ``layers.N.0`` attention, ``layers.N.1`` feed-forward, ``proj_out``, ``norm_out``) over the
  encoder's penultimate hidden states; "full face" runs an MLP (``proj.0``/``proj.2``/``proj.3``) over them.
* ``ip_adapter.*``: for every cross-attention layer of the UNet, a key and a value projection of those
  tokens (``N.to_k_ip.weight``, ``N.to_v_ip.weight``). ``N`` counts 1, 3, 5... over the cross-attention
  layers in diffusers' ``attn_processors`` order (down blocks, up blocks, middle block) -- the order the
  adapters were trained with, and the order sd-webui-controlnet patches them in.

PuLID's file (``ip-adapter_pulid_sdxl_fp16.safetensors``, the extension's conversion of PuLID's weights) has
the same two parts; its projection is PuLID's ID encoder (``body.*``, ``mapping_i.*``, ``mapping_patch_i.*``),
built here as :class:`PuLIDProjection` under the file's names.

``.safetensors`` files keep both parts flat under the prefixes; the published ``.bin`` files nest them
(``{"image_proj": {...}, "ip_adapter": {...}}``). Both are read without running code from the file
(:mod:`.safe_load`), and both come out flat here.

:func:`detect_ip_adapter` is pure (``{key: shape}`` in, :class:`IPAdapterSpec` out; never the file name). The
projection is converted to diffusers' own modules (``ImageProjection``, ``IPAdapterPlusImageProjection``,
``IPAdapterFullImageProjection``) by a renaming table kept here, and loaded strictly: a tensor missing, extra
or misshapen is a one-line :class:`ModelFileError` naming the file.

CLIP vision encoders live in ``models/clip_vision`` under the names sd-webui-controlnet gives them
(``clip_h.pth`` = OpenCLIP ViT-H/14, ``clip_g.pth`` = ViT-bigG/14, ``clip_vitl.pth`` = OpenAI ViT-L/14). A
file may be in transformers' ``CLIPVisionModelWithProjection`` layout (what the extension downloads, and
``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors``; a whole ``CLIPModel`` also works, its text half is
skipped) or in OpenCLIP's own layout (``visual.transformer.resblocks.*``), which is renamed. The
architecture comes from the shapes; nothing is downloaded.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers.models.embeddings import (
    ImageProjection,
    IPAdapterFaceIDImageProjection,
    IPAdapterFullImageProjection,
    IPAdapterPlusImageProjection,
    IPAdapterPlusImageProjectionBlock,
)
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .errors import ModelFileError
from .safe_load import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, load_pickle, open_state_dict

Shapes = Mapping[str, tuple[int, ...]]

PROJ = "image_proj."
LAYERS = "ip_adapter."
DIM_HEAD = 64  # the resampler's head width in every published "plus" file (its heads = to_q rows / 64)
_CONTEXT_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}

# ---- CLIP vision: the extension's file names and image preprocessing ------------------------------------
CLIP_VISION_FILES = {"clip_h": "clip_h.pth", "clip_g": "clip_g.pth", "clip_vitl": "clip_vitl.pth"}
CLIP_VISION_SUFFIXES = (".pth", ".safetensors", ".bin", ".pt", ".ckpt")  # clip_h.safetensors also found
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics (every CLIP uses them)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# heads and activation of the published encoders by width; others: 64-wide heads, GELU
_CLIP_KNOWN = {1024: (16, "quick_gelu"), 1280: (16, "gelu"), 1664: (16, "gelu")}


# ==== IP-Adapter files ====================================================================================

@dataclass(frozen=True)
class IPAdapterSpec:
    """What an IP-Adapter file holds, read from its shapes.

    ``clip_dim`` is the width of the CLIP feature the projection takes: the encoder's ``image_embeds``
    (its projection width) for ``plain``, its hidden width (penultimate hidden states) for ``plus`` and
    ``full``. ``widths`` is each cross-attention layer's inner width, in the file's (and diffusers') order.
    """

    # "plain" | "plus" | "full" | "faceid" / "instantid" (an InsightFace face embedding in, not a CLIP feature;
    # InstantID's projection is a resampler like "plus") | "faceid_plus" (a face embedding and CLIP hidden states)
    # | "pulid" (a face embedding with EVA-CLIP's embedding, and EVA-CLIP's hidden states: clip_dim is their
    # concatenation's width, hidden_dims the hidden states', depth how many, tokens the tokens it makes)
    kind: str
    cross_attention_dim: int  # the UNet's context width (768 SD 1.x, 2048 SDXL)
    clip_dim: int
    widths: tuple[int, ...]
    tokens: int | None  # image tokens per image; None: one per CLIP hidden state (full face: 257)
    hidden_dims: int = 0  # plus: the resampler's width
    heads: int = 0
    depth: int = 0
    ffn_ratio: float = 4.0
    face_dim: int = 0  # faceid_plus: the face embedding's width, and its MLP's widening
    face_ratio: int = 2
    body: tuple[int, ...] = ()  # pulid: the hidden widths of its ID encoder's body MLP

    @property
    def feature(self) -> str:
        """What the projection reads: the CLIP ``image_embeds`` or ``penultimate`` hidden states, or an
        InsightFace ``face`` embedding."""
        return {"plain": "image_embeds", "faceid": "face", "instantid": "face",
                "faceid_plus": "face+penultimate", "pulid": "pulid"}.get(self.kind, "penultimate")

    @property
    def layers(self) -> int:
        return len(self.widths)

    def describe(self) -> str:
        family = _CONTEXT_WIDTH.get(self.cross_attention_dim, f"{self.cross_attention_dim}-wide context")
        kind = {"plain": "IP-Adapter", "plus": "IP-Adapter Plus", "full": "IP-Adapter Full Face",
                "faceid": "IP-Adapter FaceID", "instantid": "InstantID IP-Adapter",
                "faceid_plus": "IP-Adapter FaceID Plus", "pulid": "PuLID"}[self.kind]
        return f"{family} {kind}"


def is_ip_adapter(shapes: Shapes) -> bool:
    """Whether a file's keys are an IP-Adapter's (both parts present): what tells it from a ControlNet."""
    return any(k.startswith(PROJ) for k in shapes) and any(k.startswith(LAYERS) for k in shapes)


def _part(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def detect_ip_adapter(shapes: Shapes) -> IPAdapterSpec:
    """The :class:`IPAdapterSpec` of a file's flat ``{key: shape}``; a face-ID / PuLID / InstantID file or
    anything else is a :class:`ModelFileError` saying what it is."""
    proj, ip = _part(shapes, PROJ), _part(shapes, LAYERS)
    if not proj or not ip:
        raise ModelFileError("not an IP-Adapter (expected image_proj.* and ip_adapter.* tensors)")
    numbers = sorted(int(m[1]) for k in ip if (m := re.fullmatch(r"(\d+)\.to_k_ip\.weight", k)))
    if not numbers:
        raise ModelFileError("IP-Adapter without cross-attention layers (no ip_adapter.N.to_k_ip.weight)")
    if numbers != list(range(1, 2 * len(numbers), 2)):
        raise ModelFileError(f"IP-Adapter layers numbered {numbers[:6]}...; expected 1, 3, 5, ... with none missing")
    cross = ip["1.to_k_ip.weight"][1]
    widths = []
    for n in numbers:
        k, v = ip[f"{n}.to_k_ip.weight"], ip.get(f"{n}.to_v_ip.weight")
        if v is None:
            raise ModelFileError(f"IP-Adapter: missing ip_adapter.{n}.to_v_ip.weight")
        if len(k) != 2 or k != v or k[1] != cross:
            raise ModelFileError(f"IP-Adapter: ip_adapter.{n} has shapes {k} and {v}; expected two equal "
                                 f"(width, {cross}) matrices")
        widths.append(k[0])
    if any(k.startswith("perceiver_resampler.") for k in proj):
        return _faceid_plus_spec(proj, cross, tuple(widths))
    if "norm.weight" in proj and "proj.0.weight" in proj and "proj.3.weight" not in proj:
        need = ("proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.bias")
        if any(n not in proj for n in need):
            raise ModelFileError(f"IP-Adapter FaceID: incomplete projection (needs image_proj.{', image_proj.'.join(need)})")
        inner, face = proj["proj.0.weight"]
        rows = proj["proj.2.weight"][0]
        tokens, rest = divmod(rows, cross)
        if rest or not tokens or proj["proj.2.weight"][1] != inner or inner % face or proj["norm.weight"][0] != cross:
            raise ModelFileError(f"IP-Adapter FaceID: projection shapes {proj['proj.0.weight']} / "
                                 f"{proj['proj.2.weight']} / {proj['norm.weight']} do not make {cross}-wide tokens")
        return IPAdapterSpec("faceid", cross, face, tuple(widths), tokens, ffn_ratio=inner / face)
    if "body.0.weight" in proj or any(k.startswith("mapping_") for k in proj):
        return _pulid_spec(proj, cross, tuple(widths))
    if "proj.3.weight" in proj:
        need = ("proj.0.weight", "proj.2.weight")
        if any(n not in proj for n in need):
            raise ModelFileError("IP-Adapter Full Face: incomplete projection (proj.0 / proj.2 missing)")
        if proj["proj.2.weight"][0] != cross:
            raise ModelFileError(f"IP-Adapter Full Face: projection gives {proj['proj.2.weight'][0]}-wide tokens, "
                                 f"its layers take {cross}")
        return IPAdapterSpec("full", cross, proj["proj.0.weight"][1], tuple(widths), None)
    if "latents" in proj:
        need = ("proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight")
        if any(n not in proj for n in need):
            raise ModelFileError(f"IP-Adapter Plus: incomplete resampler (needs image_proj.{', image_proj.'.join(need)})")
        latents = proj["latents"]
        clip_dim = proj["proj_in.weight"][1]
        kind = "instantid" if clip_dim == 512 else "plus"  # InstantID's resampler takes the face embedding
        hidden = latents[2]
        heads, rest = divmod(proj["layers.0.0.to_q.weight"][0], DIM_HEAD)
        if len(latents) != 3 or rest or not heads:
            raise ModelFileError(f"IP-Adapter Plus: latents {latents} / to_q {proj['layers.0.0.to_q.weight']} do not "
                                 f"fit a resampler of {DIM_HEAD}-wide heads")
        if proj["proj_out.weight"][0] != cross:
            raise ModelFileError(f"IP-Adapter Plus: resampler gives {proj['proj_out.weight'][0]}-wide tokens, its "
                                 f"layers take {cross}")
        depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
        ffn = proj["layers.0.1.1.weight"][0] / hidden
        return IPAdapterSpec(kind, cross, clip_dim, tuple(widths), latents[1], hidden, heads, depth, ffn)
    if "proj.weight" in proj:
        rows, clip_dim = proj["proj.weight"]
        tokens, rest = divmod(rows, cross)
        if rest or not tokens:
            raise ModelFileError(f"IP-Adapter: image_proj.proj.weight has {rows} rows, not a whole number of "
                                 f"{cross}-wide tokens")
        return IPAdapterSpec("plain", cross, clip_dim, tuple(widths), tokens)
    raise ModelFileError(f"IP-Adapter with an unknown image projection ({', '.join(sorted(proj)[:4])}...)")


def _faceid_plus_spec(proj: dict[str, tuple[int, ...]], cross: int, widths: tuple[int, ...]) -> IPAdapterSpec:
    """FaceID Plus (v1 and v2 share the layout): the face embedding's MLP (``proj.0`` / ``proj.2``, ``norm``) makes
    the tokens a Perceiver resampler (``perceiver_resampler.*``) refines with CLIP's penultimate hidden states."""
    r = "perceiver_resampler."
    need = ("proj.0.weight", "proj.2.weight", "norm.weight", r + "proj_in.weight", r + "proj_out.weight",
            r + "norm_out.weight", r + "layers.0.0.to_q.weight", r + "layers.0.1.1.weight")
    if any(n not in proj for n in need):
        raise ModelFileError(f"IP-Adapter FaceID Plus: incomplete projection (needs image_proj.{', image_proj.'.join(need)})")
    inner, face = proj["proj.0.weight"]
    tokens, rest = divmod(proj["proj.2.weight"][0], cross)
    dim, clip_dim = proj[r + "proj_in.weight"]
    heads, extra = divmod(proj[r + "layers.0.0.to_q.weight"][0], DIM_HEAD)
    if rest or not tokens or inner % face or dim != cross or extra or not heads or proj["norm.weight"][0] != cross \
            or proj[r + "proj_out.weight"][0] != cross:
        raise ModelFileError(f"IP-Adapter FaceID Plus: projection shapes (proj.0 {proj['proj.0.weight']}, proj.2 "
                             f"{proj['proj.2.weight']}, resampler in {proj[r + 'proj_in.weight']}) do not make "
                             f"{cross}-wide tokens")
    depth = len({k.split(".")[2] for k in proj if k.startswith(r + "layers.")})
    ffn = proj[r + "layers.0.1.1.weight"][0] / dim
    return IPAdapterSpec("faceid_plus", cross, clip_dim, widths, tokens, dim, heads, depth, ffn,
                         face_dim=face, face_ratio=inner // face)


def _pulid_spec(proj: dict[str, tuple[int, ...]], cross: int, widths: tuple[int, ...]) -> IPAdapterSpec:
    """PuLID (the extension's ``ip-adapter_pulid_sdxl_fp16.safetensors``): an MLP (``body.0`` / ``body.3`` /
    ``body.6``, LayerNorms between) turns the face embedding and EVA-CLIP's embedding, concatenated, into
    ``tokens`` tokens; one pair of MLPs per EVA-CLIP hidden state (``mapping_i`` for its class token,
    ``mapping_patch_i`` for the mean of its patch tokens) adds one token each."""
    need = ("body.0.weight", "body.3.weight", "body.6.weight", "mapping_0.0.weight", "mapping_0.6.weight",
            "mapping_patch_0.0.weight")
    if any(n not in proj for n in need):
        raise ModelFileError(f"PuLID: incomplete projection (needs image_proj.{', image_proj.'.join(need)})")
    inner, width = proj["body.0.weight"]  # inner: PuLID's min(tokens x width / 4, 1024)
    tokens, rest = divmod(proj["body.6.weight"][0], cross)
    maps = len({k.split(".")[0] for k in proj if re.match(r"mapping_\d+\.", k)})
    hidden = proj["mapping_0.0.weight"][1]
    if rest or not tokens or proj["mapping_0.6.weight"][0] != cross or maps != len(
            {k.split(".")[0] for k in proj if k.startswith("mapping_patch_")}):
        raise ModelFileError(f"PuLID: projection shapes (body.6 {proj['body.6.weight']}, mapping_0.6 "
                             f"{proj['mapping_0.6.weight']}) do not make {cross}-wide tokens")
    return IPAdapterSpec("pulid", cross, width, widths, tokens + maps, hidden, depth=maps,
                         body=(inner, proj["body.3.weight"][0]))


def _mlp(widths: Sequence[int]) -> torch.nn.Sequential:
    """Linear, LayerNorm, LeakyReLU between each width and the next; a Linear last."""
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(widths[:-1]):
        layers += [torch.nn.Linear(a, b), torch.nn.LayerNorm(b), torch.nn.LeakyReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(widths[-2], widths[-1]))


class PuLIDProjection(torch.nn.Module):
    """PuLID's ID encoder (its authors' ``IDEncoder``, the extension's ``PuLIDEncoder``), in the file's names:
    ``id_cond`` (B×width: the antelopev2 face embedding, then EVA-CLIP's normalized embedding) through ``body``
    into ``tokens - depth`` tokens, then for each EVA-CLIP hidden state (B×N×hidden) ``mapping_i`` of its first
    (class) token plus the mean of ``mapping_patch_i`` over the others: one token each."""

    def __init__(self, spec: IPAdapterSpec):
        super().__init__()
        self.width = spec.cross_attention_dim
        self.body_tokens = spec.tokens - spec.depth
        self.body = _mlp((spec.clip_dim, *spec.body, self.width * self.body_tokens))
        for i in range(spec.depth):
            widths = (spec.hidden_dims, spec.hidden_dims, spec.hidden_dims, self.width)
            setattr(self, f"mapping_{i}", _mlp(widths))
            setattr(self, f"mapping_patch_{i}", _mlp(widths))
        self.depth = spec.depth

    def forward(self, id_cond: torch.Tensor, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(hidden) != self.depth:
            raise ValueError(f"PuLID takes {self.depth} EVA-CLIP hidden states, got {len(hidden)}")
        tokens = [self.body(id_cond).reshape(-1, self.body_tokens, self.width)]
        for i, state in enumerate(hidden):
            tokens.append(getattr(self, f"mapping_{i}")(state[:, :1])
                          + getattr(self, f"mapping_patch_{i}")(state[:, 1:]).mean(dim=1, keepdim=True))
        return torch.cat(tokens, dim=1)


class FaceIDPlusProjection(torch.nn.Module):
    """IP-Adapter FaceID Plus's projection, as the IP-Adapter authors' ``ProjModelFaceIdPlus``: the face
    embedding through an MLP and LayerNorm into ``tokens`` tokens, refined by a Perceiver resampler over CLIP's
    penultimate hidden states (diffusers' resampler blocks); v2 adds the MLP's tokens back (``shortcut``)."""

    def __init__(self, spec: IPAdapterSpec):
        super().__init__()
        from diffusers.models.attention import FeedForward

        self.tokens, self.width = spec.tokens, spec.cross_attention_dim
        self.proj = FeedForward(spec.face_dim, spec.cross_attention_dim * spec.tokens, activation_fn="gelu",
                                mult=spec.face_ratio)
        self.norm = torch.nn.LayerNorm(spec.cross_attention_dim)
        self.proj_in = torch.nn.Linear(spec.clip_dim, spec.hidden_dims)
        self.layers = torch.nn.ModuleList([IPAdapterPlusImageProjectionBlock(spec.hidden_dims, DIM_HEAD, spec.heads,
                                                                             spec.ffn_ratio) for _ in range(spec.depth)])
        self.proj_out = torch.nn.Linear(spec.hidden_dims, spec.cross_attention_dim)
        self.norm_out = torch.nn.LayerNorm(spec.cross_attention_dim)

    def forward(self, face: torch.Tensor, hidden: torch.Tensor, shortcut: bool = False, scale: float = 1.0
                ) -> torch.Tensor:
        ids = self.norm(self.proj(face).reshape(-1, self.tokens, self.width))
        x, latents = self.proj_in(hidden), ids
        for block in self.layers:
            latents = block(x, latents, latents)
        out = self.norm_out(self.proj_out(latents))
        return ids + scale * out if shortcut else out


def _flatten_nested(obj: dict) -> dict[str, torch.Tensor]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` (the published .bin) or flat keys -> flat keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, dict) and key in ("image_proj", "ip_adapter"):
            out.update({f"{key}.{k}": v for k, v in value.items() if isinstance(k, str) and isinstance(v, torch.Tensor)})
    return out


def read_ip_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    """An IP-Adapter file's tensors under flat ``image_proj.*`` / ``ip_adapter.*`` keys, read safely.
    A file that is not an IP-Adapter is a :class:`ModelFileError`."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        lazy = open_state_dict(path)
        tensors = {k: lazy[k] for k in lazy.shapes}
    elif suffix in PICKLE_SUFFIXES:
        tensors = _flatten_nested(load_pickle(path))
    else:
        raise ModelFileError(f"{path.name}: unsupported file type {suffix!r} (use .safetensors, .bin or .pth)")
    if not is_ip_adapter({k: tuple(v.shape) for k, v in tensors.items()}):
        raise ModelFileError(f"{path.name}: not an IP-Adapter (expected image_proj.* and ip_adapter.* tensors)")
    return tensors


def ip_adapter_shapes(path: str | Path) -> dict[str, tuple[int, ...]] | None:
    """The flat shapes of ``path`` if it is an IP-Adapter, else None (for listing and telling files apart;
    a safetensors file is judged from its header alone)."""
    path = Path(path)
    try:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            shapes = dict(open_state_dict(path).shapes)
        elif path.suffix.lower() in PICKLE_SUFFIXES:
            shapes = {k: tuple(v.shape) for k, v in _flatten_nested(load_pickle(path)).items()}
        else:
            return None
    except ModelFileError:
        return None
    return shapes if is_ip_adapter(shapes) else None


# ---- the projection's names: the published layout -> diffusers' modules ------------------------------------

_PLAIN = ((r"proj\.(weight|bias)", r"image_embeds.\1"), (r"norm\.(weight|bias)", r"norm.\1"))
_FULL = ((r"proj\.0\.(weight|bias)", r"ff.net.0.proj.\1"), (r"proj\.2\.(weight|bias)", r"ff.net.2.\1"),
         (r"proj\.3\.(weight|bias)", r"norm.\1"))
_PLUS = (
    (r"(latents|proj_in\.weight|proj_in\.bias|proj_out\.weight|proj_out\.bias|norm_out\.weight|norm_out\.bias)", r"\1"),
    (r"layers\.(\d+)\.0\.norm1\.(weight|bias)", r"layers.\1.ln0.\2"),  # over the image features
    (r"layers\.(\d+)\.0\.norm2\.(weight|bias)", r"layers.\1.ln1.\2"),  # over the latents
    (r"layers\.(\d+)\.0\.to_q\.weight", r"layers.\1.attn.to_q.weight"),
    (r"layers\.(\d+)\.0\.to_kv\.weight", (r"layers.\1.attn.to_k.weight", r"layers.\1.attn.to_v.weight")),
    (r"layers\.(\d+)\.0\.to_out\.weight", r"layers.\1.attn.to_out.0.weight"),
    (r"layers\.(\d+)\.1\.0\.(weight|bias)", r"layers.\1.ff.0.\2"),  # LayerNorm
    (r"layers\.(\d+)\.1\.1\.weight", r"layers.\1.ff.1.net.0.proj.weight"),  # Linear, GELU after it
    (r"layers\.(\d+)\.1\.3\.weight", r"layers.\1.ff.1.net.2.weight"),
)
_FACEID = ((r"proj\.0\.(weight|bias)", r"ff.net.0.proj.\1"), (r"proj\.2\.(weight|bias)", r"ff.net.2.\1"),
           (r"norm\.(weight|bias)", r"norm.\1"))
_FACEID_PLUS = (
    (r"proj\.0\.(weight|bias)", r"proj.net.0.proj.\1"), (r"proj\.2\.(weight|bias)", r"proj.net.2.\1"),
    (r"norm\.(weight|bias)", r"norm.\1"),
    *((r"perceiver_resampler\." + pattern, target) for pattern, target in _PLUS if "latents" not in pattern),
    (r"perceiver_resampler\.(proj_in|proj_out|norm_out)\.(weight|bias)", r"\1.\2"),
)
PROJECTION_RULES = {"plain": _PLAIN, "full": _FULL, "plus": _PLUS, "faceid": _FACEID, "instantid": _PLUS,
                    "faceid_plus": _FACEID_PLUS, "pulid": ((r"(.*)", r"\1"),)}  # PuLID: our module, its names


def projection_to_diffusers(spec: IPAdapterSpec, proj: Mapping[str, torch.Tensor]
                            ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The ``image_proj`` tensors (prefix removed) under diffusers' names: (state, diffusers name -> file
    name, file names no rule takes). The resampler's fused ``to_kv`` is split into ``to_k`` and ``to_v``."""
    state: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    unmapped = []
    for key, tensor in proj.items():
        for pattern, target in PROJECTION_RULES[spec.kind]:
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            if isinstance(target, tuple):
                for new, chunk in zip((m.expand(t) for t in target), tensor.chunk(len(target), dim=0)):
                    state[new], names[new] = chunk, PROJ + key
            else:
                new = m.expand(target)
                state[new], names[new] = tensor, PROJ + key
            break
        else:
            unmapped.append(PROJ + key)
    return state, names, unmapped


def build_projection(spec: IPAdapterSpec) -> torch.nn.Module:
    """diffusers' module for the spec's projection, on the meta device (weights come from the file)."""
    with init_empty_weights():
        if spec.kind == "plain":
            return ImageProjection(image_embed_dim=spec.clip_dim, cross_attention_dim=spec.cross_attention_dim,
                                   num_image_text_embeds=spec.tokens)
        if spec.kind == "faceid_plus":
            return FaceIDPlusProjection(spec)
        if spec.kind == "pulid":
            return PuLIDProjection(spec)
        if spec.kind == "faceid":
            return IPAdapterFaceIDImageProjection(image_embed_dim=spec.clip_dim,
                                                  cross_attention_dim=spec.cross_attention_dim,
                                                  mult=int(spec.ffn_ratio), num_tokens=spec.tokens)
        if spec.kind == "full":
            return IPAdapterFullImageProjection(image_embed_dim=spec.clip_dim,
                                                cross_attention_dim=spec.cross_attention_dim)
        return IPAdapterPlusImageProjection(embed_dims=spec.clip_dim, output_dims=spec.cross_attention_dim,
                                            hidden_dims=spec.hidden_dims, depth=spec.depth, dim_head=DIM_HEAD,
                                            heads=spec.heads, num_queries=spec.tokens, ffn_ratio=spec.ffn_ratio)


def _short(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], names: Mapping[str, str], what: str,
                 label: str) -> None:
    """Load ``state`` into ``module`` (on meta) exactly: every tensor needed, none extra, shapes equal."""
    expected = module.state_dict()
    missing = [names.get(k, k) for k in expected if k not in state]
    if missing:
        raise ModelFileError(f"{label}: missing {len(missing)} tensor(s) the {what} needs: {_short(missing)}")
    extra = [names.get(k, k) for k in state if k not in expected]
    if extra:
        raise ModelFileError(f"{label}: tensors the detected {what} does not have: {_short(extra)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelFileError(f"{label}: {names.get(key, key)} has shape {tuple(tensor.shape)}, the detected "
                                 f"{what} needs {tuple(expected[key].shape)}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    module.eval().requires_grad_(False)


@dataclass
class IPAdapterModel:
    """A loaded IP-Adapter: the projection (float32, as the extension runs it) and one key and one value
    projection per cross-attention layer, in the file's order (``to_k[i]`` is ``ip_adapter.{2i+1}``)."""

    spec: IPAdapterSpec
    projection: torch.nn.Module
    to_k: torch.nn.ModuleList
    to_v: torch.nn.ModuleList
    path: Path
    name: str

    @torch.no_grad()
    def project(self, feature: torch.Tensor, hidden: torch.Tensor | Sequence[torch.Tensor] | None = None,
                shortcut: bool = False) -> torch.Tensor:
        """CLIP feature (``image_embeds`` B×D, or hidden states B×N×D) or face embedding -> image tokens B×T×C,
        in float32; FaceID Plus also takes CLIP's ``hidden`` states (and v2 its ``shortcut``), PuLID its face
        and EVA-CLIP embeddings concatenated and the list of EVA-CLIP's ``hidden`` states."""
        param = next(self.projection.parameters())
        if self.spec.kind == "pulid":
            return self.projection(feature.to(param.device, torch.float32),
                                   [h.to(param.device, torch.float32) for h in hidden]).float()
        if self.spec.kind == "faceid_plus":
            return self.projection(feature.to(param.device, torch.float32), hidden.to(param.device, torch.float32),
                                   shortcut).float()
        return self.projection(feature.to(param.device, torch.float32)).float()


def load_ip_adapter(path: str | Path) -> IPAdapterModel:
    """Detect and load an IP-Adapter file (``.safetensors`` flat or ``.bin`` nested; no network access)."""
    path = Path(path)
    tensors = read_ip_adapter(path)
    try:
        spec = detect_ip_adapter({k: tuple(v.shape) for k, v in tensors.items()})
    except ModelFileError as exc:
        raise ModelFileError(f"{path.name}: {exc}") from None
    proj = {k[len(PROJ):]: v for k, v in tensors.items() if k.startswith(PROJ)}
    state, names, unmapped = projection_to_diffusers(spec, proj)
    if unmapped:
        raise ModelFileError(f"{path.name}: tensors the detected {spec.describe()} does not have: {_short(unmapped)}")
    projection = build_projection(spec)
    _load_strict(projection, state, names, spec.describe(), path.name)
    expected = {f"{2 * i + 1}.to_{kv}_ip.weight" for i in range(spec.layers) for kv in "kv"}
    extra = [LAYERS + k for k in tensors if k.startswith(LAYERS) and k[len(LAYERS):] not in expected]
    extra += [k for k in tensors if not k.startswith((PROJ, LAYERS))]
    if extra:
        raise ModelFileError(f"{path.name}: tensors the detected {spec.describe()} does not have: {_short(extra)}")

    def linears(kv: str) -> torch.nn.ModuleList:
        out = torch.nn.ModuleList()
        for i, width in enumerate(spec.widths):
            layer = torch.nn.Linear(spec.cross_attention_dim, width, bias=False, device="meta")
            layer.load_state_dict({"weight": tensors[f"{LAYERS}{2 * i + 1}.to_{kv}_ip.weight"].float()}, assign=True)
            out.append(layer.requires_grad_(False))
        return out

    return IPAdapterModel(spec, projection, linears("k"), linears("v"), path, path.stem)


# ==== CLIP vision encoders ================================================================================

_HF_ANCHOR = "vision_model.embeddings.class_embedding"
_OPENCLIP_ANCHOR = "visual.class_embedding"
_HF_IGNORED = (r"text_model\..*", r"text_projection\..*", r"logit_scale", r".*position_ids")


def clip_vision_layout(shapes: Shapes) -> tuple[str, str]:
    """(``"hf"`` or ``"openclip"``, the prefix before the encoder's names) of a CLIP file."""
    for key in shapes:
        if key.endswith(_HF_ANCHOR):
            return "hf", key[: -len(_HF_ANCHOR)]
    for key in shapes:
        if key.endswith(_OPENCLIP_ANCHOR):
            return "openclip", key[: -len(_OPENCLIP_ANCHOR)]
    raise ModelFileError("not a CLIP vision encoder (no vision_model.* or visual.* class embedding)")


_OPENCLIP_RULES = (
    (r"class_embedding", r"vision_model.embeddings.class_embedding"),
    (r"positional_embedding", r"vision_model.embeddings.position_embedding.weight"),
    (r"conv1\.weight", r"vision_model.embeddings.patch_embedding.weight"),
    (r"ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
    (r"ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm1.\2"),
    (r"transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm2.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)",
     r"vision_model.encoder.layers.\1.self_attn.out_proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.fc2.\2"),
)


def openclip_visual_to_hf(visual: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """OpenCLIP's ``visual.*`` tensors (prefix removed) under transformers' names, and the names no rule
    takes. The fused ``in_proj`` is split into q, k, v; ``proj`` (width × embed) is transposed into
    ``visual_projection.weight``."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in visual.items():
        if key == "proj":
            out["visual_projection.weight"] = tensor.t().contiguous()
            continue
        if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            for name, chunk in zip(("q", "k", "v"), tensor.chunk(3, dim=0)):
                out[f"vision_model.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = chunk
            continue
        for pattern, target in _OPENCLIP_RULES:
            if m := re.fullmatch(pattern, key):
                out[m.expand(target)] = tensor
                break
        else:
            unmapped.append(key)
    return out, unmapped


def clip_vision_config(state: Shapes) -> CLIPVisionConfig:
    """The encoder's config from transformers-layout shapes. Widths, depth, patch and image size are read;
    heads and activation (which shapes cannot tell) come from the published encoders' table by width."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ModelFileError(f"CLIP vision encoder without {key}")
        return tuple(state[key])

    hidden = shape("vision_model.embeddings.class_embedding")[0]
    patch = shape("vision_model.embeddings.patch_embedding.weight")[-1]
    positions = shape("vision_model.embeddings.position_embedding.weight")[0]
    side = round((positions - 1) ** 0.5)
    if side * side != positions - 1:
        raise ModelFileError(f"CLIP vision encoder with {positions} positions (not a square grid plus one)")
    layers = len({m[1] for k in state if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))})
    heads, act = _CLIP_KNOWN.get(hidden, (max(1, hidden // 64), "gelu"))
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=layers, num_attention_heads=heads, image_size=side * patch, patch_size=patch,
        projection_dim=shape("visual_projection.weight")[0], hidden_act=act, layer_norm_eps=1e-5,
        num_channels=shape("vision_model.embeddings.patch_embedding.weight")[1])


def clip_vision_state(tensors: Mapping[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """A CLIP file's vision encoder under ``CLIPVisionModelWithProjection``'s names (either layout)."""
    try:
        layout, prefix = clip_vision_layout({k: tuple(v.shape) for k, v in tensors.items()})
    except ModelFileError as exc:
        raise ModelFileError(f"{label}: {exc}") from None
    if layout == "openclip":
        visual = {k[len(prefix) + len("visual."):]: v for k, v in tensors.items() if k.startswith(prefix + "visual.")}
        state, unmapped = openclip_visual_to_hf(visual)
        if unmapped:
            raise ModelFileError(f"{label}: OpenCLIP tensors the vision encoder does not have: "
                                 f"{_short(['visual.' + u for u in unmapped])}")
        return state
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return {k: v for k, v in own.items() if not any(re.fullmatch(p, k) for p in _HF_IGNORED)}


def load_clip_vision(path: str | Path) -> CLIPVisionModelWithProjection:
    """A CLIP vision encoder file (either layout, any safe format) as a float32 transformers module; the
    extension runs it in float32 too."""
    path = Path(path)
    lazy = open_state_dict(path)
    state = clip_vision_state({k: lazy[k] for k in lazy.shapes}, path.name)
    try:
        config = clip_vision_config({k: tuple(v.shape) for k, v in state.items()})
    except ModelFileError as exc:
        raise ModelFileError(f"{path.name}: {exc}") from None
    with init_empty_weights():
        model = CLIPVisionModelWithProjection(config)
    _load_strict(model, state, {}, f"CLIP vision encoder ({config.hidden_size} wide, {config.num_hidden_layers} "
                 "layers)", path.name)
    return model


def find_clip_vision(folder: str | Path, name: str, needs: str = "the IP-Adapter") -> Path:
    """``models/clip_vision/clip_h.pth`` (or ``clip_h.safetensors``...) for ``name`` (``clip_h``, ``clip_g``,
    ``clip_vitl``); missing: a :class:`ModelFileError` saying what ``needs`` it and which file to put where."""
    folder = Path(folder)
    want = CLIP_VISION_FILES.get(name, f"{name}.pth")
    stem = Path(want).stem
    for suffix in (Path(want).suffix, *CLIP_VISION_SUFFIXES):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    hint = {"clip_h": "the OpenCLIP ViT-H/14 image encoder", "clip_g": "the OpenCLIP ViT-bigG/14 image encoder",
            "clip_vitl": "the OpenAI ViT-L/14 image encoder"}.get(name, "the CLIP image encoder")
    raise ModelFileError(f"{needs} needs {hint}: put {want} in {folder}")


def clip_pixels(image: np.ndarray) -> torch.Tensor:
    """The encoder's input (1×3×224×224 float32) for an H×W×3 RGB uint8 image, as the extension prepares it:
    stretched to 224×224 with area interpolation (no crop), scaled to [0, 1], normalized with CLIP's mean
    and std. An H×W×4 image's fourth channel is the unit's mask (255 = masked): the normalized pixels are
    multiplied by ``(255 - mask) / 255``, so masked pixels become CLIP's mean colour."""
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 or H×W×4 uint8 image, got {image.dtype} {image.shape}")
    resized = cv2.resize(np.ascontiguousarray(image), (CLIP_SIZE, CLIP_SIZE), interpolation=cv2.INTER_AREA)
    rgb = resized[:, :, :3].astype(np.float32) / np.float32(255.0)
    rgb = (rgb - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    if image.shape[2] == 4:
        keep = (255.0 - resized[:, :, 3].astype(np.float32)) / 255.0
        x = x * torch.from_numpy(keep)[None, None]
    return x.contiguous()


@torch.no_grad()
def clip_features(encoder: CLIPVisionModelWithProjection, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The features an adapter may read: ``image_embeds`` (B×P), ``penultimate`` (the hidden states of the
    last layer but one, B×N×D, IP-Adapter plus) and ``last_hidden_state`` (the last layer's, B×N×D, before
    the pooled output's LayerNorm: the T2I style adapter), on the CPU in float32."""
    param = next(encoder.parameters())
    out = encoder(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=True)
    return {"image_embeds": out.image_embeds.float().cpu(), "penultimate": out.hidden_states[-2].float().cpu(),
            "last_hidden_state": out.last_hidden_state.float().cpu()}


# ==== a small cache ======================================================================================

@dataclass
class FileCache:
    """Recently used objects built from files, keyed by (path, size, mtime) and an extra key; least recently
    used evicted. Loading happens outside the lock, so a slow load does not block other lookups."""

    capacity: int = 2
    _items: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    loads: int = 0

    def get(self, path: str | Path, load: Callable[[Path], object], extra: tuple = ()) -> object:
        path = Path(path)
        try:
            st = path.stat()
        except OSError:
            raise ModelFileError(f"{path}: no such file") from None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, *extra)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load(path)
        with self._lock:
            self.loads += 1
            self._items[key] = value
            while len(self._items) > max(self.capacity, 1):
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
