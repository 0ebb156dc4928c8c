"""LoRA and LyCORIS networks applied to a loaded model for the length of one job.

Supported files: kohya / A1111 LoRA and LoCon (``lora_unet_*``, ``lora_te_*``, SDXL ``lora_te1_*`` /
``lora_te2_*``, with diffusers- or LDM-style module names), LyCORIS LoHa (``hada_*``), LoKr (``lokr_*``), both also in their Tucker form for convs (``hada_t1`` /
``hada_t2``, ``lokr_t2``),
(IA)^3 (``weight`` + ``on_input``) and full-diff (``diff``, ``diff_b``), and diffusers / PEFT files
(``unet.<module>.lora.down.weight``, ``lora_A`` / ``lora_B``). Delta = scale x multiplier x update, with
scale = alpha / rank.

SD 3.x and Flux.1 (the transformer is diffusers' module): kohya sd-scripts names of the original layout
(``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_joint_blocks_0_x_block_attn_qkv``; ``lora_te1_`` CLIP-L,
``lora_te2_`` CLIP-G on SD3 / T5 in older Flux files, ``lora_te3_`` T5; LyCORIS's ``lycoris_`` prefix), the
same names with dots under ``diffusion_model.`` (ComfyUI / BFL, ``text_encoders.clip_l.transformer.``),
diffusers / PEFT / AI-toolkit names
(``transformer.transformer_blocks.0.attn.to_q``, ``text_encoder.``), OneTrainer's ``lora_transformer_*`` and
XLabs' ``double_blocks.0.processor.qkv_lora1.down.weight``. A weight the original layout fuses (qkv; Flux's
single-block ``linear1`` = q, k, v and the MLP input) gets its update at the fused size, then split by rows
across our modules, the way the loader splits the base weight; adaLN outputs that diffusers stores as
(scale, shift) take the rows swapped. So every network kind works on fused weights, not only LoRA.

Applying merges the deltas into new weight tensors and swaps them in; leaving swaps the original
tensors back. The originals are never modified, so any number of jobs with any weights leaves the base
model bit-identical (no drift), and sampling costs nothing extra.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from ..models.convert import unet_hf_to_ldm
from ..models.dit import _FLUX_DOUBLE, _FLUX_SINGLE, _FLUX_TOP
from ..models.errors import ModelFileError
from ..models.loader import LoadedModel
from ..models.safe_load import open_state_dict

_SUFFIXES = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "lora.down.weight", "lora.up.weight",
    "lora_A.weight", "lora_B.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a",
    "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "hada_t1", "hada_t2", "lokr_t2", "diff", "diff_b", "weight",
    "on_input", "dora_scale",
)


@dataclass(frozen=True, eq=False)
class Rows:
    """A weight that a file's layout keeps whole (or in another row order) and our model splits: the
    update is made at ``total`` rows, and rows ``rows`` of it go to ``module``, for each piece."""

    pieces: tuple[tuple[torch.nn.Module, torch.Tensor], ...]
    total: int

    @staticmethod
    def concat(modules: list[torch.nn.Module]) -> Rows:
        """Modules whose weights are the fused weight's rows, in order (qkv -> to_q, to_k, to_v)."""
        pieces, start = [], 0
        for m in modules:
            n = m.weight.shape[0]
            pieces.append((m, torch.arange(start, start + n)))
            start += n
        return Rows(tuple(pieces), start)

    @staticmethod
    def swapped(module: torch.nn.Module) -> Rows:
        """An adaLN projection the original stores as (shift, scale) and diffusers as (scale, shift)."""
        n = module.weight.shape[0]
        return Rows(((module, torch.cat([torch.arange(n // 2, n), torch.arange(0, n // 2)])),), n)


Target = torch.nn.Module | Rows


def _module_index(model: LoadedModel) -> dict[str, tuple[str, Target]]:
    """Every LoRA-able module under each name a LoRA file may use for it -> ("unet"|"te", module)."""
    if model.spec.is_flow:
        return _flow_index(model)
    index: dict[str, tuple[str, Target]] = {}
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


def _flux_original(t: torch.nn.Module) -> dict[str, Target]:
    """Black Forest Labs' module names of a Flux transformer -> our modules (same tables as the loader)."""
    mods = dict(t.named_modules())
    out: dict[str, Target] = {}

    def whole(table: dict[str, str], src_pre: str, dst_pre: str) -> None:
        for src, dst in table.items():
            if src.endswith(".") and dst_pre + dst[:-1] in mods:  # module entries; norms' scales are not Linear
                out[src_pre + src[:-1]] = mods[dst_pre + dst[:-1]]

    whole(_FLUX_TOP, "", "")
    out["final_layer.adaLN_modulation.1"] = Rows.swapped(mods["norm_out.linear"])
    for i in range(len(t.transformer_blocks)):
        b = f"transformer_blocks.{i}.attn."
        out[f"double_blocks.{i}.img_attn.qkv"] = Rows.concat([mods[b + n] for n in ("to_q", "to_k", "to_v")])
        out[f"double_blocks.{i}.txt_attn.qkv"] = Rows.concat(
            [mods[b + n] for n in ("add_q_proj", "add_k_proj", "add_v_proj")])
        whole(_FLUX_DOUBLE, f"double_blocks.{i}.", f"transformer_blocks.{i}.")
    for i in range(len(t.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}."
        out[f"single_blocks.{i}.linear1"] = Rows.concat(
            [mods[b + n] for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
        whole(_FLUX_SINGLE, f"single_blocks.{i}.", b)
    return out


def _xlabs(t: torch.nn.Module, original: dict[str, Target]) -> dict[str, Target]:
    """XLabs' attention-processor LoRA names (x-flux): qkv / proj of each stream; a single block's
    ``qkv_lora`` covers only the q, k, v rows of ``linear1``, its ``proj_lora`` is ``linear2``."""
    out: dict[str, Target] = {}
    for i in range(len(t.transformer_blocks)):
        d = f"double_blocks.{i}."
        out.update({d + "processor.qkv_lora1": original[d + "img_attn.qkv"],
                    d + "processor.qkv_lora2": original[d + "txt_attn.qkv"],
                    d + "processor.proj_lora1": original[d + "img_attn.proj"],
                    d + "processor.proj_lora2": original[d + "txt_attn.proj"]})
    for i in range(len(t.single_transformer_blocks)):
        b, s = t.single_transformer_blocks[i], f"single_blocks.{i}."
        out[s + "processor.qkv_lora"] = Rows.concat([b.attn.to_q, b.attn.to_k, b.attn.to_v])
        out[s + "processor.proj_lora"] = original[s + "linear2"]
    return out


_SD3_TOP = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
            "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
            "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
            "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
            "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
_SD3_BLOCK = {"x_block.attn.proj": "attn.to_out.0", "x_block.attn2.proj": "attn2.to_out.0",
              "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
              "x_block.adaLN_modulation.1": "norm1.linear", "context_block.attn.proj": "attn.to_add_out",
              "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2"}


def _sd3_original(t: torch.nn.Module) -> dict[str, Target]:
    """Stability's MMDiT module names (sd-scripts' ``lora_sd3``) -> our modules, as diffusers' single-file
    converter maps the weights (the last context block's and the final adaLN rows swapped)."""
    mods = dict(t.named_modules())
    out: dict[str, Target] = {src: mods[dst] for src, dst in _SD3_TOP.items() if dst in mods}
    out["final_layer.adaLN_modulation.1"] = Rows.swapped(mods["norm_out.linear"])
    n = len(t.transformer_blocks)
    for i in range(n):
        j, b = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        for src, attn, names in (("x_block.attn.qkv", "attn.", ("to_q", "to_k", "to_v")),
                                 ("x_block.attn2.qkv", "attn2.", ("to_q", "to_k", "to_v")),
                                 ("context_block.attn.qkv", "attn.", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            if all(b + attn + x in mods for x in names):
                out[j + src] = Rows.concat([mods[b + attn + x] for x in names])
        out.update({j + src: mods[b + dst] for src, dst in _SD3_BLOCK.items() if b + dst in mods})
        context = mods[b + "norm1_context.linear"]
        out[j + "context_block.adaLN_modulation.1"] = Rows.swapped(context) if i == n - 1 else context
    return out


def _flow_index(model: LoadedModel) -> dict[str, tuple[str, Target]]:
    """The names SD 3.x / Flux.1 LoRA files use: the original layout's (kohya, ComfyUI/BFL, XLabs) and
    diffusers' (PEFT, AI-toolkit, OneTrainer), for the transformer and each text encoder."""
    t, flux = model.unet, model.spec.dit.is_flux
    index: dict[str, tuple[str, Target]] = {}

    def add(names, kind: str, target: Target) -> None:
        for name in names:
            index.setdefault(name, (kind, target))

    original = _flux_original(t) if flux else _sd3_original(t)
    for name, target in original.items():
        add(("lora_unet_" + name.replace(".", "_"), "lycoris_" + name.replace(".", "_"), "diffusion_model." + name,
             "model.diffusion_model." + name, "transformer." + name, name), "unet", target)
    if flux:
        for name, target in _xlabs(t, original).items():
            add((name, "diffusion_model." + name), "unet", target)
    for name, module in t.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            add(("transformer." + name, "lora_transformer_" + name.replace(".", "_"),  # PEFT-wrapped: bare names
                 "lycoris_" + name.replace(".", "_"), "lora_unet_" + name.replace(".", "_"), "diffusion_model." + name,
                 name), "unet", module)
    # kohya's lora_te2_ was T5 in Flux files before sd-scripts moved it to lora_te3_ (SD3's numbering)
    # (kohya prefixes, dotted prefixes) per encoder; diffusers' Flux pipeline calls T5 text_encoder_2
    prefixes = {"clip_l": (("lora_te1_",), ("text_encoder.", "text_encoders.clip_l.transformer.")),
                "clip_g": (("lora_te2_",), ("text_encoder_2.", "text_encoders.clip_g.transformer.")),
                "t5xxl": (("lora_te3_", "lora_te2_") if flux else ("lora_te3_",),
                          ("text_encoders.t5xxl.transformer.", "text_encoder_2." if flux else "text_encoder_3."))}
    for kind, encoder in model.extras.get("encoders", {}).items():
        kohya, dotted = prefixes[kind]
        for name, module in encoder.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            canonical = name if kind == "t5xxl" or name.startswith(("text_model.", "text_projection")) \
                else "text_model." + name
            add([k + canonical.replace(".", "_") for k in kohya] + [p + canonical for p in dotted], "te", module)
    return index


_XLABS_KEY = re.compile(r"(.*\.processor\.(?:qkv|proj)_lora\d?)\.(down|up)\.weight")


def _group(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key in state:
        if m := _XLABS_KEY.fullmatch(key):  # XLabs' LoRALinearLayer: ``down`` / ``up``, no alpha in the file
            groups[m[1]][f"lora_{m[2]}.weight"] = state[key]
            continue
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


def _delta(parts: dict[str, torch.Tensor], weight: torch.Tensor, rows: torch.Tensor | None = None,
           total: int = 0) -> torch.Tensor:
    """The full-size update of a LyCORIS / full-diff / (IA)^3 entry (before the multiplier); ``weight`` is
    the base weight, which (IA)^3 scales. Plain LoRA entries never get here (see :func:`add_update`).
    With ``rows`` the entry is for a fused weight of ``total`` rows and the update is those rows of it."""
    f = {k: v.to(weight.device, torch.float32) for k, v in parts.items()}  # computed where the weight lives
    if "weight" in f and not any(k.startswith(("hada_", "lokr_")) or k == "diff" for k in f):
        return _ia3(f, weight, rows)
    if rows is None:
        return _update(f, weight.shape)
    return _update(f, (total, *weight.shape[1:]))[rows.to(weight.device)]


def _ia3(f: dict[str, torch.Tensor], weight: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """(IA)^3: scale the weight per output (or per input) channel."""
    w, shape = f["weight"], weight.shape
    if "on_input" in f and bool(f["on_input"]):
        return weight.float() * w.reshape(1, -1, *([1] * (len(shape) - 2)))
    if rows is not None:
        w = w[rows.to(w.device)]
    return weight.float() * w.reshape(-1, *([1] * (len(shape) - 1)))


def _update(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
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
        self.targets: list[tuple[str, Target, dict[str, torch.Tensor]]] = []
        unmatched = []
        for key, parts in groups.items():
            found = index.get(key.replace("base_model.model.", ""))  # PEFT wraps names in base_model.model.
            if found is None or not _fits(parts, found[1]):  # e.g. an SDXL LoRA's CLIP-L part on a tiny CLIP
                unmatched.append(key)
                continue
            self.targets.append((found[0], found[1], parts))
        if not self.targets:
            raise ModelFileError(f"{path.name}: none of its {len(groups)} modules fit this model "
                                 f"(e.g. {unmatched[0]}); is it for another architecture?")
        self.unmatched = unmatched
        self.metadata = state.metadata


def _pieces(target: Target) -> tuple[tuple[torch.nn.Module, torch.Tensor | None, int], ...]:
    if isinstance(target, Rows):
        return tuple((module, rows, target.total) for module, rows in target.pieces)
    return ((target, None, target.weight.shape[0]),)


def _fits(parts: dict[str, torch.Tensor], target: Target) -> bool:
    """Whether a plain LoRA entry's shapes fit its module (other kinds are checked when applied)."""
    down = parts.get("lora_down.weight", parts.get("lora.down.weight", parts.get("lora_A.weight")))
    up = parts.get("lora_up.weight", parts.get("lora.up.weight", parts.get("lora_B.weight")))
    if down is None or up is None:
        return True
    module, _, rows = _pieces(target)[0]
    return up.shape[0] == rows and up[0].numel() == down.shape[0] and down[0].numel() == module.weight[0].numel()


def add_update(buffer: torch.Tensor, base: torch.Tensor, parts: dict[str, torch.Tensor], mult: float,
                rows: torch.Tensor | None = None, total: int = 0) -> None:
    """``buffer += mult * update`` in float32; low-rank updates go straight in with one ``addmm_``. With
    ``rows``, the entry is for a fused weight of ``total`` rows and ``buffer`` takes those rows of it."""
    low_rank = _low_rank(parts)
    if low_rank is not None:
        up, down, scale = low_rank
        if rows is not None:
            if up.shape[0] != total:
                raise RuntimeError(f"update of {up.shape[0]} rows for a weight of {total}")
            up = up[rows]
        buffer.view(buffer.shape[0], -1).addmm_(up.to(buffer.device), down.to(buffer.device), alpha=scale * mult)
    else:
        buffer += _delta(parts, base, rows, total) * mult


@contextlib.contextmanager
def applied(model: LoadedModel, networks: list[tuple[LoraFile, float, float]]) -> Iterator[None]:
    """Within the block the model's weights include the networks, each ``(file, te_mult, unet_mult)``."""
    work: dict[tuple[torch.nn.Module, str], list[tuple[dict, float, torch.Tensor | None, int]]] = defaultdict(list)
    for lora, te_mult, unet_mult in networks:
        for kind, target, parts in lora.targets:
            mult = te_mult if kind == "te" else unet_mult
            if not mult:
                continue
            for module, rows, total in _pieces(target):
                work[(module, "weight")].append((parts, mult, rows, total))
                if "diff_b" in parts and module.bias is not None:
                    work[(module, "bias")].append(({"diff": parts["diff_b"]}, mult, rows, total))
    originals = []
    try:
        for (module, attr), updates in work.items():
            original = getattr(module, attr)
            merged = original.detach().float().clone()  # one working copy per weight; the original is kept
            try:
                for parts, mult, rows, total in updates:
                    add_update(merged, original.detach(), parts, mult, rows, total)
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
