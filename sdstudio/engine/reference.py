"""ControlNet's model-free "reference" units (``reference_only``, ``reference_adain``,
``reference_adain+attn``) on the engine's per-step hooks, computed as sd-webui-controlnet (v1.1.455) does.

There is no control model. Before each UNet call of an active step the hook runs a *write* pass: the UNet
itself, on the reference image's latent noised to the call's timestep (``q_sample`` with
``t = round(timestep)``, fresh noise), with the call's own text rows and timesteps. That pass records, per
layer, what the reference looks like; the real call then *reads* it:

- attention (``reference_only`` and ``+attn``): every self-attention block that takes part keeps the
  normalised hidden states it saw (its ``attn1`` input). In the real call its self-attention attends over
  ``[x ; reference]`` (the reference tokens as extra keys and values, the queries its own). The negative
  prompt's rows are mixed with their plain self-attention by the *style fidelity* ``f``:
  ``f * plain + (1 - f) * referenced`` (the prompt's rows keep the referenced result);
- AdaIN (``reference_adain`` and ``+attn``): the outputs of some UNet blocks are renormalised per channel to
  the reference's mean and variance, ``(x - mean) / std * std_ref + mean_ref`` (population variance over the
  spatial dimensions, ``std = sqrt(max(var, 1e-6))``); the negative rows again ``f * x + (1 - f) * that``.

Which layers take part depends on the unit's weight (0-2), as the extension's thresholds say:

- the self-attention blocks, in the UNet's order (input blocks, middle, output blocks) stably sorted by
  channel width, widest first: block ``i`` of ``n`` writes when ``weight > i / n``. Weight 1 reaches all of
  them, 0 none;
- AdaIN: the middle block (threshold 0); the layers of every input level but the first (the extension's
  input blocks 4, 5, 7, 8, 10, 11 on SD 1.x / 2.x, 4, 5, 7, 8 on SDXL), the ``w``-th of ``m`` at
  ``2 * (1 - w / m)``; the first two thirds of the output blocks (0-7 of 12, 0-5 of 9), the ``w``-th of
  ``m`` at ``2 * w / m``. A block writes when ``weight > threshold``. An output block that ends in an
  upsampler is measured after it, as the original block contains it.

Style fidelity is the unit's threshold A (default 0.5) clamped to [0, 1]; on SDXL it is cubed (the
extension's damping: 0.5 becomes 0.125); "ControlNet is more important" makes it 1.0 (the negative rows see
no reference, so CFG pushes towards it); otherwise "My prompt is more important" and the Hires. fix pass
make it 0.0. Several reference units add their banks (the keys of each, averaged statistics, averaged
fidelities), and the guidance window and ``hr_option`` work as for every unit.

Deliberate differences from the extension: with several units, one unit's write pass never consumes another
unit's banks (the extension's second pass reads and clears the first unit's banks when their kinds differ,
so the first unit's effect is lost); the statistics are computed in float32; the q_sample noise is drawn
from a generator keyed by the row's own latent and timestep, so an image has the same pixels whatever its
batch-mates (the extension draws from the global generator).

Nothing is patched globally: ``applied(unet)`` swaps the self-attention processors of this UNet and adds
forward hooks to its AdaIN blocks, and takes both away again when the pass ends, also on errors.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.controlnet import SCRIPT_NAME, ControlNetError
from .hooks import StepHook, UNetCall
from .schedules import DiscreteSchedule

REFERENCE_MODULES = ("reference_only", "reference_adain", "reference_adain+attn")
ATTENTION_MODULES = ("reference_only", "reference_adain+attn")
ADAIN_MODULES = ("reference_adain", "reference_adain+attn")
ADAIN_EPS = 1e-6  # floor of the variances before the square root
FIDELITY_FLOOR = 1e-5  # at or below it the negative rows are not recomputed without the reference
_STATE = "_sdstudio_reference"  # the UNet's instance attribute while reference units are applied to it


def style_fidelity(threshold_a: float, *, is_sdxl: bool, cfg_injection: bool, soft_injection: bool,
                   hires: bool) -> float:
    """The unit's style fidelity at a UNet call (see the module's docstring)."""
    fidelity = min(1.0, max(0.0, float(threshold_a)))
    if is_sdxl:
        fidelity = fidelity ** 3.0
    if cfg_injection:
        return 1.0
    if soft_injection or hires:
        return 0.0
    return fidelity


# ---- where the reference acts ---------------------------------------------------------------------------
def _levels(unet) -> tuple[list, object, list]:
    for name in ("down_blocks", "mid_block", "up_blocks"):
        if getattr(unet, name, None) is None:
            raise ControlNetError(f"{SCRIPT_NAME} reference: this UNet ({type(unet).__name__}) has no {name}; "
                                  f"reference units need a Stable Diffusion UNet")
    return list(unet.down_blocks), unet.mid_block, list(unet.up_blocks)


def attention_sites(unet) -> list[tuple[torch.nn.Module, float]]:
    """The self-attention blocks (diffusers ``BasicTransformerBlock``) and their weight thresholds: the
    original UNet's order (input, middle, output blocks), stably sorted by width, widest first."""
    from diffusers.models.attention import BasicTransformerBlock

    down, mid, up = _levels(unet)
    blocks = [m for part in (*down, mid, *up) for m in part.modules() if isinstance(m, BasicTransformerBlock)]
    blocks.sort(key=lambda b: -b.attn1.to_q.in_features)
    return [(b, i / len(blocks)) for i, b in enumerate(blocks)]


