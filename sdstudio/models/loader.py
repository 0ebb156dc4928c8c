"""Build diffusers / transformers modules from a single-file checkpoint.

Modules are constructed on the ``meta`` device (no random initialisation of weights that are about
to be replaced), then each parameter is assigned the converted tensor read from the memory-mapped
file. Loaded models are kept in a small cache keyed by file identity and dtype, so switching back to
a recent model is instant.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.initialization import no_init_weights

from .convert import convert_component, module_text_state
from .detect import (
    UNET_PREFIX,
    VAE_PREFIX,
    ModelSpec,
    OptionalTensor,
    TextEncoderSpec,
    detect,
    detect_vae,
    optional_tensors,
)
from .errors import ModelFileError
from .safe_load import open_state_dict, usable_weight

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The CLIP BPE tokenizer from the files shipped in this package (no download)."""
    folder = resources.files("sdstudio.models") / "configs" / "clip_tokenizer"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def _materialize(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str,
                 optional: tuple[OptionalTensor, ...] = (), warnings: list[str] | None = None) -> None:
    expected = module.state_dict()
    state = dict(state)
    for opt in optional:  # what real files may leave out (one table per architecture: detect.optional_tensors)
        if opt.key in expected and opt.key not in state:
            like = expected[opt.key]
            state[opt.key] = (torch.ones if opt.fill == "ones" else torch.zeros)(like.shape, dtype=dtype)
            if opt.used and warnings is not None:
                warnings.append(f"{what}: {opt.key} is missing from the file; used {opt.fill} instead")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelFileError(f"{what}: weights do not fit the detected architecture "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelFileError(f"{what}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
    # One pass from the file's map into the module's own memory (a copy: a view of the map must not become
    # a weight, see safe_load), which also upcasts fp8 (float8_e4m3fn / e5m2) files and refuses integer, bool,
    # NaN or infinite weights naming the tensor.
    module.load_state_dict({k: usable_weight(what, k, v, expected[k], dtype) for k, v in state.items()},
                           strict=True, assign=True)
    # Buffers that are not saved (e.g. CLIP's position ids) were created on the real device already.
    module.eval().requires_grad_(False)


def build_unet(spec: ModelSpec, source, dtype: torch.dtype, prefix: str = UNET_PREFIX) -> UNet2DConditionModel:
    with init_empty_weights(include_buffers=False):
        unet = UNet2DConditionModel(**spec.unet)
    state = convert_component(source, prefix, "unet", layers_per_block=spec.layers_per_block)
    _materialize(unet, state, dtype, "UNet")
    return unet


def build_vae(config: dict, levels: int, source, prefix: str, dtype: torch.dtype) -> AutoencoderKL:
    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKL(**config)
    state = convert_component(source, prefix, "vae", levels=levels)
    _materialize(vae, state, dtype, "VAE")
    return vae


def build_text_encoder(te: TextEncoderSpec, source, dtype: torch.dtype, warnings: list[str] | None = None
                       ) -> CLIPTextModel:
    config = CLIPTextConfig(**te.config)
    cls = CLIPTextModelWithProjection if te.with_projection else CLIPTextModel
    with init_empty_weights(include_buffers=False), no_init_weights():  # weights are assigned next
        model = cls(config)
    state = convert_component(source, te.prefix, te.layout)
    if not te.with_projection:
        state.pop("text_projection.weight", None)
    keys = model.state_dict().keys()
    state = module_text_state(state, keys)
    optional = tuple(dataclasses.replace(o, key=o.key if o.key in keys else o.key.removeprefix("text_model."))
                     for o in optional_tensors("text_encoder", te))
    _materialize(model, state, dtype, "text encoder", optional, warnings)
    return model


@dataclass
class LoadedModel:
    path: Path
    spec: ModelSpec
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    tokenizers: list[CLIPTokenizer]
    dtype: torch.dtype
    vae_source: str = "checkpoint"  # "checkpoint" or the VAE file's path
    extras: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # tensors the model uses that the file lacked


def _v_prediction_hint(path: Path) -> bool | None:
    """A1111's convention: a ``.yaml`` beside the checkpoint with ``parameterization: "v"``."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        text = yaml.read_text(errors="replace")
        return "parameterization: \"v\"" in text or "parameterization: v" in text or "parameterization: 'v'" in text
    return None


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None, *,
                    text_encoder_dirs: tuple[Path, ...] = (), vae_dirs: tuple[Path, ...] = ()) -> LoadedModel:
    """A single-file checkpoint. SD 3.x / Flux.1 files take their missing text encoders from
    ``text_encoder_dirs`` and their VAE from ``vae_dirs`` when they do not bundle them."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":  # Forge's / ComfyUI-GGUF's quantized transformers
        return _load_flow(path, dtype, vae_dtype, text_encoder_dirs, vae_dirs)
    source = open_state_dict(path, mapped=True)
    try:
        spec = detect(source.shapes, v_prediction=_v_prediction_hint(path))
    except ModelFileError as exc:
        raise ModelFileError(f"{path.name}: {exc}") from None
    if spec.is_flow:
        return _load_flow(path, dtype, vae_dtype, text_encoder_dirs, vae_dirs)
    try:
        unet = build_unet(spec, source, dtype)
        vae = build_vae(spec.vae, spec.vae_levels, source, VAE_PREFIX, vae_dtype or dtype)
        warnings: list[str] = []
        encoders = [build_text_encoder(te, source, dtype, warnings) for te in spec.text_encoders]
    except ModelFileError as exc:
        raise ModelFileError(f"{path.name}: {exc}") from None
    tokenizers = [clip_tokenizer(te.pad_token) for te in spec.text_encoders]
    for w in warnings:
        log.warning("%s: %s", path.name, w)
    return LoadedModel(path, spec, unet, vae, encoders, tokenizers, dtype, warnings=[f"{path.name}: {w}" for w in warnings])


def _load_flow(path: Path, dtype: torch.dtype, vae_dtype: torch.dtype | None, text_encoder_dirs, vae_dirs
               ) -> LoadedModel:
    """An SD 3.x / Flux.1 model as a LoadedModel: ``unet`` is the transformer, ``text_encoders`` its encoders
    (``extras["encoders"]``: the same by kind: clip_l, clip_g, t5xxl)."""
    from .dit import load_dit

    dm = load_dit(path, dtype, text_encoder_dirs=text_encoder_dirs, vae_dirs=vae_dirs, vae_dtype=vae_dtype)
    latent = dm.vae.config.latent_channels
    spec = ModelSpec(dm.spec.family, {"in_channels": latent, "out_channels": latent, "sample_size": 128},
                     dict(dm.vae.config), (), "flow", dit=dm.spec)
    return LoadedModel(path, spec, dm.transformer, dm.vae, list(dm.text_encoders.values()), [clip_tokenizer()],
                       dtype, vae_source=dm.sources.get("vae", "checkpoint"),
                       extras={"encoders": dict(dm.text_encoders), "sources": dict(dm.sources)})


def load_vae_file(path: str | Path, like: AutoencoderKL, dtype: torch.dtype) -> AutoencoderKL:
    """A stand-alone VAE (``models/VAE``), built with the checkpoint's latent scaling factor."""
    path = Path(path)
    source = open_state_dict(path, mapped=True)
    try:
        prefix, config, levels = detect_vae(source.shapes)
        config["scaling_factor"] = like.config.scaling_factor
        return build_vae(config, levels, source, prefix, dtype)
    except ModelFileError as exc:
        raise ModelFileError(f"{path.name}: {exc}") from None


def unet_width(path: str | Path) -> int | None:
    """The channels of a single-file checkpoint's first UNet block (320 for SD 1.x/2.x/XL), read from the
    header alone; None for other layouts (DiT transformers, folders), pickles (reading one means loading it)
    or unreadable files."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return _unet_width(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _unet_width(path: str, _size: int, _mtime: int) -> int | None:  # keyed by the file's identity
    try:
        shape = open_state_dict(path).shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    except (ModelFileError, OSError):
        return None
    return int(shape[0]) if shape else None


class ModelCache:
    """Recently loaded checkpoints, keyed by (path, size, mtime, dtype); least recently used evicted."""

    def __init__(self, capacity: int = 1):
        self.capacity = capacity
        self._items: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # checkpoints read from disk so far (an X/Y/Z plot's ordering keeps this low)

    def get(self, path: Path, dtype: torch.dtype, vae_dtype: torch.dtype | None = None, *,
            text_encoder_dirs: tuple[Path, ...] = (), vae_dirs: tuple[Path, ...] = ()) -> LoadedModel:
        st = Path(path).stat()
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime, dtype, vae_dtype, tuple(text_encoder_dirs),
               tuple(vae_dirs))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        model = load_checkpoint(path, dtype, vae_dtype, text_encoder_dirs=tuple(text_encoder_dirs),
                                vae_dirs=tuple(vae_dirs))
        with self._lock:
            self.loads += 1
            self._items[key] = model
            while len(self._items) > max(self.capacity, 1):
                self._items.popitem(last=False)
        return model
