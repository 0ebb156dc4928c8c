"""The checkpoint merger: A1111's three modes, its options and metadata, block weights and LoRAs merged in.

The maths is A1111's (``modules/extras.py`` ``run_modelmerger``), key by key:

- "Weighted sum": ``(1 - M) * A + M * B``; "Add difference": ``A + M * (B - C)``; "No interpolation": A alone
  (to convert to fp16 / safetensors, bake in a VAE or drop weights).
- Only keys whose name contains ``model`` and that B also has are merged; the rest of A is kept as it is, and
  keys only in B are left out. For "Add difference" a key of B that C lacks counts as a zero difference.
- A first conv of 9 (inpainting) or 8 (instruct-pix2pix) input channels merged with B's 4: only the first 4
  channels are merged, the rest stay A's, and the result is named ``.inpainting`` / ``.instruct-pix2pix``. The
  other way round (A normal, B inpainting) is refused, as in A1111.
- fp16 ("Save as float16") halves the float32 tensors that were merged (all of A's with "No interpolation");
  a baked-in VAE replaces A's ``first_stage_model.*`` tensors (halved too); the discard regex drops every key
  it finds (``re.search``), after the rest.
- Metadata as A1111 writes it when "Save metadata" is on: the inputs' metadata copied, ``format: pt``,
  ``sd_merge_recipe`` and ``sd_merge_models`` (JSON strings). A ``.ckpt`` carries none (a plain state dict).

Beyond A1111: block weights (supermerger's names: 26 values BASE, IN00-IN11, M00, OUT00-OUT11 for SD 1.x/2.x,
20 for SDXL: BASE, IN00-IN08, M00, OUT00-OUT08; each key's multiplier is its block's value), and LoRA/LyCORIS
files merged into the result with the engine's own key mapping (:mod:`sdstudio.engine.lora`), so a merged-in
LoRA is exactly what applying it at generation time gives.

Memory: the inputs are read lazily, one tensor at a time (safetensors memory-maps), and a ``.safetensors``
result is written as it is made (its header first, from a dry run of the same code on shape-only "meta"
tensors, then each tensor's bytes), so the peak is a few tensors, not whole models. A ``.ckpt`` result is a
pickle and is built whole in memory, as A1111 does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .detect import UNET_PREFIX, VAE_PREFIX, ModelSpec, detect
from .errors import ModelFileError
from .files import legacy_model_hash, sha256_file
from .safe_load import open_state_dict

METHODS = ("No interpolation", "Weighted sum", "Add difference")
FORMATS = ("ckpt", "safetensors")
CONFIG_SOURCES = ("A, B or C", "B", "C", "Don't")  # A1111's radio, read by index

BLOCKS_SD = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
BLOCKS_SDXL = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]

# A1111's checkpoint_dict_skip_on_merge: never merged, kept as A has it
SKIP_ON_MERGE = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}

_INPUT = re.compile(r"\.input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"\.output_blocks\.(\d+)\.")


class MergeError(ModelFileError):
    """A merge that cannot be done as asked (a missing model, shapes that do not fit, a bad option)."""


# ---- block weights ----------------------------------------------------------------------------------

def block_names(sdxl: bool) -> list[str]:
    return BLOCKS_SDXL if sdxl else BLOCKS_SD


def block_of(key: str, sdxl: bool) -> str:
    """The supermerger block of a checkpoint key. UNet: ``input_blocks.N`` -> IN0N, ``middle_block`` -> M00,
    ``output_blocks.N`` -> OUT0N; the time (and SDXL's label) embedding belong to IN00, the final ``out`` to the
    last OUT block. Everything else (text encoders, VAE, the rest) is BASE. (supermerger leaves a few SDXL
    tensors that are neither ``weight`` nor ``bias``, e.g. OpenCLIP's ``text_projection``, unmerged; here they
    take BASE, so equal block weights give exactly the plain merge.)"""
    if not key.startswith(UNET_PREFIX):
        return "BASE"
    rest = key[len(UNET_PREFIX):]
    if rest.startswith("time_embed.") or (sdxl and rest.startswith("label_emb.")):
        return "IN00"
    if rest.startswith("out."):
        return "OUT08" if sdxl else "OUT11"
    if m := _INPUT.search(key):
        return f"IN{int(m[1]):02d}"
    if ".middle_block." in key:
        return "M00"
    if m := _OUTPUT.search(key):
        return f"OUT{int(m[1]):02d}"
    return "BASE"


def parse_block_weights(values: str | Iterable[float] | None, sdxl: bool) -> list[float] | None:
    """``"0.5,0.5,..."`` or a list -> 26 (SD 1.x/2.x) or 20 (SDXL) floats; a wrong count is an error."""
    if values is None or values == "" or values == []:
        return None
    if isinstance(values, str):
        try:
            values = [float(v) for v in values.replace("\n", ",").split(",") if v.strip()]
        except ValueError:
            raise MergeError(f"block weights: {values!r} is not a comma-separated list of numbers") from None
    out = [float(v) for v in values]
    names = block_names(sdxl)
    if len(out) != len(names):
        raise MergeError(f"block weights: {len(out)} values given; this {'SDXL' if sdxl else 'SD 1.x/2.x'} model "
                         f"takes {len(names)} ({', '.join(names)})")
    return out


# ---- reading ----------------------------------------------------------------------------------------

class _Source:
    """A model file read tensor by tensor: names, shapes and dtypes up front, tensors on request. A safetensors
    file's tensors are read with plain file reads into their own memory, not through a memory map: pages of a
    map stay in the process's resident set once touched, so reading two mapped 2 GB models would hold 4 GB."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.state = open_state_dict(self.path)  # its checks (header, truncation, the pickle's safety)
        self.shapes = self.state.shapes
        self.metadata = dict(self.state.metadata)
        self.offsets: dict[str, tuple[int, int]] = {}
        if self.path.suffix.lower() == ".safetensors":
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            unknown = sorted({v["dtype"] for v in header.values()} - set(_TORCH_DTYPES))
            if unknown:
                raise MergeError(f"{self.path.name}: tensors of type {', '.join(unknown)} cannot be merged")
            self.dtypes = {k: _TORCH_DTYPES[v["dtype"]] for k, v in header.items()}
            self.offsets = {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
                            for k, v in header.items()}
            self._file = open(self.path, "rb")  # noqa: SIM115 - read from for the whole merge
        else:
            self.dtypes = {k: self.state[k].dtype for k in self.shapes}

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def keys(self):
        return self.shapes.keys()

    def get(self, key: str, meta: bool) -> torch.Tensor:
        if meta:
            return torch.empty(self.shapes[key], dtype=self.dtypes[key], device="meta")
        if key not in self.offsets:
            return self.state[key]
        start, size = self.offsets[key]
        if size == 0:
            return torch.empty(self.shapes[key], dtype=self.dtypes[key])
        data = bytearray(size)
        self._file.seek(start)
        if self._file.readinto(data) != size:
            raise MergeError(f"{self.path.name}: {key} is cut short (truncated file?)")
        return torch.frombuffer(data, dtype=self.dtypes[key]).reshape(self.shapes[key])

    def close(self) -> None:
        if self.offsets:
            self._file.close()