def _layer_outputs(block, with_upsampler: bool) -> list[torch.nn.Module]:
    """The module whose output is each layer's output (the original UNet's block): the layer's attention when
    it has one, else its resnet; the last layer ends at the upsampler when asked and there is one."""
    attentions = getattr(block, "attentions", None)
    out = [attentions[j] if attentions is not None and j < len(attentions) else resnet
           for j, resnet in enumerate(block.resnets)]
    upsamplers = getattr(block, "upsamplers", None)
    if with_upsampler and upsamplers:
        out[-1] = upsamplers[-1]
    return out


def adain_sites(unet) -> list[tuple[torch.nn.Module, float]]:
    """The blocks whose outputs AdaIN renormalises, with their weight thresholds (the extension's lists and
    weights, doubled as it doubles them)."""
    down, mid, up = _levels(unet)
    inputs = [m for block in down[1:] for m in _layer_outputs(block, with_upsampler=False)]
    outputs_all = [m for block in up for m in _layer_outputs(block, with_upsampler=True)]
    outputs = outputs_all[:len(outputs_all) * 2 // 3]
    sites = [(mid, 0.0)]
    sites += [(m, 2.0 * (1.0 - w / len(inputs))) for w, m in enumerate(inputs)]
    sites += [(m, 2.0 * w / len(outputs)) for w, m in enumerate(outputs)]
    return sites


# ---- the UNet's shared state while reference units are applied ----------------------------------------
@dataclass
class _Writer:
    weight: float
    fidelity: float
    attention: bool
    adain: bool


@dataclass
class _AttentionSite:
    attn: torch.nn.Module  # the block's attn1
    threshold: float
    inner: object  # the processor it had
    keys: list[torch.Tensor] = field(default_factory=list)
    fidelities: list[float] = field(default_factory=list)

    def clear(self) -> None:
        self.keys, self.fidelities = [], []


@dataclass
class _NormSite:
    module: torch.nn.Module
    threshold: float
    handle: object = None
    means: list[torch.Tensor] = field(default_factory=list)
    variances: list[torch.Tensor] = field(default_factory=list)
    fidelities: list[float] = field(default_factory=list)

    def clear(self) -> None:
        self.means, self.variances, self.fidelities = [], [], []


class _Shared:
    """What every reference unit on one UNet shares: the banks per layer, who is writing, and which rows of
    the real call are the negative prompt's."""

    def __init__(self, unet):
        self.users = 0
        self.live = True
        self.writer: _Writer | None = None
        self.uncond_rows: list[int] = []
        self.attention = [_AttentionSite(b.attn1, th, b.attn1.processor) for b, th in attention_sites(unet)
                          if not b.only_cross_attention]
        self.norms = [_NormSite(m, th) for m, th in adain_sites(unet)]

    def install(self) -> None:
        for site in self.attention:
            site.attn.set_processor(_ReferenceAttention(self, site))
        for site in self.norms:
            site.handle = site.module.register_forward_hook(_norm_hook(self, site))

    def uninstall(self) -> None:
        self.live = False
        for site in self.attention:
            if isinstance(site.attn.processor, _ReferenceAttention) and site.attn.processor.shared is self:
                site.attn.set_processor(site.inner)
            site.clear()
        for site in self.norms:
            if site.handle is not None:
                site.handle.remove()
            site.clear()

    def clear(self) -> None:
        for site in (*self.attention, *self.norms):
            site.clear()


class _ReferenceAttention:
    """A self-attention processor that records (write pass) or attends over (real call) the reference's
    hidden states, delegating the attention itself to the processor it replaced."""

    def __init__(self, shared: _Shared, site: _AttentionSite):
        self.shared, self.site = shared, site

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        site, shared, inner = self.site, self.shared, self.site.inner
        if not shared.live or encoder_hidden_states is not None:
            return inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask)
        writer = shared.writer
        if writer is not None:
            if writer.attention and writer.weight > site.threshold:
                site.keys.append(hidden_states.detach())
                site.fidelities.append(writer.fidelity)
            return inner(attn, hidden_states, attention_mask=attention_mask)
        if not site.keys or attention_mask is not None:
            site.clear()
            return inner(attn, hidden_states, attention_mask=attention_mask)
        fidelity = sum(site.fidelities) / len(site.fidelities)
        context = torch.cat([hidden_states, *[k.to(hidden_states.dtype) for k in site.keys]], dim=1)
        site.clear()
        out = inner(attn, hidden_states, encoder_hidden_states=context)
        rows = shared.uncond_rows
        if rows and fidelity > FIDELITY_FLOOR:
            plain = inner(attn, hidden_states[rows])
            out = out.clone()
            out[rows] = fidelity * plain.to(out.dtype) + (1.0 - fidelity) * out[rows]
        return out


