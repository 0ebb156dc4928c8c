"""Vignette: an always-on script that fades the picture's corners during sampling.

An example of sdstudio's plug-in API (docs/plugins.md): one always-on script declared as data, one
per-step hook, a localization and an API route. Install it with ``pip install examples/plugins/sdstudio-vignette``
(the ``sdstudio.plugins`` entry point) or copy ``sdstudio_vignette/`` into the data dir's ``extensions/``.

After each guidance step the hook pulls the prediction toward its own per-channel mean by
``strength * falloff``, where the falloff is 0 inside ``radius`` (a fraction of the half-diagonal) and
rises smoothly to 1 at the corners: the corners lose detail and contrast, the centre is untouched.
"""

from __future__ import annotations

SDSTUDIO_API = 1
NAME = "vignette"
VERSION = "1.0.0"
DESCRIPTION = "Fades the picture's corners during sampling (an example plug-in)"

TITLE = "Vignette"


def _falloff(height: int, width: int, radius: float, device, dtype):
    import torch

    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)[:, None]
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)[None, :]
    r = (xs ** 2 + ys ** 2).sqrt() / 2 ** 0.5  # 0 at the centre, 1 at the corners
    t = ((r - radius) / max(1e-6, 1.0 - radius)).clamp(0.0, 1.0)
    return t * t * (3 - 2 * t)  # smoothstep


def make_hooks(args, req):
    from sdstudio.engine.hooks import StepHook

    class Vignette(StepHook):
        start, end = 0.0, 1.0

        def after_cfg(self, guidance, denoised):
            mask = _falloff(denoised.shape[-2], denoised.shape[-1], args.radius, denoised.device, denoised.dtype)
            mean = denoised.mean(dim=(-2, -1), keepdim=True)
            return denoised + (mean - denoised) * (args.strength * mask)

    return [Vignette()]


def register(api) -> None:
    from sdstudio.core.scripts import Param, Script

    api.add_script(Script(
        TITLE, alwayson=True, enabled="enabled", hooks=make_hooks, aliases=("vignette",),
        params=(
            Param("enabled", False, label="Enable vignette", infotext="Vignette", a1111=0),
            Param("strength", 0.6, label="Strength", infotext="Vignette strength", minimum=0.0, maximum=1.0,
                  step=0.05, a1111=1),
            Param("radius", 0.5, label="Radius", infotext="Vignette radius", minimum=0.0, maximum=0.95, step=0.05,
                  a1111=2),
        ),
        description=DESCRIPTION,
    ))
    api.add_localization("zh_CN", {"Vignette": "暗角", "Enable vignette": "启用暗角", "Strength": "强度",
                                   "Radius": "半径"})

    def routes(service):
        from fastapi import APIRouter

        r = APIRouter(prefix="/vignette")

        @r.get("/version")
        def version():
            return {"version": VERSION}

        return r

    api.add_api_routes(routes)
