"""Flow-matching models (SD 3.x, Flux.1) run by the k-diffusion samplers, by a change of variables.

A flow model is trained on ``x_f = (1 - σ)·x0 + σ·ε`` and predicts the velocity ``v = ε - x0``. With
``s = σ / (1 - σ)`` and ``x = x_f / (1 - σ) = x0 + s·ε`` it is a model in the k-diffusion (VE)
parametrisation every sampler here works in, so samplers, schedules and scripts stay as they are:

* the model sees ``x_f = x / (1 + s)`` (:func:`flow_c_in`) at flow time ``σ = s / (1 + s)``
  (:func:`flow_timestep`), and ``denoised = x_f - σ·v`` (:func:`flow_denoised`);
* Euler in ``s`` is then exactly Euler in ``σ`` (diffusers' ``FlowMatchEulerDiscreteScheduler``), and the
  txt2img start ``ε·s₀`` and the img2img start ``x0 + s·ε`` are the flow forms ``x_f / (1 - σ)``;
* ``σ = 1`` is ``s = ∞``: the top of every schedule is clamped to :data:`MAX_FLOW_SIGMA`.

Schedules are built on the model's flow-σ table (as A1111's and Forge's k-diffusion wrappers for SD3 /
Flux do: Karras, Exponential... between the flow σ_min and 1) and then mapped to ``s``
(:meth:`FlowSchedule.sigmas_for`). Text conditioning follows A1111 1.10 for SD3 (``sd3_cond.py``) and
Forge / diffusers for Flux (:class:`FlowConditioner`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..models.loader import clip_tokenizer
from .conditioning import BOS, BREAK_TOKEN, CHUNK, EOS, Conditioning, chunk_tokens, weighted_tokens
from .schedules import DiscreteSchedule, get_sigmas

# The highest flow σ a schedule may reach: σ = 1 (pure noise) is s = ∞. At 1 - 1e-4 (s = 9999) the first
# model input is 0.9999·ε at time 999.9 instead of ε at 1000; float32 keeps ~1e-4 relative precision in
# the first Euler step's cancellation (x ≈ s·ε). tests/test_flow.py measures both effects.
MAX_FLOW_SIGMA = 1.0 - 1e-4
SD3_SHIFT = 3.0
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15  # diffusers' FluxPipeline / Flux.1-dev scheduler config
FLUX_BASE_SEQ, FLUX_MAX_SEQ = 256, 4096  # image tokens (2x2 latent patches) at which those shifts apply
FLUX_DEV_T5_TOKENS, FLUX_SCHNELL_T5_TOKENS = 512, 256  # diffusers' max_sequence_length defaults
DEFAULT_DISTILLED_GUIDANCE = 3.5  # Forge's "Distilled CFG Scale" default
T5_EOS, T5_PAD = 1, 0
SD3_CONTEXT = 4096  # T5-XXL width: the CLIP features are zero-padded to it
NO_FLOW_SCHEDULES = {"align_your_steps"}  # NVIDIA's tables are SD 1.x / SDXL noise levels


# ---- the change of variables -------------------------------------------------------------------------
def to_ve(sigma: torch.Tensor, max_sigma: float = MAX_FLOW_SIGMA) -> torch.Tensor:
    """Flow σ in [0, 1] -> k-diffusion s = σ / (1 - σ) (σ clamped to ``max_sigma``; 0 stays 0). Computed in
    float64: near σ = 1 a float32 ``1 - σ`` loses digits."""
    sigma = torch.as_tensor(sigma)
    wide = sigma.double().clamp(max=max_sigma)
    return (wide / (1 - wide)).to(sigma.dtype if sigma.is_floating_point() else torch.float32)


def flow_timestep(s: torch.Tensor) -> torch.Tensor:
    """k-diffusion s -> the flow model's σ = s / (1 + s): its time, 0 (clean) .. 1 (noise)."""
    return s / (1 + s)


def flow_c_in(s: torch.Tensor) -> torch.Tensor:
    """The input scale: the model sees ``x_f = x / (1 + s)``."""
    return 1 / (1 + s)


