"""Scripts above the engine: the built-in scripts' declarations (:class:`sdstudio.core.scripts.Script`)
and :class:`Studio`, which runs a request with its scripts on an engine.

Importing this package imports no torch: a script's runner imports the engine when it runs.
"""

from .controlnet import CONTROLNET
from .guidance import CFG_RESCALE, DYNAMIC_THRESHOLDING, FREEU
from .img2img import LOOPBACK, OUTPAINTING_MK2, POOR_MANS_OUTPAINTING, SD_UPSCALE
from .pag import PAG
from .plots import PROMPT_MATRIX, PROMPTS_FROM_FILE, XYZ_PLOT
from .soft_inpainting import SOFT_INPAINTING
from .studio import Paused, ScriptContext, Studio, UnitResult

# in A1111's dropdown order (its script files' alphabetical order)
BUILTIN_SCRIPTS = (LOOPBACK, OUTPAINTING_MK2, POOR_MANS_OUTPAINTING, PROMPT_MATRIX, PROMPTS_FROM_FILE, SD_UPSCALE,
                   XYZ_PLOT, SOFT_INPAINTING, CONTROLNET, DYNAMIC_THRESHOLDING, CFG_RESCALE, FREEU, PAG)

__all__ = ["BUILTIN_SCRIPTS", "Paused", "ScriptContext", "Studio", "UnitResult"]
