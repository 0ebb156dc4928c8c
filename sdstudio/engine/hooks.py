"""Per-step extension points of sampling, and the plan that carries them to the denoiser.

An always-on script (dynamic thresholding, CFG rescale, FreeU, ControlNet, a plug-in's own) hands the
engine :class:`StepHook` objects. The denoiser calls them at four places, in the order the hooks were
given:

- ``unet_inputs(call)``: extra keyword inputs for the UNet call (ControlNet's residuals); residuals of
  several hooks are summed, any other key may be given by one hook only. ``encoder_hidden_states`` and
  ``added_cond_kwargs`` replace the call's own (ReVision's image as the pooled prompt, the T2I style
  adapter's tokens appended to the context): hooks after that one see the replaced values in their
  ``call``, as the UNet does, and may replace them again;
- ``combine(guidance)``: replaces classifier-free guidance for one image (the first hook returning a
  tensor wins; ``None`` leaves it to the next one, then to plain CFG);
- ``after_cfg(guidance, denoised)``: adjusts the guided prediction (CFG rescale), each hook in turn;
- ``after_step(step, x)``: the latent after each sampling step, before the next one.

``applied(unet)`` is a context manager entered around the whole pass (FreeU's backbone scales),
``initial_noise(noise, pass_name)`` may change the unit-variance noise a pass starts from (before the
sampler scales it; ControlNet's inpaint_only+lama starts from its filled picture), and
``finish_image(image, index)`` sees each decoded picture before it is given out.

Windows (``start``/``end``, fractions of the pass) are by sampling step, as ControlNet's guidance
start/end: Heun and DPM2 call the denoiser twice in a step, both calls see the same step. A hook is
active at step ``i`` of ``n`` when ``start <= i / n <= end``.

A hook that raises is reported as :class:`HookError` naming its owner (the script or plug-in), so the
job fails with that name and the worker goes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import PLUGIN, StudioError
from .schedules import DiscreteSchedule

if TYPE_CHECKING:
    from .denoiser import ComposedConditioning, ScheduledConditioning
    from .img2img import LatentMask
    from .refiner import RefinerSwitch, SwitchTarget


class HookError(StudioError, RuntimeError):
    """A hook raised: ``owner`` names the script or plug-in that gave it."""

    kind = PLUGIN

    def __init__(self, owner: str, exc: BaseException):
        if isinstance(exc, StudioError):  # a user's error found by the hook (a ControlNet for another family)
            text = str(exc)
            super().__init__(text if text.startswith(owner) else f"{owner}: {text}")
            self.kind = exc.kind
        else:
            super().__init__(f"{owner}: {type(exc).__name__}: {exc}")
        self.owner = owner


@dataclass(frozen=True)
class Step:
    """Where the pass is: sampling step ``index`` (0-based) of ``steps``; ``sigma`` per image of this call."""

    index: int
    steps: int
    sigma: torch.Tensor
    pass_name: str = "first"  # "first", or "hires" for Hires. fix's second pass

    @property
    def fraction(self) -> float:
        return self.index / self.steps if self.steps else 0.0


@dataclass
class UNetCall:
    """One UNet call's inputs: rows of ``x`` are images' conditioned or unconditioned evaluations."""

    x: torch.Tensor  # the scaled model input (image-conditioning channels included)
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    images: list[int]  # per row: the image of the batch it belongs to
    uncond: list[bool]  # per row: True for the negative prompt's evaluation
    step: Step
    added_cond_kwargs: dict | None = None  # SDXL: the pooled text embeddings and size conditioning per row


@dataclass
class Guidance:
    """One image's predictions at a denoiser call, before they are combined into one."""

    x: torch.Tensor  # the noisy latent the sampler passed (C, H, W)
    sigma: torch.Tensor  # scalar
    uncond: torch.Tensor  # the negative prompt's denoised prediction
    conds: list[tuple[torch.Tensor, float]]  # each AND part's denoised prediction and weight
    cfg_scale: float
    step: Step
    image: int  # index in the batch
    # a UNet output for this image -> its denoised prediction (for hooks that call the UNet themselves: PAG)
    to_denoised: Callable[[torch.Tensor], torch.Tensor] | None = None

    def cfg(self, scale: float | None = None) -> torch.Tensor:
        """Plain classifier-free guidance at ``scale`` (default: the request's)."""
        scale = self.cfg_scale if scale is None else scale
        out = self.uncond.clone()
        for cond, weight in self.conds:
            out += (cond - self.uncond) * (weight * scale)
        return out


