"""Live previews: a latent turned into a small RGB picture without running the VAE.

The cheap approximation is a fixed linear map from the 4 latent channels to RGB (the published
"approx cheap" coefficients for SD 1.x/2.x and SDXL latents), a few microseconds per image.
"""

from __future__ import annotations

import torch
from PIL import Image

_SD1 = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
_SDXL = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163), (-0.3730, -0.2499, -0.2088))


def cheap_preview(latent: torch.Tensor, sdxl: bool = False) -> Image.Image:
    """One latent (C×H×W, or the first of a batch) as an RGB image of the latent's size."""
    if latent.dim() == 4:
        latent = latent[0]
    coefs = torch.tensor(_SDXL if sdxl else _SD1, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", latent.detach().float().cpu()[:4], coefs)
    rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())