def _norm_hook(shared: _Shared, site: _NormSite):
    """A forward hook recording (write pass) or applying (real call) the reference's per-channel statistics."""

    def hook(module, args, output):
        if not shared.live:
            return None
        x = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        writer = shared.writer
        if writer is not None:
            if writer.adain and writer.weight > site.threshold:
                var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, correction=0)
                site.means.append(mean)
                site.variances.append(var)
                site.fidelities.append(writer.fidelity)
            return None
        if not site.means:
            return None
        y = adain(x, site.means, site.variances, sum(site.fidelities) / len(site.fidelities), shared.uncond_rows)
        site.clear()
        if isinstance(output, tuple):
            return (y, *output[1:])
        if isinstance(output, torch.Tensor):
            return y
        return type(output)(sample=y)

    return hook


def adain(x: torch.Tensor, means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor], fidelity: float,
          uncond_rows: Sequence[int]) -> torch.Tensor:
    """``x`` (B×C×H×W) renormalised to the averaged reference statistics; the negative rows mixed back with
    their own values by the style fidelity (see the module's docstring)."""
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(2, 3), keepdim=True, correction=0)
    std = var.clamp_min(ADAIN_EPS).sqrt()
    mean_ref = sum(means) / len(means)
    std_ref = (sum(variances) / len(variances)).clamp_min(ADAIN_EPS).sqrt()
    y = (xf - mean) / std * std_ref + mean_ref
    rows = list(uncond_rows)
    if rows and fidelity > FIDELITY_FLOOR:
        y[rows] = fidelity * xf[rows] + (1.0 - fidelity) * y[rows]
    return y.to(x.dtype)


