"""ReVision units (SDXL): a picture in place of the prompt's pooled text embedding, as sd-webui-controlnet runs
its ``revision_clipvision`` and ``revision_ignore_prompt`` preprocessors (no model file: the unit's model is
"None").

Before sampling (:func:`revision_hook`), the unit's image goes through the ViT-bigG CLIP vision encoder
(``models/clip_vision/clip_g.pth``, prepared as for IP-Adapter: stretched to 224² with area interpolation, CLIP's
mean and std) and its ``image_embeds`` (1280 wide, the width of SDXL's pooled prompt) are noised once, as the
extension's "Noise Augmentation" slider does: ``sqrt(ᾱ_k)·e + sqrt(1-ᾱ_k)·n`` at ``k = int(1000·a)`` clipped to
0-999, on the linear schedule of Stable Diffusion's low-scale models (β from 1e-4 to 2e-2, square-root spaced),
``n`` drawn from the job's seed (the extension draws it from the global generator; even ``a`` = 0 adds 1 %).

At each UNet call in a unit's window (``guidance_start <= i / n <= guidance_end``, both passes of Hires. fix),
the pooled embedding of the prompt's rows becomes the sum of the active units' embeddings times their weights,
and that of the negative prompt's rows becomes zeros (the extension multiplies by its cond/uncond mark); the
size conditioning stays. When a unit is active and any unit is ``revision_ignore_prompt`` — or the prompt and
the negative prompt are both empty — the cross-attention context of every row is zeros too. The hook gives
these as replaced ``added_cond_kwargs`` / ``encoder_hidden_states`` (see :mod:`sdstudio.engine.hooks`); the
ControlNet script puts it before the other units' hooks, so ControlNets see the replaced inputs as the
extension's do. SDXL only: on another family the unit is an error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.controlnet import SCRIPT_NAME, ControlNetError
from ..models.ip_adapter import clip_pixels
from .hooks import StepHook, UNetCall
from .ip_adapter import clip_encoder, encoder_device, encoder_features

MODULES = ("revision_clipvision", "revision_ignore_prompt")
IGNORE_PROMPT = "revision_ignore_prompt"
ENCODER = "clip_g"


def augmentation_schedule(timesteps: int = 1000, start: float = 1e-4, end: float = 2e-2
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(ᾱ)`` and ``sqrt(1-ᾱ)`` of the low-scale models' linear schedule (float32, as the extension keeps
    them): β = linspace(√start, √end, timesteps)², computed in float64."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return alphas_cumprod.sqrt().float(), (1.0 - alphas_cumprod).sqrt().float()


def noise_level(amount: float) -> int:
    """The schedule index of the "Noise Augmentation" value: ``int(amount * 1000)`` in 0-999."""
    return min(999, max(0, int(amount * 1000)))


def augmented(embeds: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """``embeds`` noised to the level of ``amount`` (see the module's docstring)."""
    keep, noise_scale = augmentation_schedule()
    k = noise_level(amount)
    noise = torch.randn(embeds.shape, generator=generator, dtype=torch.float32)
    return keep[k] * embeds.float() + noise_scale[k] * noise


@dataclass(frozen=True)
class RevisionUnit:
    index: int
    embeds: torch.Tensor  # (1, P) float32, noise-augmented
    weight: float
    start: float
    end: float

    def in_window(self, fraction: float) -> bool:
        return self.start <= fraction <= self.end


class RevisionHook(StepHook):
    """Every ReVision unit of a job, in one hook (their embeddings are summed into one pooled embedding)."""

    def __init__(self, units: Sequence[RevisionUnit], ignore_prompt: bool):
        self.units = list(units)
        self.ignore_prompt = ignore_prompt
        self.owner = f"{SCRIPT_NAME} unit {self.units[0].index}" if len(self.units) == 1 else \
            f"{SCRIPT_NAME} units {', '.join(str(u.index) for u in self.units)}"

    def active(self, step) -> bool:
        return any(u.in_window(step.fraction) for u in self.units)

    def unet_inputs(self, call: UNetCall):
        added = call.added_cond_kwargs
        if added is None or "text_embeds" not in added or "time_ids" not in added:
            raise ControlNetError(f"{self.owner}: ReVision works on SDXL checkpoints only (this UNet takes no pooled "
                                  f"prompt and size conditioning)")
        pooled = added["text_embeds"]
        units = [u for u in self.units if u.in_window(call.step.fraction)]
        summed = torch.stack([u.embeds * u.weight for u in units]).sum(dim=0)
        width = summed.shape[-1]
        if width > pooled.shape[-1]:
            raise ControlNetError(f"{self.owner}: the CLIP image embedding is {width} wide, more than this "
                                  f"checkpoint's pooled prompt ({pooled.shape[-1]}); ReVision needs clip_g.pth, "
                                  f"the ViT-bigG encoder")
        prompt_rows = torch.tensor([0.0 if u else 1.0 for u in call.uncond], dtype=pooled.dtype,
                                   device=pooled.device)[:, None]
        replaced = pooled.clone()
        replaced[:, :width] = summed.to(pooled.device, pooled.dtype) * prompt_rows
        out = {"added_cond_kwargs": {**added, "text_embeds": replaced}}
        if self.ignore_prompt:
            out["encoder_hidden_states"] = torch.zeros_like(call.encoder_hidden_states)
        return out


def image_embeds(encoder, image: np.ndarray, device: torch.device, encoder_key: tuple = ()) -> torch.Tensor:
    """The encoder's ``image_embeds`` (1, P) float32 on the CPU of an H×W×3 RGB uint8 picture, remembered as
    IP-Adapter's features are when ``encoder_key`` names the encoder's file."""
    return encoder_features(encoder, encoder_key, clip_pixels(image), device)["image_embeds"]


def revision_hook(prepared: Sequence, clip_vision_dir: str | Path, device: torch.device, seed: int,
                  empty_prompts: bool) -> RevisionHook:
    """One hook for a job's prepared ReVision units (``PreparedUnit`` whose ``detected`` is the unit's image).
    ``seed``: the job's, for the noise augmentation; ``empty_prompts``: the prompt and the negative prompt are
    both empty (the context is zeroed, as with ``revision_ignore_prompt``). A missing clip_g file is a
    :class:`ControlNetError` naming the unit, the file and the folder."""
    encoder, key = clip_encoder(clip_vision_dir, ENCODER, f"{SCRIPT_NAME} unit {prepared[0].index}", "ReVision")
    generator = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    units = []
    for p in prepared:
        unit = p.unit
        embeds = image_embeds(encoder, np.asarray(p.detected)[:, :, :3], encoder_device(unit, device), key)
        units.append(RevisionUnit(p.index, augmented(embeds, unit.threshold_a, generator), unit.weight,
                                  unit.guidance_start, unit.guidance_end))
    ignore = empty_prompts or any(p.unit.module == IGNORE_PROMPT for p in prepared)
    hook = RevisionHook(units, ignore)
    hook.prepared_units = list(prepared)  # the units as used, for the infotext
    return hook
