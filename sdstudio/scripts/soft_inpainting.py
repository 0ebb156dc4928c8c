"""A1111's always-on "Soft Inpainting" script, declared so the API's ``alwayson_scripts`` and
``/sdapi/v1/script-info`` know it. Its arguments are img2img request fields (A1111 writes them in the
infotext as its own: :data:`sdstudio.core.params.SOFT_INPAINTING_FIELDS`); the engine reads them
(:mod:`sdstudio.engine.soft_inpaint`).
"""

from __future__ import annotations

from ..core.params import SOFT_INPAINTING_FIELDS
from ..core.scripts import Param, Script

_LABELS = ("Schedule bias", "Preservation strength", "Transition contrast boost", "Mask influence",
           "Difference threshold", "Difference contrast")

SOFT_INPAINTING = Script(
    "Soft Inpainting", tabs=("img2img",), alwayson=True, request_fields=True, enabled="soft_inpainting",
    params=(Param("soft_inpainting", False, label="Soft inpainting", a1111=0),
            *(Param(name, default, label=label, minimum=low, maximum=high, a1111=i + 1)
              for i, ((name, _key, low, high), label, default)
              in enumerate(zip(SOFT_INPAINTING_FIELDS, _LABELS, (1.0, 0.5, 4.0, 0.0, 0.5, 2.0))))),
    aliases=("soft inpainting",),
    description="Blends the inpainted area into the picture during sampling and in the final composite.",
)