def _vae_state(path: Path) -> dict[str, torch.Tensor]:
    """A VAE file's tensors under the checkpoint's names (without ``first_stage_model.``), as A1111 reads
    it (``loss*`` and EMA counters left out). A ``first_stage_model.`` prefix or diffusers names are read too."""
    from .convert import component_to_ldm

    state = open_state_dict(path)
    out = {k.removeprefix(VAE_PREFIX): state[k] for k in state
           if not k.startswith("loss") and k not in ("model_ema.decay", "model_ema.num_updates")}
    if any(".down_blocks." in k or ".up_blocks." in k for k in out):  # a diffusers VAE
        levels = 1 + max(int(m[1]) for k in out if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
        out = component_to_ldm(out, "", "vae", levels=levels)
    return out


# ---- LoRAs in checkpoint names ----------------------------------------------------------------------

@dataclass
class _LoraUpdate:
    parts: dict
    mult: float
    rows: slice | None = None  # rows of a fused weight (OpenCLIP's in_proj: q, k, v)
    transposed: bool = False  # OpenCLIP's text_projection is stored as the Linear's weight transposed


def _meta_model(spec: ModelSpec, path: Path):
    """The model's modules with shape-only weights: what the engine's LoRA index is built over."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers.initialization import no_init_weights

    from .loader import LoadedModel

    with init_empty_weights(include_buffers=False), no_init_weights():
        unet = UNet2DConditionModel(**spec.unet)
        encoders = [(CLIPTextModelWithProjection if te.with_projection else CLIPTextModel)(CLIPTextConfig(**te.config))
                    for te in spec.text_encoders]
    return LoadedModel(path, spec, unet, None, encoders, [], torch.float32)


def _te_key(te, name: str, keys) -> tuple[str, slice | None, bool] | None:
    """A text-encoder module's weight -> (checkpoint key, rows, transposed)."""
    from .convert import hf_to_openclip

    canonical = name if name.startswith(("text_model.", "text_projection")) else "text_model." + name
    if te.layout == "clip_hf":
        for key in (te.prefix + canonical + ".weight", te.prefix + canonical.removeprefix("text_model.") + ".weight"):
            if key in keys:
                return key, None, False
        return None
    ldm = hf_to_openclip(canonical + ".weight")
    if ldm is None:
        return None
    if ldm.endswith("in_proj_weight"):
        width = te.config["hidden_size"]
        part = "qkv".index(canonical.split("self_attn.")[1][0])
        return te.prefix + ldm, slice(part * width, (part + 1) * width), False
    return te.prefix + ldm, None, ldm == "text_projection"


def lora_updates(spec: ModelSpec, keys, loras: list[tuple[Path, float]], path: Path
                 ) -> tuple[dict[str, list[_LoraUpdate]], list[str]]:
    """Each checkpoint key a LoRA changes -> its updates, through the engine's own module index (the names
    every LoRA layout uses, resolved to the model's modules), mapped back to the checkpoint's names."""
    from ..engine.lora import LoraFile
    from .convert import unet_hf_to_ldm

    if spec.is_flow:
        raise MergeError("merging LoRAs into SD 3.x / Flux checkpoints is not supported")
    model = _meta_model(spec, path)
    where: dict[int, tuple[str, object]] = {}
    for name, module in model.unet.named_modules():
        ldm = unet_hf_to_ldm(name + ".weight", spec.layers_per_block, list(spec.up_has_attention))
        if ldm:
            where[id(module)] = ("unet", (UNET_PREFIX + ldm, None, False))
    for te, encoder in zip(spec.text_encoders, model.text_encoders):
        for name, module in encoder.named_modules():
            found = _te_key(te, name, keys)
            if found:
                where[id(module)] = ("te", found)
    work: dict[str, list[_LoraUpdate]] = defaultdict(list)
    notes = []
    for lora_path, weight in loras:
        lora = LoraFile(Path(lora_path), model)
        if lora.unmatched:
            notes.append(f"{Path(lora_path).name}: {len(lora.unmatched)} module(s) do not fit this model")
        for _, target, parts in lora.targets:
            found = where.get(id(target))
            if found is None:
                notes.append(f"{Path(lora_path).name}: a module has no checkpoint key")
                continue
            key, rows, transposed = found[1]
            work[key].append(_LoraUpdate(parts, float(weight), rows, transposed))
            if "diff_b" in parts and key.endswith(".weight"):
                work[key[: -len("weight")] + "bias"].append(_LoraUpdate({"diff": parts["diff_b"]}, float(weight), rows))
    return dict(work), notes


def _apply_loras(tensor: torch.Tensor, updates: list[_LoraUpdate]) -> torch.Tensor:
    """The tensor with the updates added in float32 (as the engine applies them), back in its dtype."""
    from ..engine.lora import add_update

    if tensor.is_meta:
        return tensor
    merged = tensor.float().clone()
    for u in updates:  # each update reads the weight before any of them (IA3 scales it), as the engine does
        base = tensor[u.rows] if u.rows is not None else tensor
        buf = merged[u.rows] if u.rows is not None else merged
        if u.transposed:
            tmp = buf.t().contiguous()
            add_update(tmp, base.t(), u.parts, u.mult)
            buf.copy_(tmp.t())
        else:
            add_update(buf, base, u.parts, u.mult)
    return merged.to(tensor.dtype)


# ---- the merge --------------------------------------------------------------------------------------

def _to_half(t: torch.Tensor, enable: bool) -> torch.Tensor:
    return t.half() if enable and t.dtype == torch.float32 else t


@dataclass
class MergePlan:
    """What a merge will write, from the dry run: the keys in order with shapes and dtypes, and the
    result's kind (A1111 names inpainting / instruct-pix2pix results by it)."""

    keys: list[tuple[str, tuple[int, ...], torch.dtype]] = field(default_factory=list)
    inpainting: bool = False
    instruct_pix2pix: bool = False
    discarded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Merger:
    def __init__(self, a: _Source, b: _Source | None, c: _Source | None, method: str, multiplier: float,
                 fp16: bool, vae: dict[str, torch.Tensor] | None, discard: str | None,
                 block_weights: list[float] | None, sdxl: bool, loras: dict[str, list[_LoraUpdate]]):
        self.a, self.b, self.c = a, b, c
        self.method, self.multiplier, self.fp16 = method, float(multiplier), fp16
        self.vae, self.block_weights, self.sdxl, self.loras = vae, block_weights, sdxl, loras
        try:
            self.discard = re.compile(discard) if discard else None
        except re.error as exc:
            raise MergeError(f"discard weights: {discard!r} is not a regular expression ({exc})") from None

    def alpha(self, key: str) -> float:
        if self.block_weights is None:
            return self.multiplier
        return self.block_weights[block_names(self.sdxl).index(block_of(key, self.sdxl))]

    def combine(self, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
        if self.method == "Weighted sum":
            return ((1 - alpha) * a) + (alpha * b)
        return a + (alpha * b)  # add difference: b is already B - C

    def tensor(self, key: str, meta: bool, plan: MergePlan) -> torch.Tensor:
        """The result's tensor for ``key`` of A (``meta``: shape and dtype only)."""
        t = self.a.get(key, meta)
        merging = self.method != "No interpolation" and "model" in key and key in self.b and key not in SKIP_ON_MERGE
        if merging:
            b = self.b.get(key, meta)
            if self.method == "Add difference":
                b = b - self.c.get(key, meta) if key in self.c else torch.zeros_like(b)
            alpha = self.alpha(key)
            if t.shape != b.shape and t.shape[0:1] + t.shape[2:] == b.shape[0:1] + b.shape[2:]:
                if t.shape[1] == 4 and b.shape[1] == 9:
                    raise MergeError("When merging inpainting model with a normal one, A must be the inpainting model.")
                if t.shape[1] == 4 and b.shape[1] == 8:
                    raise MergeError("When merging instruct-pix2pix model with a normal one, A must be the "
                                     "instruct-pix2pix model.")
                if not ((t.shape[1] == 8 or t.shape[1] == 9) and b.shape[1] == 4):
                    raise MergeError(f"Bad dimensions for merged layer {key}: A={tuple(t.shape)}, B={tuple(b.shape)}")
                if t.shape[1] == 8:
                    plan.instruct_pix2pix = True
                else:
                    plan.inpainting = True
                t = t.clone()
                t[:, 0:4, :, :] = self.combine(t[:, 0:4, :, :], b, alpha)
            elif t.shape != b.shape:
                raise MergeError(f"{key}: A has shape {tuple(t.shape)}, B {tuple(b.shape)}; these models do not merge "
                                 "(different architectures?)")
            else:
                t = self.combine(t, b, alpha)
        if key in self.loras:
            t = _apply_loras(t, self.loras[key])
        if merging:
            t = _to_half(t, self.fp16)
        if self.vae is not None and key.startswith(VAE_PREFIX) and key[len(VAE_PREFIX):] in self.vae:
            v = self.vae[key[len(VAE_PREFIX):]]
            t = _to_half(torch.empty(v.shape, dtype=v.dtype, device="meta") if meta else v, self.fp16)
        if self.method == "No interpolation":
            t = _to_half(t, self.fp16)
        return t

    def kept(self, key: str) -> bool:
        return self.discard is None or not self.discard.search(key)

    def plan(self) -> MergePlan:
        plan = MergePlan()
        for key in self.a:
            if not self.kept(key):
                plan.discarded.append(key)
                continue
            t = self.tensor(key, True, plan)
            plan.keys.append((key, tuple(t.shape), t.dtype))
        return plan


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, plan_keys: list[tuple[str, tuple[int, ...], torch.dtype]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None,
                      progress: Callable[[int, int], None] | None = None) -> None:
    """A safetensors file written tensor by tensor: the header from the plan, then each tensor as ``produce``
    makes it (it must match the plan's shape and dtype)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, shape, dtype in plan_keys:
        if dtype not in _ST_DTYPES:
            raise MergeError(f"{key}: tensors of type {dtype} cannot be saved as safetensors")
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for i, (key, shape, dtype) in enumerate(plan_keys):
            t = produce(key)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{key}: made {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
            f.write(_tensor_bytes(t))
            del t
            if progress:
                progress(i + 1, len(plan_keys))
        f.flush()
        os.fsync(f.fileno())


def model_name(path: Path) -> str:
    """A1111's ``model_name``: the file name without its extension."""
    return Path(path).stem


def output_filename(method: str, a: Path, b: Path | None, c: Path | None, multiplier: float, custom_name: str,
                    fmt: str, plan: MergePlan) -> str:
    """A1111's file name: ``0.7(A) + 0.3(B)``, ``A + 0.3(B - C)`` or ``A`` (or the custom name), then
    ``.inpainting`` / ``.instruct-pix2pix`` for such results, then the format."""
    if custom_name:
        name = custom_name
    elif method == "Weighted sum":
        name = f"{round(1 - multiplier, 2)}({model_name(a)}) + {round(multiplier, 2)}({model_name(b)})"
    elif method == "Add difference":
        name = f"{model_name(a)} + {round(multiplier, 2)}({model_name(b)} - {model_name(c)})"
    else:
        name = model_name(a)
    name += ".inpainting" if plan.inpainting else ""
    name += ".instruct-pix2pix" if plan.instruct_pix2pix else ""
    return name + "." + fmt


def _parsed(metadata: Mapping[str, str], key: str):
    value = metadata.get(key)
    if isinstance(value, str) and value[:1] == "{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def merge_metadata(inputs: list[tuple[Path, _Source, str]], recipe: dict, *, copy_metadata: bool = True,
                   metadata_json: dict | None = None, add_merge_recipe: bool = True,
                   sha256: Callable[[Path], str] = sha256_file) -> dict[str, str]:
    """The result's metadata as A1111 writes it with "Save metadata" on: the inputs' own fields (A, then B,
    then C), the user's JSON, ``format: pt``, and ``sd_merge_recipe`` / ``sd_merge_models``."""
    out: dict[str, str] = {}
    if copy_metadata:
        for _, source, _ in inputs:
            out.update(source.metadata)
    out.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata_json or {}).items()})
    out["format"] = "pt"
    if add_merge_recipe:
        models: dict[str, dict] = {}
        for path, source, name in inputs:
            models[sha256(path)] = {"name": name, "legacy_hash": legacy_model_hash(path),
                                    "sd_merge_recipe": _parsed(source.metadata, "sd_merge_recipe")}
            earlier = _parsed(source.metadata, "sd_merge_models")
            if isinstance(earlier, dict):
                models.update(earlier)
        out["sd_merge_recipe"] = json.dumps(recipe)
        out["sd_merge_models"] = json.dumps(models)
    return out


