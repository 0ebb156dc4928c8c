"""LoRA and LyCORIS networks applied to a loaded model for the length of one job.

Supported files: kohya / A1111 LoRA and LoCon (``lora_unet_*``, ``lora_te_*``, SDXL ``lora_te1_*`` /
``lora_te2_*``, with diffusers- or LDM-style module names), LyCORIS LoHa (``hada_*``), LoKr (``lokr_*``), both also in their Tucker form for convs (``hada_t1`` /
``hada_t2``, ``lokr_t2``),
(IA)^3 (``weight`` + ``on_input``) and full-diff (``diff``, ``diff_b``), and diffusers / PEFT files
(``unet.<module>.lora.down.weight``, ``lora_A`` / ``lora_B``). Delta = scale x multiplier x update, with
scale = alpha / rank.

Applying merges the deltas into new weight tensors and swaps them in; leaving swaps the original
tensors back. The originals are never modified, so any number of jobs with any weights leaves the base
model bit-identical (no drift), and sampling costs nothing extra.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping

import torch

from ..models.convert import unet_hf_to_ldm
from ..models.errors import ModelFileError
from ..models.loader import LoadedModel
from ..models.safe_load import open_state_dict

_SUFFIXES = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "lora.down.weight", "lora.up.weight",
    "lora_A.weight", "lora_B.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a",
    "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "hada_t1", "hada_t2", "lokr_t2", "diff", "diff_b", "weight",
    "on_input", "dora_scale",
)


def _module_index(model: LoadedModel) -> dict[str, tuple[str, torch.nn.Module]]:
    """Every LoRA-able module under each name a LoRA file may use for it -> ("unet"|"te", module)."""
    index: dict[str, tuple[str, torch.nn.Module]] = {}
    lpb, up_attn = model.spec.layers_per_block, list(model.spec.up_has_attention)
    for name, module in model.unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        index["lora_unet_" + name.replace(".", "_")] = ("unet", module)
        index["unet." + name] = ("unet", module)
        ldm = unet_hf_to_ldm(name + ".weight", lpb, up_attn)
        if ldm:
            index["lora_unet_" + ldm.removesuffix(".weight").replace(".", "_")] = ("unet", module)
    prefixes = [("lora_te_", "text_encoder.")] if len(model.text_encoders) == 1 else \
        [("lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2.")]
    for (kohya, diffusers), encoder in zip(prefixes, model.text_encoders):
        for name, module in encoder.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            canonical = name if name.startswith(("text_model.", "text_projection")) else "text_model." + name
            index[kohya + canonical.replace(".", "_")] = ("te", module)
            index[diffusers + canonical] = ("te", module)
            index[diffusers + name] = ("te", module)
    return index


def _group(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key in state:
        for suffix in _SUFFIXES:
            if key.endswith("." + suffix):
                groups[key[: -len(suffix) - 1]][suffix] = state[key]
                break
    return groups


def _low_rank(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(up, down, scale) of a plain LoRA/LoCon entry as 2-D matrices, or None for other network kinds.
    Linear, 1x1 conv and LoCon's kxk-down / 1x1-up conv all reduce to ``up @ down``."""
    down = parts.get("lora_down.weight", parts.get("lora.down.weight", parts.get("lora_A.weight")))
    if down is None:
        return None
    if "lora_mid.weight" in parts:
        raise ModelFileError("LoCon with a CP-decomposed mid weight is not supported yet")
    up = parts.get("lora_up.weight", parts.get("lora.up.weight", parts.get("lora_B.weight")))
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    rank = down.shape[0]
    return up.float().flatten(1), down.float().flatten(1), (alpha / rank) if alpha else 1.0


def _tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker (CP) form of a conv update: ``core`` [r, r, kh, kw], ``up`` [r, out], ``down``
    [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, up, down)


