"""Perturbed-Attention Guidance (Ahn et al. 2024), as Forge's built-in "PerturbedAttentionGuidance
Integrated" declares and computes it.

After CFG, the guided prediction is pushed away from a *degraded* conditioned prediction, one made with the
self-attention of the UNet's middle block replaced by identity (each token keeps its own value):
``denoised + scale * (cond - degraded)``. The scale falls by ``attenuation`` % of itself at every denoiser
call it is applied at, and PAG acts between ``start_step`` and ``end_step`` (fractions of the steps, as
Forge counts them: step / (steps - 1)). Forge's infotext keys (``pagi_*``) and positional arguments.

The hook records the conditioned rows' UNet inputs (``unet_inputs``) and, in ``after_cfg``, calls the UNet
once more on them with the perturbed processor: one more UNet evaluation per image and step while on.
Importing this module imports no torch.
"""

from __future__ import annotations

import functools

from ..core.scripts import Param, Script

PAG_NAME = "PerturbedAttentionGuidance Integrated (SD1.x, SD2.x, SDXL)"
MIDDLE_SELF_ATTENTION = "mid_block.attentions.0.transformer_blocks.0.attn1.processor"


class IdentitySelfAttention:
    """An attention processor whose attention map is the identity: out = to_out(to_v(hidden_states))."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        value = attn.to_v(hidden_states)
        out = attn.to_out[1](attn.to_out[0](value))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _PAG:
    """The hook (given the engine's StepHook base by :func:`hook_class`)."""

    def __init__(self, scale: float, attenuation: float, start: float, end: float):
        self.initial, self.attenuation = scale, attenuation
        self.first, self.last = start, end
        self.calls, self.scale = 0, scale  # denoiser calls PAG was applied at in this pass; this call's scale
        self.rows: dict[int, list] = {}  # image -> [(x, t, hidden, weight)] of its conditioned rows
        self.unet = None

    def active(self, step) -> bool:
        at = step.index / (step.steps - 1) if step.steps > 1 else 0.0
        return self.first <= at <= self.last

    def applied(self, unet):
        import contextlib

        self.unet, self.calls = unet, 0  # each pass (batch, Hires. fix) starts at the full scale, as Forge's
        return contextlib.nullcontext()

    def unet_inputs(self, call):
        self.rows = {}
        for r, (image, uncond) in enumerate(zip(call.images, call.uncond)):
            if not uncond:
                self.rows.setdefault(image, []).append((call.x[r:r + 1], call.timestep[r:r + 1],
                                                        call.encoder_hidden_states[r:r + 1]))

    def _degraded(self, rows):
        processors = dict(self.unet.attn_processors)
        perturbed = {**processors, MIDDLE_SELF_ATTENTION: IdentitySelfAttention()}
        self.unet.set_attn_processor(perturbed)
        try:
            return [self.unet(x, t, encoder_hidden_states=h).sample.float()[0] for x, t, h in rows]
        finally:
            self.unet.set_attn_processor(processors)

    def after_cfg(self, guidance, denoised):
        if guidance.image == 0:  # a new denoiser call: the scale falls linearly with the calls PAG acted at
            self.scale = self.initial * (1.0 - self.attenuation / 100.0 * self.calls)
            self.calls += 1
        if self.scale <= 0.0 or self.unet is None or guidance.image not in self.rows:
            return denoised
        weights = [w for _, w in guidance.conds]
        total = sum(weights) or 1.0
        cond = sum(c * w for c, w in guidance.conds) / total
        outs = self._degraded(self.rows[guidance.image])
        degraded = sum(guidance.to_denoised(o) * w for o, w in zip(outs, weights)) / total
        return denoised + (cond - degraded) * self.scale


@functools.cache
def hook_class() -> type:
    from ..engine.hooks import StepHook

    return type("PerturbedAttentionGuidance", (_PAG, StepHook), {"__doc__": _PAG.__doc__, "__module__": __name__})


PAG = Script(
    PAG_NAME, alwayson=True, enabled="enabled",
    params=(
        Param("enabled", False, label=PAG_NAME, infotext="pagi_enabled", a1111=0),
        Param("scale", 3.0, label="Scale", infotext="pagi_scale", minimum=0.0, maximum=100.0, step=0.1, a1111=1),
        Param("attenuation", 0.0, label="Attenuation (linear, % of scale)", infotext="pagi_attenuation",
              minimum=0.0, maximum=100.0, step=0.1, a1111=2),
        Param("start_step", 0.15, label="Start step", infotext="pagi_start_step", minimum=0.0, maximum=1.0, step=0.01,
              a1111=3),
        Param("end_step", 0.6, label="End step", infotext="pagi_end_step", minimum=0.0, maximum=1.0, step=0.01,
              a1111=4),
    ),
    hooks=lambda args, req: [hook_class()(args.scale, args.attenuation, args.start_step, args.end_step)],
    aliases=("pag", "PerturbedAttentionGuidance Integrated"),
    description="Pushes the prediction away from one made with the middle block's self-attention perturbed: "
                "sharper structure (Forge's built-in PAG).",
)