def _config_source_index(value: int | str | None) -> int:
    if value is None:
        return 0
    if isinstance(value, str) and not value.isdigit():
        if value not in CONFIG_SOURCES:
            raise MergeError(f"config source: {value!r} is not one of {', '.join(CONFIG_SOURCES)}")
        return CONFIG_SOURCES.index(value)
    index = int(value)
    if not 0 <= index < len(CONFIG_SOURCES):
        raise MergeError(f"config source: {index} is not 0-3 ({', '.join(CONFIG_SOURCES)})")
    return index


def copy_config(result: Path, config_source: int, a: Path, b: Path | None, c: Path | None) -> Path | None:
    """A1111's "Copy config from": the ``.yaml`` beside A, B or C (the first found), B's, C's, or none."""
    def config(x):
        if x is None:
            return None
        yaml = Path(x).with_suffix(".yaml")
        return yaml if yaml.is_file() else None

    cfg = [config(a) or config(b) or config(c), config(b), config(c), None][config_source]
    if cfg is None:
        return None
    target = result.with_suffix(".yaml")
    shutil.copyfile(cfg, target)
    return target


def merge(a: str | Path, b: str | Path | None = None, c: str | Path | None = None, *,
          method: str = "Weighted sum", multiplier: float = 0.3, fp16: bool = False, out_path: str | Path,
          fmt: str = "safetensors", custom_name: str = "", bake_vae: str | Path | None = None,
          discard: str | None = None, block_weights: str | Iterable[float] | None = None,
          loras: Iterable[tuple[str | Path, float]] = (), config_source: int | str = 0, save_metadata: bool = True,
          add_merge_recipe: bool = True, copy_metadata: bool = True, metadata_json: dict | None = None,
          names: Mapping[Path, str] | None = None, sha256: Callable[[Path], str] = sha256_file,
          recipe_names: Mapping[str, str] | None = None,
          progress: Callable[[int, int], None] | None = None, plan_out: list | None = None) -> Path:
    """Merge checkpoints as A1111's Checkpoint Merger does (see the module's docstring) and return the file
    written. ``out_path``: a folder (the file is named as A1111 names it, or ``custom_name``) or a file path.
    ``names``: each input's name for ``sd_merge_models`` (A1111's checkpoint name: its path in the checkpoint
    folder; default: the file name); ``recipe_names``: the recipe's ``bake_in_vae`` (VAE name) as the caller
    knows it. ``plan_out``: gets the :class:`MergePlan` appended (what was written, the notes)."""
    if method not in METHODS:
        raise MergeError(f"interpolation method: {method!r} is not one of {', '.join(METHODS)}")
    if fmt not in FORMATS:
        raise MergeError(f"checkpoint format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if method != "No interpolation" and b is None:
        raise MergeError("Failed: Merging requires a secondary model.")
    if method == "Add difference" and c is None:
        raise MergeError(f"Failed: Interpolation method ({method}) requires a tertiary model.")
    a = Path(a)
    b = Path(b) if b is not None and method != "No interpolation" else None
    c = Path(c) if c is not None and method == "Add difference" else None
    config_index = _config_source_index(config_source)
    src_a = _Source(a)
    src_b = _Source(b) if b is not None else None
    src_c = _Source(c) if c is not None else None
    try:
        spec = detect(src_a.shapes)
    except ModelFileError:
        spec = None
    sdxl = bool(spec and spec.is_sdxl) or any(k.startswith("conditioner.embedders.1.") for k in src_a)
    weights = parse_block_weights(block_weights, sdxl)
    if weights is not None and method == "No interpolation":
        raise MergeError("block weights need a second model (Weighted sum or Add difference)")
    loras = [(Path(p), float(w)) for p, w in loras]
    lora_work, notes = ({}, [])
    if loras:
        if spec is None:
            raise MergeError(f"{a.name}: not a Stable Diffusion checkpoint this program knows; cannot merge LoRAs in")
        lora_work, notes = lora_updates(spec, src_a.keys(), loras, a)
    vae = _vae_state(Path(bake_vae)) if bake_vae else None
    merger = _Merger(src_a, src_b, src_c, method, multiplier, fp16, vae, discard, weights, sdxl, lora_work)
    plan = merger.plan()
    plan.notes += notes
    out_path = Path(out_path)
    target = out_path / output_filename(method, a, b, c, multiplier, custom_name, fmt, plan) \
        if out_path.is_dir() else out_path
    if target.suffix.lower() != "." + fmt:
        target = target.with_name(target.name + "." + fmt)
    inputs = [(p, s, (names or {}).get(p, p.name)) for p, s in ((a, src_a), (b, src_b), (c, src_c)) if p is not None]
    metadata = None
    if save_metadata and fmt == "safetensors":
        recipe = {
            "type": "webui",
            "primary_model_hash": sha256(a),
            "secondary_model_hash": sha256(b) if b else None,
            "tertiary_model_hash": sha256(c) if c else None,
            "interp_method": method,
            "multiplier": multiplier,
            "save_as_half": fp16,
            "custom_name": custom_name,
            "config_source": config_index,
            "bake_in_vae": (recipe_names or {}).get("bake_in_vae", Path(bake_vae).name if bake_vae else "None"),
            "discard_weights": discard or "",
            "is_inpainting": plan.inpainting,
            "is_instruct_pix2pix": plan.instruct_pix2pix,
        }
        if weights is not None:
            recipe["sdstudio_block_weights"] = weights
        if loras:
            recipe["sdstudio_loras"] = [[p.name, w] for p, w in loras]
        metadata = merge_metadata(inputs, recipe, copy_metadata=copy_metadata, metadata_json=metadata_json,
                                  add_merge_recipe=add_merge_recipe, sha256=sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    scratch = MergePlan()
    try:
        if fmt == "safetensors":
            write_safetensors(tmp, plan.keys, lambda key: merger.tensor(key, False, scratch), metadata, progress)
        else:
            state = {}
            for i, (key, _, _) in enumerate(plan.keys):
                state[key] = merger.tensor(key, False, scratch).contiguous()
                if progress:
                    progress(i + 1, len(plan.keys))
            torch.save(state, tmp)
            del state
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        for source in (src_a, src_b, src_c):
            if source is not None:
                source.close()
    copy_config(target, config_index, a, b, c)
    if plan_out is not None:
        plan_out.append(plan)
    return target