class StepHook:
    """Base class of per-step hooks: override what you need; the rest costs nothing."""

    owner: str = ""  # the script or plug-in, named in errors
    start: float = 0.0
    end: float = 1.0

    def active(self, step: Step) -> bool:
        return self.start <= step.fraction <= self.end

    def applied(self, unet) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def unet_inputs(self, call: UNetCall) -> dict[str, Any] | None:
        return None

    def combine(self, guidance: Guidance) -> torch.Tensor | None:
        return None

    def after_cfg(self, guidance: Guidance, denoised: torch.Tensor) -> torch.Tensor:
        return denoised

    def after_step(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        return x

    def initial_noise(self, noise: torch.Tensor, pass_name: str) -> torch.Tensor:
        """The unit-variance noise (B, C, H, W) the pass ``pass_name`` starts from, before the sampler
        scales it (txt2img) or adds it to the init latent (img2img)."""
        return noise

    def finish_image(self, image, index: int):
        """The decoded picture ``index`` (of the job) before it is given out (ControlNet's inpaint_only pastes
        the unmasked input back); a PIL image in, one out."""
        return image


_METHODS = ("unet_inputs", "combine", "after_cfg", "after_step", "initial_noise")
_SUMMED = ("down_block_additional_residuals", "mid_block_additional_residual",
           "down_intrablock_additional_residuals")
# inputs the denoiser gives itself that a hook may replace (later hooks' calls carry the replacement)
_REPLACED = ("encoder_hidden_states", "added_cond_kwargs")


def _overrides(hook: StepHook, name: str) -> bool:
    return getattr(type(hook), name, None) is not getattr(StepHook, name)


@dataclass
class SamplingPlan:
    """Everything one sampling pass needs besides the sampler: the model, its conditioning, guidance, the
    inpainting inputs and the hooks. The denoiser is built from it."""

    unet: Any
    schedule: DiscreteSchedule
    prediction: str  # "epsilon" or "v_prediction"
    cond: list[ComposedConditioning]  # one entry per image of the batch
    uncond: list[ScheduledConditioning]
    cfg_scale: float
    dtype: torch.dtype
    device: torch.device
    steps: int = 0  # sampling steps of this pass (hook windows are fractions of it)
    pass_name: str = "first"
    add_time_ids: torch.Tensor | None = None  # SDXL's size conditioning
    add_time_ids_uncond: torch.Tensor | None = None  # the negative prompt's, when it differs (the refiner's)
    should_stop: Callable[[], bool] | None = None
    # One image per UNet call makes every image independent of its batch-mates, so an image re-created
    # alone from its infotext has the same pixels (batched GEMMs round differently).
    batch_invariant: bool = False
    image_cond: torch.Tensor | None = None  # 9-channel inpainting UNets: mask + masked-image latent
    latent_mask: LatentMask | None = None  # inpainting: keeps the original latent where the mask says
    hooks: Sequence[StepHook] = field(default_factory=list)
    switch: RefinerSwitch | None = None  # the refiner: another model takes over part-way (engine.refiner)

    def __post_init__(self) -> None:
        # per method, only the hooks that implement it: no hooks or no-op hooks cost one empty loop
        self._by_method = {m: [h for h in self.hooks if _overrides(h, m)] for m in _METHODS}

    def switch_model(self, target: SwitchTarget) -> None:
        """Carry on with another model (the refiner). Hooks feeding the first UNet's inputs stop: their
        residuals fit that UNet only; an inpainting UNet's image conditioning goes if the new one has none."""
        self.unet, self.prediction, self.cond, self.uncond = target.unet, target.prediction, target.cond, target.uncond
        self.add_time_ids, self.add_time_ids_uncond = target.time_ids or (None, None)
        if target.in_channels == 4:
            self.image_cond = None
        self._by_method["unet_inputs"] = []

    def hooks_for(self, method: str, step: Step) -> list[StepHook]:
        return [h for h in self._by_method[method] if h.active(step)]

    @contextlib.contextmanager
    def applied(self):
        """Enter every hook's ``applied(unet)`` for the pass (and leave them, also on errors)."""
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:
                with calling(hook):
                    stack.enter_context(hook.applied(self.unet))
            yield

    def unet_inputs(self, call: UNetCall) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for hook in self.hooks_for("unet_inputs", call.step):
            with calling(hook):
                extra = hook.unet_inputs(call) or {}
            for key, value in extra.items():
                if key not in merged or key in _REPLACED:  # a replacement saw the earlier one in its call
                    merged[key] = value
                elif key in ("down_block_additional_residuals", "down_intrablock_additional_residuals"):
                    merged[key] = [a + b for a, b in zip(merged[key], value)]
                elif key == "mid_block_additional_residual":
                    merged[key] = merged[key] + value
                else:
                    raise HookError(hook.owner or type(hook).__name__,
                                    ValueError(f"UNet input {key!r} is already given by another hook"))
            replaced = {k: extra[k] for k in _REPLACED if k in extra}
            if replaced:
                call = replace(call, **replaced)
        return merged

    def combine(self, guidance: Guidance) -> torch.Tensor:
        out = None
        for hook in self.hooks_for("combine", guidance.step):
            with calling(hook):
                out = hook.combine(guidance)
            if out is not None:
                break
        if out is None:
            out = guidance.cfg()
        for hook in self.hooks_for("after_cfg", guidance.step):
            with calling(hook):
                out = hook.after_cfg(guidance, out)
        return out

    def after_step(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        for hook in self.hooks_for("after_step", step):
            with calling(hook):
                x = hook.after_step(step, x)
        return x

    def initial_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """The pass's starting noise through every hook's ``initial_noise`` (windows do not apply)."""
        for hook in self._by_method["initial_noise"]:
            with calling(hook):
                noise = hook.initial_noise(noise, self.pass_name)
        return noise


def off_the_unet(hooks: Sequence[StepHook]) -> list[StepHook]:
    """The hooks that do not reach into the UNet (no ``unet_inputs``, no ``applied``): what still fits when a
    pass runs on another model than the one the hooks were made for (a refiner)."""
    return [h for h in hooks if not _overrides(h, "unet_inputs") and not _overrides(h, "applied")]


@contextlib.contextmanager
def calling(hook: StepHook):
    """Run a hook's method; what it raises becomes a :class:`HookError` naming its owner."""
    try:
        yield
    except HookError:
        raise
    except Exception as exc:
        raise HookError(hook.owner or type(hook).__name__, exc) from exc