def _delta(parts: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The full-size update of a LyCORIS / full-diff / (IA)^3 entry (before the multiplier); ``weight`` is
    the base weight, which (IA)^3 scales. Plain LoRA entries never get here (see :func:`_add_update`)."""
    shape = weight.shape
    f = {k: v.to(weight.device, torch.float32) for k, v in parts.items()}  # computed where the weight lives
    alpha = float(f["alpha"]) if "alpha" in f else None
    if "hada_w1_a" in f:  # LoHa: the Hadamard product of two low-rank (or Tucker) updates
        rank = f["hada_w1_b"].shape[0]
        halves = []
        for i in ("1", "2"):
            up, down = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]
            core = f.get(f"hada_t{i}")
            halves.append((_tucker(core, up, down) if core is not None else up.flatten(1) @ down.flatten(1))
                          .reshape(shape))
        return halves[0] * halves[1] * ((alpha / rank) if alpha else 1.0)
    if any(k.startswith("lokr_") for k in f):
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"].flatten(1)
        rank = f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else None
        if w2.ndim == 4 or len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1)
        d = torch.kron(w1, w2).reshape(shape)
        return d * ((alpha / rank) if (alpha and rank) else 1.0)
    if "diff" in f:
        return f["diff"].reshape(shape)
    if "weight" in f:  # (IA)^3: scale the weight per output (or per input) channel
        w = f["weight"]
        if "on_input" in f and bool(f["on_input"]):
            return weight.float() * w.reshape(1, -1, *([1] * (len(shape) - 2)))
        return weight.float() * w.reshape(-1, *([1] * (len(shape) - 1)))
    raise ModelFileError(f"unknown network entries {sorted(f)}")


class LoraFile:
    """A network file, grouped per module and resolved against one model's modules."""

    def __init__(self, path, model: LoadedModel):
        self.path = path
        state = open_state_dict(path)
        groups = _group(state)
        if not groups:
            raise ModelFileError(f"{path.name}: no LoRA/LyCORIS entries found")
        index = _module_index(model)
        self.targets: list[tuple[str, torch.nn.Module, dict[str, torch.Tensor]]] = []
        unmatched = []
        for key, parts in groups.items():
            found = index.get(key.replace("base_model.model.", ""))  # PEFT wraps names in base_model.model.
            if found is None:
                unmatched.append(key)
                continue
            self.targets.append((found[0], found[1], parts))
        if not self.targets:
            raise ModelFileError(f"{path.name}: none of its {len(groups)} modules fit this model "
                                 f"(e.g. {unmatched[0]}); is it for another architecture?")
        self.unmatched = unmatched
        self.metadata = state.metadata


def _add_update(buffer: torch.Tensor, base: torch.Tensor, parts: dict[str, torch.Tensor], mult: float) -> None:
    """``buffer += mult * update`` in float32; low-rank updates go straight in with one ``addmm_``."""
    low_rank = _low_rank(parts)
    if low_rank is not None:
        up, down, scale = low_rank
        buffer.view(buffer.shape[0], -1).addmm_(up.to(buffer.device), down.to(buffer.device), alpha=scale * mult)
    else:
        buffer += _delta(parts, base) * mult


@contextlib.contextmanager
def applied(model: LoadedModel, networks: list[tuple[LoraFile, float, float]]) -> Iterator[None]:
    """Within the block the model's weights include the networks, each ``(file, te_mult, unet_mult)``."""
    work: dict[tuple[torch.nn.Module, str], list[tuple[dict, float]]] = defaultdict(list)
    for lora, te_mult, unet_mult in networks:
        for kind, module, parts in lora.targets:
            mult = te_mult if kind == "te" else unet_mult
            if mult:
                work[(module, "weight")].append((parts, mult))
                if "diff_b" in parts and module.bias is not None:
                    work[(module, "bias")].append(({"diff": parts["diff_b"]}, mult))
    originals = []
    try:
        for (module, attr), updates in work.items():
            original = getattr(module, attr)
            merged = original.detach().float().clone()  # one working copy per weight; the original is kept
            try:
                for parts, mult in updates:
                    _add_update(merged, original.detach(), parts, mult)
            except RuntimeError as exc:  # shapes that do not fit
                raise ModelFileError(f"a network does not fit this model ({exc})") from None
            originals.append((module, attr, original))
            setattr(module, attr, torch.nn.Parameter(merged.to(original.dtype), requires_grad=False))
        yield
    finally:
        for module, attr, original in reversed(originals):
            now = getattr(module, attr)
            if original.device != now.device:  # an offload policy moved the module meanwhile
                original.data = original.data.to(now.device)
            setattr(module, attr, original)