@contextlib.contextmanager
def _shared_on(unet):
    """The UNet's shared state for the pass (installed by the first reference unit, removed by the last)."""
    shared = getattr(unet, _STATE, None)
    if shared is None:
        shared = _Shared(unet)
        shared.install()
        setattr(unet, _STATE, shared)
    shared.users += 1
    try:
        yield shared
    finally:
        shared.users -= 1
        if shared.users == 0:
            try:
                shared.uninstall()
            finally:
                if getattr(unet, _STATE, None) is shared:
                    delattr(unet, _STATE)


# ---- the hook -------------------------------------------------------------------------------------------
def row_noise(key: bytes, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise (float32, CPU) determined by ``key`` alone."""
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2 ** 63 - 1)
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


class ReferenceHook(StepHook):
    """One enabled reference unit (see the module's docstring)."""

    def __init__(self, prepared, vae_encode: Callable[[np.ndarray], torch.Tensor], schedule: DiscreteSchedule,
                 device: torch.device, dtype: torch.dtype, is_sdxl: bool, *, hires_job: bool = False):
        from .preprocessors import fit_to

        self.prepared, self.unit = prepared, prepared.unit
        self.module = self.unit.module
        if self.module not in REFERENCE_MODULES:
            raise ControlNetError(f"{SCRIPT_NAME} unit {prepared.index}: {self.module!r} is not a reference "
                                  f"preprocessor ({', '.join(REFERENCE_MODULES)})")
        self.owner = f"{SCRIPT_NAME} unit {prepared.index}"
        self.start, self.end = self.unit.guidance_start, self.unit.guidance_end
        self.vae_encode, self.schedule = vae_encode, schedule
        self.device, self.dtype, self.is_sdxl, self.hires_job = device, dtype, is_sdxl, hires_job
        self.attention = self.module in ATTENTION_MODULES
        self.adain = self.module in ADAIN_MODULES
        self._fit = fit_to
        self._latents: dict[tuple[int, int], torch.Tensor] = {}
        self._unet = None
        self._shared: _Shared | None = None

    # ---- when -----------------------------------------------------------------------------------------
    def active(self, step) -> bool:
        if not self.start <= step.fraction <= self.end:
            return False
        return self.unit.in_pass(step.pass_name, self.hires_job)

    def fidelity(self, hires: bool) -> float:
        return style_fidelity(self.unit.threshold_a, is_sdxl=self.is_sdxl, cfg_injection=self.unit.cfg_injection,
                              soft_injection=self.unit.soft_injection, hires=hires)

    @contextlib.contextmanager
    def applied(self, unet):
        with _shared_on(unet) as shared:
            self._unet, self._shared = unet, shared
            try:
                yield
            finally:
                self._unet = self._shared = None

    def _writes(self, shared: _Shared) -> bool:
        w = self.unit.weight
        return (self.attention and any(w > s.threshold for s in shared.attention)
                or self.adain and any(w > s.threshold for s in shared.norms))

    # ---- what -----------------------------------------------------------------------------------------
    def latent(self, height: int, width: int) -> torch.Tensor:
        """The reference image fitted to a pass's pixel size (the unit's resize mode) and VAE-encoded
        (1×C×h×w in the UNet's latent space), once per size."""
        key = (height, width)
        if key not in self._latents:
            fitted = self._fit(self.prepared.detected, width, height, self.unit.resize_mode)
            fitted = np.ascontiguousarray(fitted[:, :, :3])
            latent = self.vae_encode(fitted)
            if not isinstance(latent, torch.Tensor) or latent.ndim not in (3, 4):
                raise ControlNetError(f"{self.owner}: the VAE gave no latent for the reference image")
            latent = latent.reshape(1, *latent.shape[-3:]).float()
            if tuple(latent.shape[-2:]) != (height // 8, width // 8):
                raise ControlNetError(f"{self.owner}: the reference latent is {tuple(latent.shape[-2:])}; this pass "
                                      f"needs {(height // 8, width // 8)}")
            self._latents[key] = latent
        return self._latents[key]

    def noise(self, call: UNetCall, channels: int) -> torch.Tensor:
        """The q_sample noise of each row: keyed by the unit, the row's own input, timestep and kind, so a row
        draws the same noise whatever its batch-mates (float32, CPU)."""
        h, w = call.x.shape[-2:]
        seen: dict[tuple, int] = {}
        out = []
        for r in range(call.x.shape[0]):
            kind = (call.images[r], call.uncond[r])
            seen[kind] = seen.get(kind, -1) + 1  # AND parts of one image: distinct rows
            key = b"|".join([str(self.prepared.index).encode(), call.x[r].detach().float().cpu().numpy().tobytes(),
                             repr(float(call.timestep.reshape(-1)[r % call.timestep.numel()])).encode(),
                             str(call.uncond[r]).encode(), str(seen[kind]).encode()])
            out.append(row_noise(key, (channels, h, w)))
        return torch.stack(out)

    def noised(self, call: UNetCall) -> torch.Tensor:
        """The write pass's UNet input: the reference latent at the call's timesteps,
        ``sqrt(a_t) * latent + sqrt(1 - a_t) * noise`` with ``t = round(timestep)`` (a 9-channel inpainting
        UNet also gets an empty mask and the reference latent as the masked image)."""
        x = call.x
        rows, channels = x.shape[0], x.shape[1]
        latent = self.latent(x.shape[-2] * 8, x.shape[-1] * 8)
        latent_channels = latent.shape[1]
        if channels not in (latent_channels, latent_channels * 2 + 1):
            raise ControlNetError(f"{self.owner}: reference units work with {latent_channels}-channel and inpainting "
                                  f"UNets; this one takes {channels} channels")
        t = call.timestep.reshape(-1).float().cpu()
        if t.numel() == 1:
            t = t.expand(rows)
        index = torch.round(t).long().clamp(0, len(self.schedule.alphas_cumprod) - 1)
        a = self.schedule.alphas_cumprod[index].double().view(-1, 1, 1, 1)
        ref = (a.sqrt() * latent.double() + (1 - a).sqrt() * self.noise(call, latent_channels).double()).float()
        if channels != latent_channels:
            ref = torch.cat([ref, torch.zeros_like(ref[:, :1]), latent.expand(rows, -1, -1, -1)], dim=1)
        return ref.to(x.device, x.dtype)

    def unet_inputs(self, call: UNetCall):
        shared, unet = self._shared, self._unet
        if shared is None or unet is None:
            raise ControlNetError(f"{self.owner}: the reference unit was called outside its pass")
        shared.uncond_rows = [r for r, u in enumerate(call.uncond) if u]
        if not self._writes(shared):
            return
        ref = self.noised(call)
        kwargs = {}
        if call.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = call.added_cond_kwargs
        shared.writer = _Writer(float(self.unit.weight), self.fidelity(call.step.pass_name == "hires"),
                                self.attention, self.adain)
        try:
            with torch.no_grad():
                unet(ref, call.timestep, encoder_hidden_states=call.encoder_hidden_states, return_dict=False, **kwargs)
        except BaseException:
            shared.clear()
            raise
        finally:
            shared.writer = None


def reference_hook(prepared, vae_encode: Callable[[np.ndarray], torch.Tensor], schedule: DiscreteSchedule,
                   device: torch.device, dtype: torch.dtype, is_sdxl: bool, *, hires_job: bool = False) -> StepHook:
    """The hook of a prepared reference unit (``prepared.unit.module`` one of :data:`REFERENCE_MODULES`).

    ``vae_encode(rgb)`` takes the reference image fitted to a pass's size (H×W×3 uint8) and gives its latent
    in the UNet's latent space (1×4×H/8×W/8, the VAE's scaling factor applied); it is called once per pass
    size. ``schedule`` gives the ``alphas_cumprod`` of the q_sample; ``hires_job`` as for
    :class:`~sdstudio.engine.controlnet.ControlHook` (a txt2img job with Hires. fix: ``hr_option`` counts).
    """
    return ReferenceHook(prepared, vae_encode, schedule, device, dtype, is_sdxl, hires_job=hires_job)


__all__ = ["REFERENCE_MODULES", "ReferenceHook", "adain", "adain_sites", "attention_sites", "reference_hook",
           "row_noise", "style_fidelity"]