def flow_denoised(x: torch.Tensor, out: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x0 from the model's velocity ``out`` at ``x`` (k-diffusion space): ``x_f - σ·v = (x - s·v) / (1 + s)``."""
    return (x - s * out) / (1 + s)


# ---- shifts and schedules ------------------------------------------------------------------------------
def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift σ(t) = shift·t / (1 + (shift - 1)·t) (ComfyUI's ModelSamplingDiscreteFlow). Flux's
    ``time_shift(mu, t) = e^mu / (e^mu + 1/t - 1)`` is the same map with shift = e^mu."""
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(width: int, height: int, *, base_shift: float = FLUX_BASE_SHIFT, max_shift: float = FLUX_MAX_SHIFT,
            base_seq: int = FLUX_BASE_SEQ, max_seq: int = FLUX_MAX_SEQ) -> float:
    """diffusers' ``calculate_shift`` for an image of ``width`` x ``height`` pixels: linear in its number of
    image tokens (16x16-pixel patches), 0.5 at 256 tokens (256²), 1.15 at 4096 (1024²), extrapolated beyond."""
    seq = (height // 16) * (width // 16)
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return seq * m + base_shift - m * base_seq


def flux_shift(width: int, height: int, *, schnell: bool = False, mu: float | None = None) -> float:
    """The shift a Flux model samples with: e^mu of the image size (dev), or 1 (schnell: no shift, as
    diffusers' and ComfyUI's schnell configs; Forge uses mu = 1 there)."""
    if schnell:
        return 1.0
    return math.exp(flux_mu(width, height) if mu is None else mu)


class _FlowTable(DiscreteSchedule):
    """The model's 1000 flow σ, ascending: ``shifted(k / 1000)`` for k = 1..1000 (A1111's and ComfyUI's
    ModelSamplingDiscreteFlow table), with DiscreteSchedule's log-σ interpolation for t <-> σ."""

    def __init__(self, shift: float, steps: int = 1000):  # no DDPM betas: the table itself
        t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        self.sigmas = shifted(t, shift).float()
        self.log_sigmas = self.sigmas.log()


class FlowSchedule(DiscreteSchedule):
    """A flow model's noise schedule in the k-diffusion space the samplers use: a
    :class:`~sdstudio.engine.schedules.DiscreteSchedule` (``sigmas``, ``sigma_min``/``sigma_max``) whose
    ``sigma_to_t``/``t_to_sigma`` go through the flow table (t the table index 0..999). ``flow`` is the same
    table in flow σ; :meth:`sigmas_for` builds the sampling schedules there, as A1111 / Forge do, and maps
    them to s."""

    def __init__(self, shift: float = SD3_SHIFT, steps: int = 1000, max_sigma: float = MAX_FLOW_SIGMA):
        # no DDPM betas (so no alphas_cumprod): the shifted flow table itself
        self.shift = shift
        self.max_sigma = max_sigma
        self.flow = _FlowTable(shift, steps)
        self.sigmas = to_ve(self.flow.sigmas, max_sigma)
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def sd3(cls, shift: float = SD3_SHIFT) -> FlowSchedule:
        return cls(shift)

    @classmethod
    def flux(cls, width: int, height: int, *, schnell: bool = False, mu: float | None = None) -> FlowSchedule:
        return cls(flux_shift(width, height, schnell=schnell, mu=mu))

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.flow.sigma_to_t(flow_timestep(sigma.float()))

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return to_ve(self.flow.t_to_sigma(t), self.max_sigma)

    def sigmas_for(self, schedule: str, steps: int, *, discard_next_to_last: bool = False) -> torch.Tensor:
        """The samplers' sigmas (k-diffusion s, descending, ending in 0 except KL Optimal) for a schedule
        type, built on the flow-σ table: "uniform" is diffusers' SD3 spacing linspace(1, 0.001) shifted,
        "simple" with steps dividing 1000 is FluxPipeline's linspace(1, 1/n) shifted."""
        if schedule in NO_FLOW_SCHEDULES:
            raise ValueError(f"the {schedule!r} schedule has no version for flow-matching models (SD3, Flux)")
        flow = get_sigmas(schedule, steps, self.flow, discard_next_to_last=discard_next_to_last)
        return to_ve(flow, self.max_sigma)


# ---- the model call seam -------------------------------------------------------------------------------
class ModelOutput(NamedTuple):
    sample: torch.Tensor


def _no_unet_extras(ignored: dict) -> None:
    given = sorted(k for k, v in ignored.items() if v is not None)
    if given:  # e.g. ControlNet residuals: better an error than an image that silently lacks them
        raise TypeError(f"a flow transformer does not take UNet inputs {given}")


class SD3Call:
    """An ``SD3Transformer2DModel`` behind the UNet call the denoiser makes:
    ``(sample, timestep=flow σ, encoder_hidden_states, added_cond_kwargs={"text_embeds": pooled})``."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None, **ignored) -> ModelOutput:
        _no_unet_extras(ignored)
        pooled = (added_cond_kwargs or {}).get("text_embeds")
        if pooled is None:
            raise ValueError("SD3 needs the pooled text embedding (added_cond_kwargs['text_embeds'])")
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(sample.shape[0]) * 1000
        out = self.transformer(hidden_states=sample, encoder_hidden_states=encoder_hidden_states,
                               pooled_projections=pooled.to(sample.dtype), timestep=t, return_dict=False)[0]
        return ModelOutput(out)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 · W/2, 4C): Flux's 2x2 patches as tokens (diffusers' layout)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux needs an even latent size (image sides a multiple of 16), got {w * 8}x{h * 8}")
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a latent of ``height`` x ``width``."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux's position ids of the packed image tokens: (row, column) in the 2nd and 3rd of 3 axes."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxCall:
    """A ``FluxTransformer2DModel`` behind the UNet call the denoiser makes. Packs the latent into 2x2
    tokens, adds the position ids, and passes ``guidance`` (the distilled guidance, Forge's "Distilled CFG
    Scale"; set per job, ignored by models without a guidance embedding such as schnell)."""

    def __init__(self, transformer, guidance: float = DEFAULT_DISTILLED_GUIDANCE):
        self.transformer = transformer
        self.guidance = guidance

    @property
    def uses_guidance(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None, **ignored) -> ModelOutput:
        _no_unet_extras(ignored)
        pooled = (added_cond_kwargs or {}).get("text_embeds")
        if pooled is None:
            raise ValueError("Flux needs the pooled CLIP-L embedding (added_cond_kwargs['text_embeds'])")
        b, _, h, w = sample.shape
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(b)  # the model scales by 1000
        guidance = None
        if self.uses_guidance:
            guidance = torch.full((b,), float(self.guidance), device=sample.device, dtype=torch.float32)
        out = self.transformer(hidden_states=pack_latents(sample), encoder_hidden_states=encoder_hidden_states,
                               pooled_projections=pooled.to(sample.dtype), timestep=t,
                               img_ids=image_ids(h, w, sample.device, sample.dtype),
                               txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=sample.device,
                                                   dtype=sample.dtype),
                               guidance=guidance, return_dict=False)[0]
        return ModelOutput(unpack_latents(out, h, w))


# ---- text conditioning ------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def t5_tokenizer():
    """The T5 v1.1 tokenizer from the file shipped in this package (no download, no sentencepiece)."""
    from transformers import T5TokenizerFast

    path = resources.files("sdstudio.models") / "configs" / "t5_tokenizer" / "tokenizer.json"
    return T5TokenizerFast(tokenizer_file=str(path), eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0)


def emphasize(z: torch.Tensor, weights: list[float], emphasis: str) -> torch.Tensor:
    """A1111's emphasis: per-token weights multiply the hidden states; "Original" then restores the
    tensor's mean ("No norm" does not; "None" ignores the weights)."""
    if emphasis == "None" or all(w == 1 for w in weights):
        return z
    w = torch.tensor(weights, device=z.device, dtype=z.dtype)
    original_mean = z.mean()
    z = z * w[None, :, None]
    return z * (original_mean / z.mean()) if emphasis == "Original" else z


@dataclass
class FlowTextEncoders:
    """A flow model's text encoders. ``kind`` "sd3": CLIP-L, CLIP-G and optionally T5-XXL; "flux": CLIP-L
    (pooled only) and T5-XXL. ``t5_tokens``: the T5 sequence length (Flux: 512 for dev, 256 for schnell);
    for SD3 it is None and follows the CLIP part, 77 per chunk, as A1111 does."""

    kind: str
    clip_l: torch.nn.Module
    clip_g: torch.nn.Module | None = None
    t5: torch.nn.Module | None = None
    t5_tokens: int | None = None
    clip_tok: object = field(default_factory=clip_tokenizer)
    t5_tok: object = field(default_factory=t5_tokenizer)

    def __post_init__(self) -> None:
        if self.kind not in ("sd3", "flux"):
            raise ValueError(f"unknown flow model kind {self.kind!r}")
        if self.kind == "sd3" and self.clip_g is None:
            raise ValueError("SD3 needs both CLIP-L and CLIP-G")
        if self.kind == "flux" and (self.t5 is None or not self.t5_tokens):
            raise ValueError("Flux needs T5-XXL and its sequence length")

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.clip_l, self.clip_g, self.t5) if m is not None]


