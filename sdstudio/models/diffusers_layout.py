"""Diffusers folders: loading one as a checkpoint, and writing the config-only folder that describes
a detected single-file checkpoint (what diffusers' ``from_single_file(config=...)`` needs offline)."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .detect import ModelSpec, TextEncoderSpec
from .errors import ModelFileError

SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
    "timestep_spacing": "leading", "prediction_type": "epsilon",
}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file() and (path / "unet").is_dir()


def _tokenizer_files(folder: Path, pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    source = resources.files("sdstudio.models") / "configs" / "clip_tokenizer"
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(str(source / name), folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad_token,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "do_lower_case": True}))


def _text_config(te: TextEncoderSpec) -> dict:
    arch = "CLIPTextModelWithProjection" if te.with_projection else "CLIPTextModel"
    return {"architectures": [arch], "model_type": "clip_text_model", **te.config}


def write_config_folder(spec: ModelSpec, folder: Path) -> Path:
    """Write model_index.json and every component's config (no weights) for ``spec``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sdxl = spec.is_sdxl
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    index = {"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    names = ["text_encoder", "text_encoder_2"][: len(spec.text_encoders)]
    for name, te in zip(names, spec.text_encoders):
        index[name] = ["transformers", "CLIPTextModelWithProjection" if te.with_projection else "CLIPTextModel"]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(_text_config(te)))
        _tokenizer_files(folder / name.replace("text_encoder", "tokenizer"), te.pad_token)
    if not sdxl:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index))
    for name, config, cls in (("unet", spec.unet, "UNet2DConditionModel"), ("vae", spec.vae, "AutoencoderKL")):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps({"_class_name": cls, **config}))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SCHEDULER_CONFIG, "prediction_type": spec.prediction}))
    return folder


def load_folder(folder: Path, dtype: torch.dtype):
    """Load a diffusers-format folder into a :class:`~.loader.LoadedModel`."""
    from .detect import ModelSpec, TextEncoderSpec
    from .loader import LoadedModel, clip_tokenizer

    folder = Path(folder)
    if not is_diffusers_folder(folder):
        raise ModelFileError(f"{folder.name}: not a diffusers folder (no model_index.json with a unet/)")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, local_files_only=True)
        encoders, specs = [], []
        for name in ("text_encoder", "text_encoder_2"):
            if not (folder / name).is_dir():
                continue
            cfg = json.loads((folder / name / "config.json").read_text())
            with_proj = "CLIPTextModelWithProjection" in (cfg.get("architectures") or [])
            cls = CLIPTextModelWithProjection if with_proj else CLIPTextModel
            encoders.append(cls.from_pretrained(folder / name, torch_dtype=dtype, local_files_only=True).eval())
            specs.append(cfg)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{folder.name}: cannot load diffusers folder ({exc})") from None
    sched = folder / "scheduler" / "scheduler_config.json"
    prediction = json.loads(sched.read_text()).get("prediction_type", "epsilon") if sched.is_file() else "epsilon"
    if len(encoders) == 2:
        family = "sdxl"
    elif specs[0].get("hidden_act") == "gelu":
        family = "sd2"
    else:
        family = "sd1"
    te_specs = []
    for i, cfg in enumerate(specs):
        openclip = cfg.get("hidden_act") == "gelu"
        te_specs.append(TextEncoderSpec(
            prefix="", layout="openclip" if openclip else "clip_hf", config=cfg,
            with_projection="CLIPTextModelWithProjection" in (cfg.get("architectures") or []),
            pad_token="!" if openclip else "<|endoftext|>",
            hidden_layer=-1 if family == "sd1" else -2, final_norm=family != "sdxl"))
    lpb = unet.config.layers_per_block
    spec = ModelSpec(family, dict(unet.config), dict(vae.config), tuple(te_specs), prediction, lpb,
                     tuple(t.startswith("CrossAttn") for t in unet.config.up_block_types),
                     len(vae.config.block_out_channels))
    for m in (unet, vae):
        m.eval().requires_grad_(False)
    return LoadedModel(folder, spec, unet, vae, encoders, [clip_tokenizer(t.pad_token) for t in te_specs], dtype)
