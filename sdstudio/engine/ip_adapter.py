"""IP-Adapter units (an image as a prompt) on the engine's per-step hooks, as sd-webui-controlnet runs them.

Before sampling (:func:`ip_adapter_hook`), the unit's image goes through the CLIP vision encoder its
preprocessor names (``ip-adapter_clip_sd15`` / ``ip-adapter_clip_h`` and ``ip-adapter_clip_sdxl_plus_vith``:
ViT-H ``clip_h.pth``; ``ip-adapter_clip_sdxl`` / ``ip-adapter_clip_g``: ViT-bigG ``clip_g.pth``;
``ip-adapter-auto``: the encoder the extension's preset for the model file names, else the one whose width
the adapter takes), and the adapter's projection turns the encoder's feature into a few context tokens. The
negative prompt's rows get the tokens of a blank image prompt instead: the projection of an all-zero
``image_embeds`` for the plain adapters, of the encoder's hidden states for an all-zero input for "plus"
and "full face" (the reference implementation's choice; the extension ships those hidden states for
ViT-H as a data file, and for the SDXL plus adapter even the projected tokens). The encoder runs in float32
(as the extension's) on the job's device, or the CPU for a ``low_vram`` unit, and goes back to the CPU after;
its features of the last few images are remembered, so a grid or a batch count encodes an image once.

During the pass (:meth:`IPAdapterHook.applied`) every cross-attention layer of the UNet gets a processor
built on diffusers' :class:`IPAdapterAttnProcessor2_0` with the adapter's key / value projections of that
layer, so the layer computes ``to_out(attention(q, text) + scale * attention(q, image tokens))``; ``scale``
is the unit's weight, or per transformer block (the extension's ``advanced_weighting``: 16 values for SD 1.x,
11 for SDXL, in its order: input blocks, middle block, output blocks). The processors take the image tokens
from the hook, not from the UNet's inputs (no ``added_cond_kwargs``, no ``encoder_hid_proj``), so SDXL's own
inputs pass untouched. The UNet's processors are given back after the pass, also on errors. Several
IP-Adapter units stack: a later unit's processor carries the earlier units' adapters too, as the
extension's list of patches does.

PuLID units (:func:`pulid_prompt`) make their tokens from the face's antelopev2 embedding and EVA02-CLIP of its
facexlib "features", and their processors compute the image attention as PuLID does (:class:`PuLIDAttention`,
by the unit's ``pulid_mode``) instead of diffusers' plain one.

The unit is active at sampling step ``i`` of ``n`` when ``guidance_start <= i / n <= guidance_end``; in
both passes of Hires. fix (the extension's IP-Adapter patch does not read ``hr_option``). Weight 0 installs
nothing. UNet calls made by other hooks with rows the denoiser did not announce (PAG's extra evaluation of
the prompt's rows) see the image prompt as the prompt's rows do.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from ..core.controlnet import SCRIPT_NAME, ControlNetError
from ..models.errors import ModelFileError
from ..models.ip_adapter import (
    FileCache,
    IPAdapterModel,
    IPAdapterSpec,
    clip_features,
    clip_pixels,
    find_clip_vision,
    load_clip_vision,
    load_ip_adapter,
)
from .hooks import StepHook, UNetCall

AUTO = "ip-adapter-auto"
# preprocessor (module, or its UI label) -> the encoder it runs (the extension's compiled preprocessor table)
ENCODER_OF_MODULE = {
    "ip-adapter_clip_sd15": "clip_h", "ip-adapter_clip_h": "clip_h",
    "ip-adapter_clip_sdxl": "clip_g", "ip-adapter_clip_g": "clip_g",
    "ip-adapter_clip_sdxl_plus_vith": "clip_h",
}
# the face modules: an InsightFace pack's face embedding instead of a CLIP feature, and the adapter kind that
# takes it (FaceID: buffalo_l, normed; InstantID: antelopev2 at 512, as it comes)
FACE_MODULES = {"ip-adapter_face_id": ("buffalo_l", "faceid"), "ip-adapter_face_id_plus": ("buffalo_l", "faceid_plus"),
                "instant_id_face_embedding": ("antelopev2", "instantid"), "ip-adapter_pulid": ("antelopev2", "pulid")}
FACE_KINDS = {kind: module for module, (_, kind) in FACE_MODULES.items()}
FACE_NAMES = {"faceid": "a FaceID", "faceid_plus": "a FaceID Plus", "instantid": "an InstantID", "pulid": "a PuLID"}
FACE = "face"
# ip-adapter-auto: the extension's presets, model file name -> encoder (the CLIP-based ones)
PRESET_ENCODERS = {
    "ip-adapter_sd15_light": "clip_h", "ip-adapter_sd15_light_v11": "clip_h", "ip-adapter_sd15_vit-G": "clip_g",
    "ip-adapter_sd15": "clip_h", "ip-adapter-plus_sd15": "clip_h", "ip-adapter_sd15_plus": "clip_h",
    "ip-adapter_plus_composition_sd15": "clip_h", "ip-adapter-plus-face_sd15": "clip_h",
    "ip-adapter-full-face_sd15": "clip_h", "ip-adapter_sdxl": "clip_g", "ip-adapter_sdxl_vit-h": "clip_h",
    "ip-adapter-plus_sdxl_vit-h": "clip_h", "ip-adapter_plus_composition_sdxl": "clip_h",
    "ip-adapter-plus-face_sdxl_vit-h": "clip_h",
}
# the published encoders' widths: (image_embeds width, hidden width) -> name, for files no preset names
_ENCODER_WIDTHS = {"clip_h": (1024, 1280), "clip_g": (1280, 1664)}

ADAPTERS = FileCache(capacity=2)  # loaded IP-Adapter files (CPU, float32)
ENCODERS = FileCache(capacity=1)  # CLIP vision encoders (CPU, float32: ViT-H is 2.5 GB)


# ---- which encoder -------------------------------------------------------------------------------------
def _model_stem(title: str) -> str:
    """``ip-adapter_sd15 [6a3f6166]`` -> ``ip-adapter_sd15``."""
    return title.split("[")[0].strip()


def encoder_for(module: str, model_title: str, spec: IPAdapterSpec, where: str = SCRIPT_NAME) -> str:
    """The encoder a unit runs: a CLIP vision encoder (``clip_h`` / ``clip_g``) by its module, or for
    ``ip-adapter-auto`` by the extension's preset for the model's name, else the published encoder whose width
    the adapter takes; ``face`` (InsightFace) for a face adapter (FaceID, FaceID Plus, InstantID: told by
    its shapes, so ``ip-adapter-auto`` needs no preset). A module that does not fit the adapter's input is a
    :class:`ControlNetError` naming the one that does."""
    key = module.strip()
    stem = _model_stem(model_title)
    fitting = FACE_KINDS.get(spec.kind)  # the face module the adapter takes (None: a CLIP adapter)
    if key != AUTO and (key in FACE_MODULES or fitting) and key != fitting:
        if fitting:
            raise ControlNetError(f"{where}: the IP-Adapter {stem} is {FACE_NAMES[spec.kind]} adapter: it takes an "
                                  f"InsightFace face embedding; pick the {fitting} preprocessor (or ip-adapter-auto)")
        raise ControlNetError(f"{where}: the {key} preprocessor gives a face embedding for "
                              f"{FACE_NAMES[FACE_MODULES[key][1]].split(' ', 1)[1]} adapters; {stem} takes a CLIP "
                              f"feature: pick ip-adapter_clip_sd15 / ip-adapter_clip_sdxl")
    if fitting:
        return FACE
    if key in ENCODER_OF_MODULE:
        return ENCODER_OF_MODULE[key]
    if key != AUTO:
        raise ControlNetError(f"{where}: {module!r} is not an IP-Adapter preprocessor "
                              f"({', '.join([*ENCODER_OF_MODULE, *FACE_MODULES, AUTO])})")
    if stem in PRESET_ENCODERS:
        return PRESET_ENCODERS[stem]
    index = 0 if spec.feature == "image_embeds" else 1
    for name, widths in _ENCODER_WIDTHS.items():
        if widths[index] == spec.clip_dim:
            return name
    raise ControlNetError(f"{where}: ip-adapter-auto cannot tell which image encoder {stem} takes (a "
                          f"{spec.clip_dim}-wide CLIP feature); pick ip-adapter_clip_sd15 or ip-adapter_clip_sdxl")


# ---- the image prompt ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PuLIDAttention:
    """How a PuLID unit's image attention is computed (its authors' two settings, the extension's
    ``PuLIDAttnSetting``): ``zeros`` all-zero tokens are appended to the ID tokens before their key and value
    projections (their keys and values are 0: they only take attention weight), then

    * ``ortho`` ("Extremely style"): the part of the ID attention's output parallel to the layer's input
      ``h`` is taken away: ``o - (Σ h·o / Σ h·h) h``, the sums over the positions (per channel);
    * ``ortho_v2`` ("Fidelity"): that part is scaled by the attention weight the ID encoder's first five tokens
      get, averaged over the heads (``a``): ``o + (a - 1) (Σ h·o / Σ h·h) h``.

    Both in float32 (the extension's ``attn_map`` is in the query's dtype; the same in float32)."""

    zeros: int
    ortho: bool = False
    ortho_v2: bool = False

    def __call__(self, hidden: torch.Tensor, query: torch.Tensor, tokens: torch.Tensor, to_k, to_v) -> torch.Tensor:
        """``hidden``: the layer's input (B×N×C); ``query``: B×heads×N×d; ``tokens``: B×T×context."""
        batch, heads, _, dim = query.shape
        if self.zeros:
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], self.zeros, tokens.shape[2])], dim=1)
        key, value = (f(tokens).view(batch, -1, heads, dim).transpose(1, 2) for f in (to_k, to_v))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, heads * dim)
        if not (self.ortho or self.ortho_v2):
            return out
        h, o = hidden.float(), out.float()
        parallel = (h * o).sum(dim=-2, keepdim=True) / (h * h).sum(dim=-2, keepdim=True) * h
        if self.ortho_v2:
            weights = (query.float() @ key.float().transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
            share = weights[:, :, :5].sum(dim=-1, keepdim=True)
            return (o + (share - 1) * parallel).to(out.dtype)
        return (o - parallel).to(out.dtype)


PULID_ATTENTION = {"Fidelity": PuLIDAttention(8, ortho_v2=True), "Extremely style": PuLIDAttention(16, ortho=True)}


class ImagePrompt:
    """One unit's image tokens (1×T×C, float32) for the prompt's rows (``cond``) and the negative prompt's
    (``uncond``), and what the current UNet call needs: which rows are negative, and whether it is on."""

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor):
        if cond.shape != uncond.shape or cond.ndim != 3 or cond.shape[0] != 1:
            raise ValueError(f"image prompt tokens of shapes {tuple(cond.shape)} / {tuple(uncond.shape)}")
        self.cond, self.uncond = cond, uncond
        self.on = False
        self.rows: tuple[bool, ...] | None = None  # per row of the current call: True = negative prompt
        self._tokens: dict[tuple, torch.Tensor] = {}
        self.region: torch.Tensor | None = None  # the unit's effective region mask (1, 1, H, W), or None
        self.latent: tuple[int, int] = (0, 0)  # the current call's latent size (for the region's resolution)
        self.pulid: PuLIDAttention | None = None  # a PuLID unit's attention (else IP-Adapter's plain one)

    @property
    def count(self) -> int:
        return self.cond.shape[1]

    def begin_call(self, uncond_rows: Sequence[bool], on: bool, latent: tuple[int, int] = (0, 0)) -> None:
        self.rows, self.on, self.latent = tuple(bool(u) for u in uncond_rows), on, tuple(latent)
        self._tokens = {}

    def region_weights(self, queries: int, like: torch.Tensor) -> torch.Tensor | None:
        """(1, queries, 1): the region mask at a layer of ``queries`` positions, as the extension sizes it
        (latent size × sqrt(queries / latent area), bilinear); None without a region."""
        if self.region is None:
            return None
        h, w = self.latent
        if h * w == 0:
            raise ValueError("an effective region mask needs the call's latent size")
        factor = math.sqrt(queries / (h * w))
        size = (int(h * factor), int(w * factor))
        if size[0] * size[1] != queries:
            raise ValueError(f"a layer of {queries} positions does not fit the latent's {h}x{w}")
        mask = torch.nn.functional.interpolate(self.region.to(like.device, like.dtype), size=size, mode="bilinear")
        return mask.reshape(1, queries, 1)

    def end_pass(self) -> None:
        self.rows, self.on, self._tokens = None, False, {}

    def for_rows(self, uncond_rows: Sequence[bool], batch: int, device: torch.device, dtype: torch.dtype
                 ) -> torch.Tensor:
        """batch×T×C for a call's rows given directly (an InstantID ControlNet's context); rows the call does
        not announce get the prompt's tokens."""
        rows = tuple(bool(u) for u in uncond_rows)
        rows = rows if len(rows) == batch else (False,) * batch
        c, u = self.cond.to(device, dtype), self.uncond.to(device, dtype)
        return torch.cat([u if negative else c for negative in rows])

    def tokens(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """batch×T×C: each row's tokens (rows of an unannounced call: the prompt's)."""
        rows = self.rows if self.rows is not None and len(self.rows) == batch else (False,) * batch
        key = (rows, device, dtype)
        if key not in self._tokens:
            c, u = self.cond.to(device, dtype), self.uncond.to(device, dtype)
            self._tokens[key] = torch.cat([u if negative else c for negative in rows])
        return self._tokens[key]


class ImagePromptAttnProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' IP-Adapter attention, fed by the hooks' image prompts instead of the UNet's inputs.

    ``prompts[i]`` goes through ``to_k_ip[i]`` / ``to_v_ip[i]`` (that unit's adapter layers, on the pass's
    device) and is added with ``weights[i]`` while its hook has it on."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, prompts: Sequence[ImagePrompt],
                 weights: Sequence[float], to_k: Sequence[torch.nn.Linear], to_v: Sequence[torch.nn.Linear]):
        # the attributes diffusers' __init__ sets, with the adapters' layers instead of fresh random ones (its
        # own __init__ would allocate those, or need accelerate's process-wide meta patch to avoid it)
        torch.nn.Module.__init__(self)
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.num_tokens = [p.count for p in prompts]
        self.weights = [float(w) for w in weights]
        self.scale = list(self.weights)
        self.to_k_ip = torch.nn.ModuleList(to_k)
        self.to_v_ip = torch.nn.ModuleList(to_v)
        self.prompts = list(prompts)

    def extended(self, prompt: ImagePrompt, weight: float, to_k: torch.nn.Linear, to_v: torch.nn.Linear
                 ) -> ImagePromptAttnProcessor:
        """This processor with one more unit's adapter after its own."""
        return ImagePromptAttnProcessor(self.hidden_size, self.cross_attention_dim, [*self.prompts, prompt],
                                        [*self.weights, weight], [*self.to_k_ip, to_k], [*self.to_v_ip, to_v])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale: float = 1.0, ip_adapter_masks=None):
        if encoder_hidden_states is None:
            raise ValueError("an IP-Adapter processor on a self-attention layer")
        if isinstance(encoder_hidden_states, tuple):  # someone gave diffusers' own tuple: ours come after
            encoder_hidden_states, given = encoder_hidden_states
            if given:
                raise ValueError("image prompt tokens given both through the UNet's inputs and the hooks")
        batch = hidden_states.shape[0]
        self.scale = [w if p.on else 0.0 for p, w in zip(self.prompts, self.weights)]
        tokens = [p.tokens(batch, hidden_states.device, hidden_states.dtype) for p in self.prompts]
        if any(p.region is not None or p.pulid is not None for p in self.prompts):
            return self._own(attn, hidden_states, encoder_hidden_states, tokens, attention_mask, temb)
        return super().__call__(attn, hidden_states, (encoder_hidden_states, tokens), attention_mask, temb)

    def _own(self, attn, hidden_states, context, tokens, attention_mask, temb):
        """diffusers' IP-Adapter attention, each unit's image attention (PuLID's for a PuLID unit) × scale × its
        region mask (the extension's ``apply_effective_region_mask(ip_out * weight)``)."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.to_q(hidden_states)
        heads = attn.heads
        q = query.view(batch, -1, heads, query.shape[-1] // heads).transpose(1, 2)

        def attend(keys: torch.Tensor, values: torch.Tensor, mask=None) -> torch.Tensor:
            k, v = (t.view(batch, -1, heads, q.shape[-1]).transpose(1, 2) for t in (keys, values))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
            return out.transpose(1, 2).reshape(batch, -1, heads * q.shape[-1]).to(query.dtype)

        out = attend(attn.to_k(context), attn.to_v(context), attention_mask)
        for prompt, scale, to_k, to_v, image in zip(self.prompts, self.scale, self.to_k_ip, self.to_v_ip, tokens):
            if scale == 0:
                continue
            if prompt.pulid is not None:
                image_out = prompt.pulid(hidden_states, q, image, to_k, to_v).to(query.dtype) * scale
            else:
                image_out = attend(to_k(image), to_v(image)) * scale
            region = prompt.region_weights(image_out.shape[1], image_out)
            out = out + (image_out if region is None else image_out * region)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ---- the UNet's cross-attention layers ---------------------------------------------------------------------
@dataclass(frozen=True)
class CrossLayer:
    """One cross-attention layer: its ``Attention`` module, its place in the IP-Adapter file's order, and the
    transformer block it belongs to (the extension's ``transformer_index``, for per-block weights)."""

    path: str  # e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn2
    attn: torch.nn.Module
    transformer: int


def cross_attention_layers(unet: torch.nn.Module) -> list[CrossLayer]:
    """The UNet's cross-attention layers in diffusers' ``attn_processors`` order (down, up, middle: the order
    IP-Adapter files number them), each with its transformer block index, counted down, middle, up."""
    paths = [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn2.processor")]
    blocks = list(dict.fromkeys(p.split(".transformer_blocks.")[0] for p in paths))
    ordered = ([b for b in blocks if b.startswith("down_blocks.")] + [b for b in blocks if b.startswith("mid_block.")]
               + [b for b in blocks if not b.startswith(("down_blocks.", "mid_block."))])
    index = {b: i for i, b in enumerate(ordered)}
    return [CrossLayer(p, unet.get_submodule(p), index[p.split(".transformer_blocks.")[0]]) for p in paths]


def _on(layer: torch.nn.Linear, device: torch.device, dtype: torch.dtype) -> torch.nn.Linear:
    """``layer`` for the pass's device and dtype: a copy, so the cached adapter stays float32 on the CPU (the
    copies go when the pass's processors do)."""
    if layer.weight.device == device and layer.weight.dtype == dtype:
        return layer
    copy = torch.nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    copy.load_state_dict({"weight": layer.weight.detach().to(device, dtype)}, assign=True)
    return copy.requires_grad_(False)


def _family(width: int) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(width, f"{width}-wide context")


# ---- the hook ---------------------------------------------------------------------------------------------
class IPAdapterHook(StepHook):
    """One enabled IP-Adapter unit's per-step hook (see the module's docstring)."""

    def __init__(self, owner: str, model: IPAdapterModel, prompt: ImagePrompt, weight: float,
                 advanced_weighting: Sequence[float] | None, start: float, end: float, device: torch.device,
                 dtype: torch.dtype):
        self.owner, self.model, self.prompt = owner, model, prompt
        self.weight = float(weight)
        self.advanced = None if advanced_weighting is None else [float(w) for w in advanced_weighting]
        self.start, self.end = float(start), float(end)
        self.device, self.dtype = device, dtype

    def active(self, step) -> bool:
        """Every call: the window is applied in :meth:`unet_inputs`, so the processors are off outside it."""
        return True

    def in_window(self, step) -> bool:
        return self.start <= step.fraction <= self.end

    def layer_weight(self, transformer: int) -> float:
        """The scale of the layers of transformer block ``transformer`` (the extension's ``advanced_weighting``
        keeps only its positive entries: the rest are 0)."""
        if self.advanced is None:
            return self.weight
        w = self.advanced[transformer]
        return w if w > 0 else 0.0

    def _check(self, layers: list[CrossLayer]) -> None:
        spec, name = self.model.spec, self.model.name
        cross = layers[0].attn.to_k.in_features if layers else 0
        if cross != spec.cross_attention_dim:
            raise ControlNetError(f"{self.owner}: the IP-Adapter {name} is for {_family(spec.cross_attention_dim)} "
                                  f"models ({spec.cross_attention_dim}-wide context), this checkpoint is "
                                  f"{_family(cross)} ({cross}); pick an IP-Adapter made for it")
        if len(layers) != spec.layers:
            raise ControlNetError(f"{self.owner}: the IP-Adapter {name} has {spec.layers} cross-attention layers, "
                                  f"this checkpoint's UNet {len(layers)}; pick an IP-Adapter made for it")
        for i, layer in enumerate(layers):
            if layer.attn.to_k.out_features != spec.widths[i]:
                raise ControlNetError(f"{self.owner}: the IP-Adapter {name}'s layer {2 * i + 1} is "
                                      f"{spec.widths[i]} wide, the UNet's {layer.path} "
                                      f"{layer.attn.to_k.out_features}; pick an IP-Adapter made for this model")
        blocks = len({layer.transformer for layer in layers})
        if self.advanced is not None and len(self.advanced) != blocks:
            raise ControlNetError(f"{self.owner}: advanced_weighting has {len(self.advanced)} weights; an "
                                  f"IP-Adapter on this model takes one per transformer block ({blocks})")

    @contextlib.contextmanager
    def applied(self, unet):
        layers = cross_attention_layers(unet)
        self._check(layers)
        chosen = [(i, layer, self.layer_weight(layer.transformer)) for i, layer in enumerate(layers)]
        chosen = [(i, layer, w) for i, layer, w in chosen if w != 0.0]
        if not chosen:  # weight 0: the extension's patch adds exactly nothing
            yield
            return
        installed: list[tuple[torch.nn.Module, object, ImagePromptAttnProcessor]] = []
        try:
            for i, layer, w in chosen:
                before = layer.attn.processor
                k, v = _on(self.model.to_k[i], self.device, self.dtype), _on(self.model.to_v[i], self.device, self.dtype)
                if isinstance(before, ImagePromptAttnProcessor):
                    mine = before.extended(self.prompt, w, k, v)
                else:
                    mine = ImagePromptAttnProcessor(self.model.spec.widths[i], self.model.spec.cross_attention_dim,
                                                    [self.prompt], [w], [k], [v])
                layer.attn.set_processor(mine)
                installed.append((layer.attn, before, mine))
            yield
        finally:
            for attn, before, mine in reversed(installed):
                if attn.processor is mine:
                    attn.set_processor(before)
            self.prompt.end_pass()

    def unet_inputs(self, call: UNetCall):  # no UNet inputs: the processors read the prompt's state
        self.prompt.begin_call(call.uncond, self.in_window(call.step), tuple(call.x.shape[-2:]))


# ---- making one ---------------------------------------------------------------------------------------------
_FEATURES: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
_FEATURES_LOCK = threading.Lock()
FEATURE_CACHE_SIZE = 8


def encoder_features(encoder, encoder_key: tuple, pixels: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """The encoder's features of ``pixels``, remembered by content (a grid or a batch count re-uses them);
    ``encoder_key`` names the encoder's file (empty: not remembered)."""
    key = (encoder_key, hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16).hexdigest())
    with _FEATURES_LOCK:
        if encoder_key and key in _FEATURES:
            _FEATURES.move_to_end(key)
            return _FEATURES[key]
    moved = device.type != "cpu"
    if moved:
        encoder.to(device)
    try:
        out = clip_features(encoder, pixels)
    finally:
        if moved:
            encoder.to("cpu")
    if not encoder_key:
        return out
    with _FEATURES_LOCK:
        _FEATURES[key] = out
        while len(_FEATURES) > FEATURE_CACHE_SIZE:
            _FEATURES.popitem(last=False)
    return out


def image_prompt(model: IPAdapterModel, encoder, image: np.ndarray, device: torch.device | None = None,
                 encoder_key: tuple = (), where: str = SCRIPT_NAME) -> ImagePrompt:
    """The unit's image tokens and the blank image prompt's (see the module's docstring)."""
    spec = model.spec
    device = device or torch.device("cpu")
    pixels = clip_pixels(image)
    feature = encoder_features(encoder, encoder_key, pixels, device)[spec.feature]
    if feature.shape[-1] != spec.clip_dim:
        what = "image embedding" if spec.feature == "image_embeds" else "hidden states"
        raise ControlNetError(f"{where}: the IP-Adapter {model.name} takes a {spec.clip_dim}-wide CLIP {what}; this "
                              f"image encoder gives {feature.shape[-1]}: pick the preprocessor of its encoder "
                              f"(ip-adapter_clip_sd15 = ViT-H, ip-adapter_clip_sdxl = ViT-bigG)")
    if spec.feature == "image_embeds":
        blank = torch.zeros_like(feature)
    else:
        blank = encoder_features(encoder, encoder_key, torch.zeros_like(pixels), device)["penultimate"]
    return ImagePrompt(model.project(feature).cpu(), model.project(blank).cpu())


def clip_encoder(clip_vision_dir: str | Path, name: str, where: str, needs: str = "the IP-Adapter"
                 ) -> tuple[object, tuple]:
    """The CLIP vision encoder ``name`` (``clip_h``, ``clip_g``, ``clip_vitl``) from ``models/clip_vision``,
    loaded once for the process (:data:`ENCODERS`), and the key its features are remembered under; a missing
    or unusable file is a :class:`ControlNetError` starting with ``where`` and saying what ``needs`` it."""
    try:
        clip_file = find_clip_vision(clip_vision_dir, name, needs)
        encoder = ENCODERS.get(clip_file, load_clip_vision)
    except ModelFileError as exc:
        raise ControlNetError(f"{where}: {exc}") from None
    return encoder, (str(clip_file.resolve()), clip_file.stat().st_mtime_ns)


def encoder_device(unit, device: torch.device) -> torch.device:
    """Where a unit's CLIP encoder runs: the CPU for a ``low_vram`` unit, else the job's device."""
    return torch.device("cpu") if unit.low_vram else torch.device(device)


def face_prompt(model: IPAdapterModel, faces, image: np.ndarray, where: str = SCRIPT_NAME, clip=None
                ) -> ImagePrompt:
    """A face adapter's tokens, and the projection of zeros for the negative prompt: FaceID projects the
    largest face's normed InsightFace embedding (the extension's ``_get_image_embeds_faceid``), InstantID's
    resampler the embedding as it comes, of the face in the picture at 512 (``_get_image_embeds_instantid``).
    FaceID Plus also refines them with CLIP ViT-H's penultimate hidden states of the picture (``clip``:
    (encoder, key, device); the negative prompt's: of an all-zero input), v2 (its name says so) adding the
    face tokens back, as the extension's ``_get_image_embeds_faceid_plus``."""
    from .annotators.insightface import instant_id_face, largest_face

    spec = model.spec
    if spec.kind == "instantid":
        face = instant_id_face(faces, image, where)[0]
        embedding = torch.from_numpy(face.embedding).float()[None, None]
    else:
        face = largest_face(faces.faces(np.asarray(image)[:, :, :3]), where)
        embedding = torch.from_numpy(face.normed_embedding).float()[None]
    width = spec.face_dim if spec.kind == "faceid_plus" else spec.clip_dim
    if embedding.shape[-1] != width:
        raise ControlNetError(f"{where}: the IP-Adapter {model.name} takes a {width}-wide face "
                              f"embedding; this face recognizer gives {embedding.shape[-1]}")
    if spec.kind != "faceid_plus":
        return ImagePrompt(model.project(embedding).cpu(), model.project(torch.zeros_like(embedding)).cpu())
    encoder, key, device = clip
    pixels = clip_pixels(image)
    hidden = encoder_features(encoder, key, pixels, device)["penultimate"]
    if hidden.shape[-1] != spec.clip_dim:
        raise ControlNetError(f"{where}: the IP-Adapter {model.name} takes {spec.clip_dim}-wide CLIP hidden states; "
                              f"this image encoder gives {hidden.shape[-1]}")
    blank = encoder_features(encoder, key, torch.zeros_like(pixels), device)["penultimate"]
    v2 = "v2" in model.name
    return ImagePrompt(model.project(embedding, hidden, v2).cpu(),
                       model.project(torch.zeros_like(embedding), blank, v2).cpu())


def pulid_prompt(model: IPAdapterModel, faces, image: np.ndarray, annotators_dir: Path, clip_vision_dir: Path,
                 where: str = SCRIPT_NAME) -> ImagePrompt:
    """PuLID's tokens, as the extension's ``ip-adapter_pulid`` makes them: the antelopev2 embedding of the largest
    face in the picture at 512 (``instant_id_face_embedding``'s, not normed), then EVA02-CLIP-L-14-336 of the
    centre face's "features" (facexlib's RetinaFace, alignment to 512 and BiSeNet parsing: the face gray on
    white), its normalized embedding concatenated to the face embedding and its five hidden states, through the
    ID encoder; the negative prompt's tokens are the encoder's of zeros. The EVA-CLIP file is looked for in
    ``clip_vision_dir`` too."""
    from .annotators import eva_clip, face_parsing
    from .annotators.insightface import instant_id_face

    face = instant_id_face(faces, image, where)[0]
    embedding = torch.from_numpy(face.embedding).float()[None]
    features = face_parsing.run(annotators_dir, np.ascontiguousarray(image[:, :, :3]), where=f"{where} (facexlib)")
    vit = eva_clip.run(annotators_dir, features, Path(clip_vision_dir), where=f"{where} (EVA02-CLIP-L-14-336)")
    id_cond = torch.cat([embedding, vit.id_cond_vit.float().cpu()], dim=-1)
    hidden = [h.float().cpu() for h in vit.id_vit_hidden]
    spec = model.spec
    if id_cond.shape[-1] != spec.clip_dim or len(hidden) != spec.depth or hidden[0].shape[-1] != spec.hidden_dims:
        raise ControlNetError(f"{where}: the PuLID model {model.name} takes a {spec.clip_dim}-wide face and EVA-CLIP "
                              f"embedding and {spec.depth} {spec.hidden_dims}-wide hidden states; these encoders give "
                              f"{id_cond.shape[-1]}, {len(hidden)} of {hidden[0].shape[-1]}")
    return ImagePrompt(model.project(id_cond, hidden).cpu(),
                       model.project(torch.zeros_like(id_cond), [torch.zeros_like(h) for h in hidden]).cpu())


def ip_adapter_hook(prepared, path_of_model: str | Path, clip_vision_dir: str | Path, device: torch.device,
                    dtype: torch.dtype, face_dirs: tuple[Path, Path] | None = None) -> IPAdapterHook:
    """The hook of one prepared IP-Adapter unit.

    ``prepared``: a :class:`~sdstudio.engine.controlnet.PreparedUnit` whose ``detected`` is the unit's image
    (H×W×3 RGB uint8; H×W×4 with the unit's mask as fourth channel, 255 = masked, for the extension's CLIP
    mask) and whose unit names the module (``ip-adapter_clip_sd15``...) and the model's title.
    ``path_of_model``: the IP-Adapter file; ``clip_vision_dir``: ``models/clip_vision``; ``face_dirs``: the
    models and annotators folders InsightFace's packs are found under (FaceID adapters). Files missing, unfit
    or of the wrong family are a :class:`ControlNetError` naming the unit (the CLIP file: "put FILE in
    FOLDER")."""
    unit = prepared.unit
    where = f"{SCRIPT_NAME} unit {prepared.index}"
    try:
        model: IPAdapterModel = ADAPTERS.get(path_of_model, load_ip_adapter)
    except ModelFileError as exc:
        raise ControlNetError(f"{where}: {exc}") from None
    name = encoder_for(unit.module, unit.model or Path(path_of_model).stem, model.spec, where)
    images = [np.asarray(x) for x in (prepared.detected, *prepared.more)]
    for image in images:
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ControlNetError(f"{where}: the IP-Adapter needs an RGB image, got {image.dtype} {image.shape}")
    if name == FACE:
        from .annotators.insightface import face_analysis

        if face_dirs is None:
            raise ControlNetError(f"{where}: a face adapter needs the folders of InsightFace's packs")
        module = FACE_KINDS[model.spec.kind]
        faces = face_analysis(*face_dirs, FACE_MODULES[module][0], f"{where} ({module})")
        clip = None
        if model.spec.kind == "faceid_plus":  # and CLIP ViT-H of the picture
            clip = (*clip_encoder(clip_vision_dir, "clip_h", where, "FaceID Plus"), encoder_device(unit, device))
        if model.spec.kind == "pulid":
            prompts = [pulid_prompt(model, faces, image, face_dirs[1], Path(clip_vision_dir), where) for image in images]
        else:
            prompts = [face_prompt(model, faces, image, where, clip) for image in images]
    else:
        encoder, key = clip_encoder(clip_vision_dir, name, where)
        prompts = [image_prompt(model, encoder, image, encoder_device(unit, device), key, where) for image in images]
    # several images (the extension's Multi-Inputs): their tokens averaged, the blank prompt's too
    prompt = prompts[0] if len(prompts) == 1 else ImagePrompt(torch.stack([p.cond for p in prompts]).mean(0),
                                                              torch.stack([p.uncond for p in prompts]).mean(0))
    if prepared.region is not None:
        prompt.region = torch.from_numpy(np.ascontiguousarray(prepared.region))[None, None]
    if model.spec.kind == "pulid":
        prompt.pulid = PULID_ATTENTION[unit.pulid_mode]
    return IPAdapterHook(where, model, prompt, unit.weight, unit.advanced_weighting, unit.guidance_start,
                         unit.guidance_end, torch.device(device), dtype)