def _clip(encoder, ids: torch.Tensor, *, project: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate hidden states (no final layer norm) and the pooled output, projected or not. SD3's and
    Flux's CLIP-L pooled vector is the unprojected one (SD3 reference ``return_projected_pooled=False``;
    the files' CLIP-L projection, where present, is the identity)."""
    inner = encoder.text_model if hasattr(encoder, "text_model") else encoder  # WithProjection wraps the model
    out = inner(input_ids=ids, output_hidden_states=True)
    pooled = out.pooler_output
    if project:
        pooled = encoder.text_projection(pooled)
    return out.hidden_states[-2], pooled


class FlowConditioner:
    """Prompts in A1111's language (weights, BREAK, 75-token chunks with comma back-off) -> a flow model's
    :class:`~sdstudio.engine.conditioning.Conditioning`. Same ``encode`` as ``TextConditioner``.

    SD3 (A1111 1.10 ``sd3_cond``): per 77-token chunk, CLIP-L and CLIP-G penultimate states side by side
    (768 + 1280), zero-padded to 4096 and weighted; then T5-XXL's states appended on the sequence axis,
    as many tokens as the CLIP part (the prompt's T5 tokens, ``</s>``, ``<pad>``...), zeros without T5;
    pooled = [CLIP-L pooled, CLIP-G projected pooled] of the first chunk. Flux: T5-XXL's states
    (``t5_tokens`` long) as context and CLIP-L's pooled output. T5 weights multiply its states as in
    Forge (A1111 1.10 passes T5 unweighted)."""

    def __init__(self, encoders: FlowTextEncoders, device: torch.device):
        self.encoders = encoders
        self.device = device
        self.used_embeddings: dict = {}  # textual inversion is not supported for flow models (yet)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], device=self.device)

    def _t5(self, text: str, length: int, emphasis: str, novelai_braces: bool, like: torch.Tensor | None):
        enc = self.encoders
        if enc.t5 is None:  # SD3 without T5-XXL: zeros, as A1111 and the SD3 reference do
            dtype = like.dtype if like is not None else torch.float32
            return torch.zeros(1, length, SD3_CONTEXT, device=self.device, dtype=dtype)
        if emphasis == "None":  # A1111 gives T5 the raw text then
            tokens = enc.t5_tok(text, add_special_tokens=False, truncation=False).input_ids
            weights = [1.0] * len(tokens)
        else:
            parsed, parsed_w = weighted_tokens(enc.t5_tok, text, novelai_braces=novelai_braces)
            kept = [(t, w) for t, w in zip(parsed, parsed_w) if t != BREAK_TOKEN]
            tokens, weights = [t for t, _ in kept], [w for _, w in kept]
        tokens, weights = tokens[:length - 1] + [T5_EOS], weights[:length - 1] + [1.0]  # </s> kept, as HF truncation
        pad = length - len(tokens)
        z = enc.t5(input_ids=self._ids(tokens + [T5_PAD] * pad)).last_hidden_state
        return emphasize(z, weights + [1.0] * pad, emphasis)

    @torch.no_grad()
    def encode(self, text: str, clip_skip: int = 1, *, emphasis: str = "Original",
               novelai_braces: bool = False) -> Conditioning:
        """One prompt (no AND, no scheduling). ``clip_skip`` is ignored: SD3 and Flux use fixed layers."""
        enc = self.encoders
        tokens, weights = weighted_tokens(enc.clip_tok, text, novelai_braces=novelai_braces)
        chunks = chunk_tokens(tokens, weights)
        if enc.kind == "flux":
            first = chunks[0]
            ids = [BOS] + first.tokens + [EOS] + [EOS] * (CHUNK - len(first.tokens))
            _, pooled = _clip(enc.clip_l, self._ids(ids), project=False)
            context = self._t5(text, enc.t5_tokens, emphasis, novelai_braces, None)
            return Conditioning(context, pooled)
        width = enc.t5.config.d_model if enc.t5 is not None else SD3_CONTEXT
        zs, pooled = [], None
        for i, chunk in enumerate(chunks):
            pad = CHUNK - len(chunk.tokens)
            z_l, pool_l = _clip(enc.clip_l, self._ids([BOS] + chunk.tokens + [EOS] + [EOS] * pad), project=False)
            z_g, pool_g = _clip(enc.clip_g, self._ids([BOS] + chunk.tokens + [EOS] + [0] * pad), project=True)
            z = torch.cat([z_l, z_g], dim=-1)
            z = F.pad(z, (0, width - z.shape[-1]))
            zs.append(emphasize(z, [1.0] + chunk.weights + [1.0] * (pad + 1), emphasis))
            if i == 0:
                pooled = torch.cat([pool_l, pool_g], dim=-1)
        clip_part = torch.cat(zs, dim=1)
        t5_part = self._t5(text, clip_part.shape[1], emphasis, novelai_braces, clip_part)
        return Conditioning(torch.cat([clip_part, t5_part.to(clip_part.dtype)], dim=1), pooled)
