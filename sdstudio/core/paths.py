"""Where models and outputs live: A1111's folder layout under a data directory, each folder overridable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_precision() -> str:
    """``--precision``'s default: ``SDSTUDIO_PRECISION`` from the environment, else ``autocast``."""
    value = os.environ.get("SDSTUDIO_PRECISION", "autocast")
    return value if value in ("full", "autocast", "half") else "autocast"


@dataclass
class Paths:
    data_dir: Path
    ckpt_dirs: list[Path] = field(default_factory=list)  # --ckpt-dir adds to models/Stable-diffusion
    vae_dir: Path | None = None
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    hypernetwork_dir: Path | None = None
    esrgan_dir: Path | None = None
    realesrgan_dir: Path | None = None
    swinir_dir: Path | None = None
    dat_dir: Path | None = None
    gfpgan_dir: Path | None = None
    codeformer_dir: Path | None = None
    controlnet_dir: Path | None = None
    annotators_dir: Path | None = None  # ControlNet preprocessors' network files (HED, OpenPose...)
    text_encoder_dir: Path | None = None  # SD 3.x / Flux text encoders (CLIP-L, CLIP-G, T5-XXL), Forge's folder
    outputs_dir: Path | None = None
    styles_file: Path | None = None
    vae_approx_dir: Path | None = None  # live preview decoders: TAESD, A1111's Approx NN (models/VAE-approx)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        models = self.data_dir / "models"
        default_ckpt = models / "Stable-diffusion"
        self.ckpt_dirs = [Path(p).expanduser() for p in self.ckpt_dirs] + [default_ckpt]
        self.vae_dir = Path(self.vae_dir or models / "VAE").expanduser()
        self.vae_approx_dir = Path(self.vae_approx_dir or models / "VAE-approx").expanduser()
        self.lora_dir = Path(self.lora_dir or models / "Lora").expanduser()
        self.embeddings_dir = Path(self.embeddings_dir or self.data_dir / "embeddings").expanduser()
        self.hypernetwork_dir = Path(self.hypernetwork_dir or models / "hypernetworks").expanduser()
        self.esrgan_dir = Path(self.esrgan_dir or models / "ESRGAN").expanduser()
        self.realesrgan_dir = Path(self.realesrgan_dir or models / "RealESRGAN").expanduser()
        self.swinir_dir = Path(self.swinir_dir or models / "SwinIR").expanduser()
        self.dat_dir = Path(self.dat_dir or models / "DAT").expanduser()
        self.gfpgan_dir = Path(self.gfpgan_dir or models / "GFPGAN").expanduser()
        self.codeformer_dir = Path(self.codeformer_dir or models / "Codeformer").expanduser()
        self.controlnet_dir = Path(self.controlnet_dir or models / "ControlNet").expanduser()
        self.annotators_dir = Path(self.annotators_dir or self.controlnet_dir / "annotators").expanduser()
        self.text_encoder_dir = Path(self.text_encoder_dir or models / "text_encoder").expanduser()
        self.outputs_dir = Path(self.outputs_dir or self.data_dir / "outputs").expanduser()
        self.styles_file = Path(self.styles_file or self.data_dir / "styles.csv").expanduser()

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def upscaler_dirs(self) -> list[Path]:
        return [self.esrgan_dir, self.realesrgan_dir, self.swinir_dir, self.dat_dir]

    @property
    def face_restorer_dirs(self) -> dict[str, Path]:
        return {"CodeFormer": self.codeformer_dir, "GFPGAN": self.gfpgan_dir}

    @property
    def text_encoder_dirs(self) -> list[Path]:
        """Forge's models/text_encoder (or --text-encoder-dir), then ComfyUI's models/clip."""
        return [self.text_encoder_dir, self.models_dir / "clip"]

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def create_layout(self) -> None:
        """Make the folders a user drops files into, as A1111 does on first start."""
        for d in (self.ckpt_dirs[-1], self.vae_dir, self.lora_dir, self.embeddings_dir, self.hypernetwork_dir,
                  self.esrgan_dir, self.gfpgan_dir, self.codeformer_dir, self.controlnet_dir, self.text_encoder_dir,
                  self.vae_approx_dir):
            d.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class DeviceOptions:
    """Launch flags about the device: ``--precision full``, ``--no-half``, ``--no-half-vae``,
    ``--medvram``, ``--lowvram``, ``--xformers``, ``--use-cpu``, ``--compile``, ``--fp8``."""

    precision: str = field(default_factory=default_precision)
    no_half: bool = False
    no_half_vae: bool = False
    medvram: bool = False
    lowvram: bool = False
    xformers: bool = False
    compile: bool = False
    use_cpu: bool = False
    fp8: bool = False  # the diffusion model's weights stored in float8 (e4m3fn), cast per layer when it runs
