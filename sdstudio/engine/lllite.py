"""ControlNet-LLLite units (:mod:`sdstudio.models.lllite`) on the per-step hooks, as sd-webui-controlnet runs them.

During the pass (:meth:`LLLiteHook.applied`) each of the file's modules sits on its attention projection of the
UNet (found from the module's LDM name through the checkpoint conversion's names) as a forward pre-hook: the
projection sees ``x + weight · module(x, c)``, where ``c`` is the control map (the detected map at the
generation size, as -1…1) through the module's ``conditioning1``, brought to the layer's spatial size (nearest
exact) once per size. The hooks are removed after the pass, also on errors.

As in the extension, the nudge applies while ``guidance_start <= step / steps <= guidance_end``, not in
Hires. fix's second pass (the extension skips it there whatever ``hr_option`` says), to every row (the
prompt's and the negative prompt's alike), and several LLLite units on one projection add up (each nudge
computed from the projection's own input).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.controlnet import SCRIPT_NAME, ControlNetError
from ..models.convert import unet_ldm_to_hf
from ..models.lllite import layer_of
from .hooks import StepHook, UNetCall


def projection_path(name: str, layers_per_block: int) -> str:
    """The diffusers module path of a LLLite module's projection (``down_blocks.1.attentions.0.
    transformer_blocks.0.attn1.to_q``)."""
    root, block, transformer, attn, proj = layer_of(name)
    ldm_root = {"input": f"input_blocks.{block}.1", "output": f"output_blocks.{block}.1",
                "middle": "middle_block.1"}[root]
    projection = "to_out.0" if proj == "out_0" else f"to_{proj}"
    hf = unet_ldm_to_hf(f"{ldm_root}.transformer_blocks.{transformer}.{attn}.{projection}.weight", layers_per_block)
    if hf is None:
        raise ControlNetError(f"LLLite module {name}: no such layer in a Stable Diffusion UNet")
    return hf.removesuffix(".weight")


@dataclass
class LLLiteUnit:
    """One unit: ``model`` (:class:`~sdstudio.models.lllite.LLLite`), ``image`` its control map (1, 3, H, W) in
    -1…1 at the generation size."""

    index: int
    model: object
    image: torch.Tensor
    weight: float
    start: float
    end: float


class LLLiteHook(StepHook):
    """Every LLLite unit of a job, in one hook: a projection's nudges are all computed from its own input and
    summed, as the extension's list per layer does."""

    def __init__(self, units: list[LLLiteUnit], device: torch.device, dtype: torch.dtype):
        self.units, self.device, self.dtype = units, torch.device(device), dtype
        self.owner = f"{SCRIPT_NAME} unit {units[0].index}" if len(units) == 1 else \
            f"{SCRIPT_NAME} units {', '.join(str(u.index) for u in units)}"
        self._on: list[bool] = [False] * len(units)  # per unit, for the current UNet call (set by unet_inputs)
        self._latent: tuple[int, int] = (0, 0)
        self._conds: dict[tuple[int, str, int, int], torch.Tensor] = {}

    def active(self, step) -> bool:  # every call: the windows are applied in unet_inputs (the pre-hooks read them)
        return True

    def unet_inputs(self, call: UNetCall):
        first = call.step.pass_name != "hires"
        self._on = [first and u.weight != 0 and u.start <= call.step.fraction <= u.end for u in self.units]
        self._latent = tuple(call.x.shape[-2:])

    def _size(self, tokens: int) -> tuple[int, int]:
        """The layer's (h, w) for ``tokens`` positions of the current latent (a power-of-two downscale)."""
        h, w = self._latent
        factor = round(math.sqrt(h * w / tokens)) if tokens else 1
        return -(-h // factor), -(-w // factor)

    def _pre_hook(self, modules: list[tuple[int, str, object]]):
        def hook(_layer, args):
            if not args or not any(self._on[i] for i, _, _ in modules):
                return None
            x = args[0]
            nudge = 0
            for i, name, module in modules:
                if not self._on[i]:
                    continue
                size = tuple(x.shape[-2:]) if module.conv else self._size(x.shape[1])
                key = (i, name, *size)
                with torch.no_grad():
                    cond = self._conds.get(key)
                    if cond is None:
                        cond = self._conds[key] = module.condition(self.units[i].image.to(x.device, x.dtype), size)
                    nudge = nudge + module(x, cond.to(x.dtype)) * self.units[i].weight
            return (x + nudge, *args[1:])

        return hook

    @contextlib.contextmanager
    def applied(self, unet):
        lpb = unet.config.get("layers_per_block", 2)
        lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
        by_layer: dict[str, list[tuple[int, str, object]]] = {}
        for i, unit in enumerate(self.units):
            unit.model.to(self.device, self.dtype)
            for name, module in unit.model.items():
                by_layer.setdefault(projection_path(name, lpb), []).append((i, name, module))
        handles = []
        try:
            for path, modules in by_layer.items():
                owner = f"{SCRIPT_NAME} unit {self.units[modules[0][0]].index}"
                name, module = modules[0][1], modules[0][2]
                try:
                    layer = unet.get_submodule(path)
                except AttributeError:
                    raise ControlNetError(f"{owner}: the LLLite model's layer {name} is not in this checkpoint's "
                                          f"UNet ({path}); pick an LLLite model made for its family") from None
                width = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels
                expected = module.up[0].out_channels if module.conv else module.up[0].out_features
                if width != expected:
                    raise ControlNetError(f"{owner}: the LLLite module {name} is {expected} wide, the layer {path} "
                                          f"takes {width}; pick an LLLite model made for this checkpoint")
                handles.append(layer.register_forward_pre_hook(self._pre_hook(modules)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._conds.clear()


def lllite_hook(prepared: list, device: torch.device, dtype: torch.dtype, width: int, height: int) -> LLLiteHook:
    """One hook for a job's prepared units whose models are LLLite files; their detected maps are fitted to
    ``width`` × ``height`` (the first pass's size, the only one LLLite acts in) by each unit's resize mode."""
    from .preprocessors import fit_to

    units = []
    for p in prepared:
        fitted = fit_to(p.detected, width, height, p.unit.resize_mode)[:, :, :3]
        hint = torch.from_numpy(np.ascontiguousarray(fitted, np.float32) / 255.0).permute(2, 0, 1)[None]
        units.append(LLLiteUnit(p.index, p.model.module, hint * 2.0 - 1.0, p.unit.weight, p.unit.guidance_start,
                                p.unit.guidance_end))
    hook = LLLiteHook(units, device, dtype)
    hook.prepared_units = list(prepared)  # the units as used, for the infotext
    return hook
