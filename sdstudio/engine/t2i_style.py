"""T2I style adapter units: the ``clip_vision`` preprocessor (the extension's ``t2ia_style_clipvision``) with a
style adapter file (``t2iadapter_style_sd14v1.pth``, :mod:`sdstudio.models.t2i_style`), as sd-webui-controlnet
runs them.

Before sampling (:func:`style_hook`), the unit's image goes through OpenAI's ViT-L/14 CLIP image encoder
(``models/clip_vision/clip_vitl.pth``, prepared as for IP-Adapter), and the adapter turns the encoder's last
hidden states (257 × 1024) into a few context tokens (8 × 768). At each UNet call in the unit's window
(guidance start/end by step, its Hires. fix option) the tokens × weight are appended to the prompt's rows'
context, and zeros of the same size to the negative prompt's rows (the extension multiplies by its cond/uncond
mark, so every row keeps the same length). Several style units append their tokens in turn. The hook gives the
lengthened ``encoder_hidden_states`` (see :mod:`sdstudio.engine.hooks`); the ControlNet script puts it after
ReVision and before the other units, so ControlNets see the lengthened context, as the extension's do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.controlnet import SCRIPT_NAME, ControlNetError
from ..models.ip_adapter import clip_pixels
from .hooks import StepHook, UNetCall
from .ip_adapter import clip_encoder, encoder_device, encoder_features

MODULE = "clip_vision"
ENCODER = "clip_vitl"


class StyleHook(StepHook):
    """One style unit: ``tokens`` (1, T, context width) float32 from the adapter."""

    def __init__(self, owner: str, tokens: torch.Tensor, weight: float, start: float, end: float, unit=None,
                 hires_job: bool = False):
        self.owner, self.tokens, self.weight, self.start, self.end = owner, tokens, weight, start, end
        self.unit, self.hires_job = unit, hires_job

    def active(self, step) -> bool:
        if not self.start <= step.fraction <= self.end:
            return False
        return self.unit is None or self.unit.in_pass(step.pass_name, self.hires_job)

    def unet_inputs(self, call: UNetCall):
        context = call.encoder_hidden_states
        if context.shape[-1] != self.tokens.shape[-1]:
            raise ControlNetError(f"{self.owner}: the T2I style adapter gives {self.tokens.shape[-1]}-wide tokens; "
                                  f"this checkpoint's context is {context.shape[-1]} wide (pick an adapter made "
                                  f"for its family)")
        rows = torch.tensor([0.0 if u else 1.0 for u in call.uncond], dtype=context.dtype,
                            device=context.device)[:, None, None]
        tokens = self.tokens.to(context.device, context.dtype) * self.weight * rows
        return {"encoder_hidden_states": torch.cat([context, tokens], dim=1)}


def style_tokens(adapter: torch.nn.Module, encoder, image: np.ndarray, device: torch.device,
                 encoder_key: tuple = ()) -> torch.Tensor:
    """The adapter's tokens (1, T, C) float32 on the CPU for an H×W×3 RGB uint8 picture."""
    hidden = encoder_features(encoder, encoder_key, clip_pixels(image), device)["last_hidden_state"]
    width = adapter.style_embedding.shape[-1]
    if hidden.shape[-1] != width:
        raise ControlNetError(f"the T2I style adapter takes {width}-wide CLIP hidden states; this image encoder "
                              f"gives {hidden.shape[-1]} (the adapter was trained on clip_vitl.pth, ViT-L/14)")
    param = next(adapter.parameters())
    with torch.no_grad():
        return adapter(hidden.to(param.device, param.dtype)).float().cpu()


def style_hook(prepared, clip_vision_dir: str | Path, device: torch.device, hires_job: bool) -> StyleHook:
    """The hook of one prepared style unit (``prepared.model``: the loaded adapter; ``prepared.detected``: the
    unit's image). A missing clip_vitl file is a :class:`ControlNetError` naming the unit, file and folder."""
    unit = prepared.unit
    where = f"{SCRIPT_NAME} unit {prepared.index}"
    encoder, key = clip_encoder(clip_vision_dir, ENCODER, where, "the T2I style adapter")
    adapter = prepared.model.module
    try:
        tokens = style_tokens(adapter, encoder, np.asarray(prepared.detected)[:, :, :3],
                              encoder_device(unit, device), key)
    except ControlNetError as exc:
        raise ControlNetError(f"{where}: {exc}") from None
    return StyleHook(where, tokens, unit.weight, unit.guidance_start, unit.guidance_end, unit, hires_job)
