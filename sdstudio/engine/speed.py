"""A1111's speed options for one job: what each sampling pass gets, and what the infotext says afterwards.

The request carries the options (A1111's settings of the same names, copied when the job is made):
``s_min_uncond`` / ``s_min_uncond_all`` and ``pad_cond_uncond`` / ``pad_cond_uncond_v0`` act in the
denoiser (:class:`sdstudio.engine.denoiser.SpeedOptions`), the token merging ratios through a hook
(:class:`sdstudio.engine.tome.TokenMerging`); so does our ``deepcache_interval``
(:mod:`sdstudio.engine.deepcache`), in the denoiser. The infotext keys A1111 writes only when the option
actually did something (``Pad conds``, ``Pad conds v0``, ``NGMS all steps``) are collected from the
passes' denoisers here; the others (``NGMS``, ``Token merging ratio``...) are written from the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core.params import Txt2ImgRequest, token_merging_ratio
from ..models.loader import LoadedModel
from .conditioning import Conditioning, empty_prompt
from .denoiser import CFGDenoiser, SpeedOptions
from .hooks import StepHook
from .tome import TokenMerging


@dataclass
class SpeedJob:
    req: Txt2ImgRequest
    empty: dict[int, Conditioning] = field(default_factory=dict)  # id(unet) -> its model's empty prompt
    padded: bool = False
    padded_v0: bool = False
    skipped_all_steps: bool = False

    @classmethod
    def prepare(cls, req: Txt2ImgRequest, models: Sequence[LoadedModel | None], device: torch.device,
                placement) -> SpeedJob:
        """Before any LoRA is applied: the empty prompt's encoding of each model, when padding needs it."""
        job = cls(req)
        if req.pad_cond_uncond and not req.pad_cond_uncond_v0:
            for model in models:
                if model is not None and not model.spec.is_flow:
                    with placement.use(*model.text_encoders):
                        job.empty[id(model.unet)] = empty_prompt(model, device, req.clip_skip)
        return job

    def for_pass(self, pass_name: str, model: LoadedModel, refiner: LoadedModel | None = None,
                 seeds: Sequence[int] = ()) -> tuple[list[StepHook], SpeedOptions]:
        """The hooks and the denoiser's options of one pass ("first" or "hires") on ``model``."""
        r, flow = self.req, model.spec.is_flow
        options = SpeedOptions(r.s_min_uncond, r.s_min_uncond_all, r.pad_cond_uncond and not flow,
                                  r.pad_cond_uncond_v0 and not flow, self.empty.get(id(model.unet)),
                                  self.empty.get(id(refiner.unet)) if refiner is not None else None,
                                  deepcache_interval=r.deepcache_interval)
        ratio = token_merging_ratio(r, hires=pass_name == "hires")
        # SD 3.x / Flux.1 are transformers without the UNet's grid blocks: the ratio does nothing there
        # (A1111 has no such models; on SDXL it does nothing either, no attention at full resolution)
        hooks: list[StepHook] = [TokenMerging(ratio, seeds=seeds)] if ratio > 0 and not flow else []
        return hooks, options

    def record(self, denoiser: CFGDenoiser) -> None:
        """After a pass: A1111 keeps these for the rest of the job once a pass set them."""
        self.padded |= denoiser.padded
        self.padded_v0 |= denoiser.padded_v0
        self.skipped_all_steps |= denoiser.skipped_all_steps

    def infotext(self) -> dict[str, object]:
        return {"Pad conds": True if self.padded else None, "Pad conds v0": True if self.padded_v0 else None,
                "NGMS all steps": True if self.skipped_all_steps else None}
