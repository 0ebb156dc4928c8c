"""A1111 hypernetworks, created and trained as A1111 does, in the file layout the engine loads.

A hypernetwork holds, per attention width (``enable_sizes``: 320, 640, 768, 1024, 1280 for SD 1.x), two
residual MLPs, for the keys and the values of every attention layer of that width:
``k = to_k(x + mlp_k(x) * strength)``. Creating one lays out each MLP as A1111's HypernetworkModule does
(per step of ``layer_structure``: Linear, the activation except after the last layer, LayerNorm when
asked, Dropout where ``dropout_structure`` says) and initialises it A1111's way ("Normal": weights
N(0, 0.01), biases 0; Xavier / Kaiming variants). Training loads the file through the engine's own
loader (:class:`sdstudio.engine.hypernetwork.Hypernetwork`) and optimises those modules while the
engine's hooks apply them, so what is trained is exactly what generation uses.

The file is A1111's ``.pt``: ``{width: (state_k, state_v), "layer_structure", "activation_func",
"is_layer_norm", "weight_initialization", "use_dropout", "dropout_structure", "last_layer_dropout",
"activate_output", "name", "step", "sd_checkpoint", "sd_checkpoint_name", "optional_info"}``; the optimizer
state goes beside it in ``<file>.optim`` (``optimizer_name``, ``hash``, ``optimizer_state_dict``, and the
run's ``seed``). Dataset, captions, learning-rate schedules and seeding are textual inversion's
(:mod:`sdstudio.training.embedding`).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.nn import init

from ..engine import hypernetwork as hypernetwork_ops
from ..engine.conditioning import TextConditioner
from ..engine.schedules import DiscreteSchedule
from ..models.embeddings import EmbeddingLibrary
from ..models.errors import ModelFileError
from ..models.files import ModelFile, legacy_model_hash
from ..models.loader import LoadedModel
from ..models.safe_load import load_pickle
from .embedding import (
    LoopSpec,
    PreviewOptions,
    TrainingError,
    _atomic,
    _check_counts,
    _mix,
    check_base_model,
    clean_name,
    diffusion_loss,
    encode_captions,
    generator,
    log_folder,
    make_preview,
    model_name,
    optim_path,
    read_optim,
    run_loop,
    start_run,
    steps_per_epoch,
)
from .loop import TrainProgress, TrainResult

log = logging.getLogger(__name__)

DEFAULT_SIZES = (320, 640, 768, 1024, 1280)
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
ACTIVATIONS = ("linear", *sorted(hypernetwork_ops._ACTIVATIONS))


def parse_layer_structure(value: str | Sequence[float] | None) -> list[float]:
    """``"1, 2, 1"`` -> [1.0, 2.0, 1.0]: the hidden widths as multiples of the attention width."""
    if value is None or value == "":
        return [1.0, 2.0, 1.0]
    try:
        structure = [float(x.strip()) for x in value.split(",")] if isinstance(value, str) else [float(x) for x in value]
    except ValueError:
        raise TrainingError(f"layer_structure: cannot read {value!r} (write numbers like 1, 2, 1)") from None
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
        raise TrainingError("Multiplier Sequence should start and end with size 1 (layer_structure like 1, 2, 1)")
    if any(s <= 0 for s in structure):
        raise TrainingError("layer_structure: every multiplier must be positive")
    return structure


def parse_dropout_structure(structure: list[float], use_dropout: bool, dropout_structure) -> list[float]:
    """A1111's create: the given ``"0, 0.1, 0"`` when dropout is on, else zeros; one probability per entry of
    the layer structure, 0 at both ends."""
    if not (use_dropout and dropout_structure):
        return [0.0] * len(structure)
    try:
        values = [float(x.strip()) for x in dropout_structure.split(",")] if isinstance(dropout_structure, str) \
            else [float(x) for x in dropout_structure]
    except ValueError:
        raise TrainingError(f"dropout_structure: cannot read {dropout_structure!r} (write e.g. 0, 0.05, 0)") from None
    if len(values) != len(structure):
        raise TrainingError(f"dropout_structure has {len(values)} values; layer_structure has {len(structure)}")
    if values[0] != 0 or values[-1] != 0:
        raise TrainingError("dropout_structure must start and end with 0")
    if any(not 0 <= v < 1 for v in values):
        raise TrainingError("dropout_structure: each probability must be at least 0 and below 1")
    return values


def build_module(width: int, structure: list[float], activation: str, layer_norm: bool, dropout: list[float],
                 activate_output: bool = False) -> torch.nn.Sequential:
    """One MLP in A1111's Sequential layout (the indices in the file's keys depend on it)."""
    layers: list[torch.nn.Module] = []
    for i in range(len(structure) - 1):
        layers.append(torch.nn.Linear(int(width * structure[i]), int(width * structure[i + 1])))
        last = i >= len(structure) - 2
        if activation not in ("linear", None, "") and not (last and not activate_output):
            layers.append(hypernetwork_ops._ACTIVATIONS[activation]())
        if layer_norm:
            layers.append(torch.nn.LayerNorm(int(width * structure[i + 1])))
        if dropout[i + 1] > 0:
            layers.append(torch.nn.Dropout(p=dropout[i + 1]))
    return torch.nn.Sequential(*layers)


@torch.no_grad()
def init_module(seq: torch.nn.Sequential, weight_init: str, activation: str, gen: torch.Generator) -> None:
    """A1111's initialisations; its LayerNorms get the "Normal" treatment whatever is chosen."""
    nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
    for layer in seq:
        if not isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
            continue
        w, b = layer.weight, layer.bias
        if weight_init == "Normal" or isinstance(layer, torch.nn.LayerNorm):
            init.normal_(w, mean=0.0, std=0.01, generator=gen)
        elif weight_init == "XavierUniform":
            init.xavier_uniform_(w, generator=gen)
        elif weight_init == "XavierNormal":
            init.xavier_normal_(w, generator=gen)
        elif weight_init == "KaimingUniform":
            init.kaiming_uniform_(w, nonlinearity=nonlinearity, generator=gen)
        elif weight_init == "KaimingNormal":
            init.kaiming_normal_(w, nonlinearity=nonlinearity, generator=gen)
        init.zeros_(b)


def _module_state(seq: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's tensors under A1111's key names (``linear.<index>.weight``)."""
    return {f"linear.{k}": v.detach().float().cpu().clone() for k, v in seq.state_dict().items()}


def create_hypernetwork(name: str, enable_sizes: Sequence[int] = DEFAULT_SIZES, layer_structure="1, 2, 1",
                        activation_func: str = "linear", weight_init: str = "Normal", add_layer_norm: bool = False,
                        use_dropout: bool = False, dropout_structure=None, overwrite_old: bool = False, *,
                        folder: str | Path, seed: int | None = None) -> Path:
    """A new, untrained hypernetwork ``<folder>/<name>.pt`` (A1111's Create hypernetwork)."""
    name = clean_name(name)
    path = Path(folder) / f"{name}.pt"
    if not overwrite_old and path.exists():
        raise TrainingError(f"file {path} already exists")
    try:
        sizes = sorted({int(s) for s in enable_sizes})
    except (TypeError, ValueError):
        raise TrainingError(f"enable_sizes: expected widths like [320, 640, 768, 1024, 1280], got {enable_sizes!r}") from None
    if not sizes or sizes[0] <= 0:
        raise TrainingError("enable_sizes: choose at least one attention width (320, 640, 768, 1024, 1280)")
    structure = parse_layer_structure(layer_structure)
    activation = activation_func or "linear"
    if activation not in ACTIVATIONS:
        raise TrainingError(f"activation_func {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    weight_init = weight_init or "Normal"
    if weight_init not in WEIGHT_INITS:
        raise TrainingError(f"weight_init {weight_init!r} is not one of {', '.join(WEIGHT_INITS)}")
    dropout = parse_dropout_structure(structure, use_dropout, dropout_structure)
    gen = torch.Generator().manual_seed(random.randrange(2 ** 32) if seed is None else int(seed))
    data: dict = {}
    for width in sizes:
        pair = []
        for _ in range(2):
            seq = build_module(width, structure, activation, bool(add_layer_norm), dropout)
            init_module(seq, weight_init, activation, gen)
            pair.append(_module_state(seq))
        data[width] = tuple(pair)
    data.update({"step": 0, "name": name, "layer_structure": structure, "activation_func": activation,
                 "is_layer_norm": bool(add_layer_norm), "weight_initialization": weight_init,
                 "sd_checkpoint": None, "sd_checkpoint_name": None, "activate_output": False,
                 "use_dropout": bool(use_dropout), "dropout_structure": dropout,
                 "last_layer_dropout": dropout[-2] != 0, "optional_info": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, lambda p: torch.save(data, p))
    return path


def attention_widths(unet: torch.nn.Module) -> set[int]:
    """The widths of a UNet's attention layers: the sizes a hypernetwork of it can act on."""
    return {m.to_k.in_features for n, m in unet.named_modules() if n.endswith((".attn1", ".attn2")) and hasattr(m, "to_k")}


def train_hypernetwork(hypernetwork_name: str, model: LoadedModel, data_root: str | Path, *, folder: str | Path,
                       checkpoint: ModelFile | None = None, learn_rate: str | float = "0.00001", batch_size: int = 1,
                       gradient_step: int = 1, training_width: int = 512, training_height: int = 512,
                       varsize: bool = False, steps: int = 100000, template_file: str | Path = "hypernetwork.txt",
                       templates_dir: Path | None = None, shuffle_tags: bool = False, tag_drop_out: float = 0.0,
                       latent_sampling_method: str = "once", use_weight: bool = False,
                       save_hypernetwork_every: int = 0, create_image_every: int = 0,
                       log_directory: str | Path | None = None, engine=None, preview: PreviewOptions | None = None,
                       clip_grad_mode: str = "disabled", clip_grad_value: str | float = "0.1", clip_skip: int = 1,
                       repeats: int = 1, seed: int | None = None, device: torch.device | None = None,
                       library: EmbeddingLibrary | None = None, schedule: DiscreteSchedule | None = None,
                       strength: float = 1.0, on_progress: Callable[[TrainProgress], None] | None = None,
                       should_stop: Callable[[], bool] | None = None, resume: bool = True,
                       save_optimizer_state: bool = True) -> TrainResult:
    """Train ``<folder>/<hypernetwork_name>.pt`` (A1111's Train > Train Hypernetwork) up to ``steps``
    optimizer steps, from the step its file records; see :func:`sdstudio.training.embedding.train_embedding`
    for the shared fields. The UNet, VAE and text encoder stay frozen."""
    check_base_model(model, "hypernetwork")
    _check_counts(batch_size, gradient_step, steps, save_hypernetwork_every, create_image_every, varsize)
    name = hypernetwork_name.rsplit("(", 1)[0] if hypernetwork_name.endswith(")") else hypernetwork_name
    path = Path(folder) / f"{name}.pt"
    if not path.is_file():
        raise TrainingError(f"hypernetwork {name!r} not found in {folder}; create it first")
    raw = load_pickle(path)
    try:
        hn = hypernetwork_ops.Hypernetwork(path)
    except ModelFileError as exc:
        raise TrainingError(str(exc)) from None
    widths = attention_widths(model.unet)
    if not set(hn.layers) & widths:
        raise TrainingError(f"{path.name}: none of its sizes {sorted(hn.layers)} is an attention width of this model "
                            f"({sorted(widths)}); create it with enable_sizes among those")
    initial_step = int(raw.get("step") or 0) if resume else 0
    saved = _load_optim(path, initial_step) if resume else None
    result, data = start_run(model, path, initial_step, steps,
                             saved, seed, device, data_root, template_file=template_file, templates_dir=templates_dir, width=training_width, height=training_height, varsize=varsize,
                             use_weight=use_weight, latent_sampling_method=latent_sampling_method, repeats=repeats,
                             batch_size=batch_size)
    if data is None:
        return result
    seed, device = result.seed, data.device

    modules = [m for pair in hn.layers.values() for m in pair]
    for m in modules:
        m.to(device).float().train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    optimizer_name = (saved or {}).get("optimizer_name", "AdamW")
    optimizer_cls = getattr(torch.optim, optimizer_name, None)
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        log.warning("optimizer %r unknown; using AdamW", optimizer_name)
        optimizer_name, optimizer_cls = "AdamW", torch.optim.AdamW
    optimizer = optimizer_cls(params, lr=0.0)
    if saved is not None and saved.get("optimizer_state_dict"):
        try:
            optimizer.load_state_dict(saved["optimizer_state_dict"])
        except (ValueError, RuntimeError, KeyError) as exc:
            log.warning("%s: cannot resume the optimizer (%s)", optim_path(path).name, exc)
    embeddings = library.usable([e.config.hidden_size for e in model.text_encoders]) if library is not None else {}
    conditioner = TextConditioner(model, device, embeddings)
    noise_schedule = schedule or DiscreteSchedule()
    sd_hash = checkpoint.short_hash if checkpoint is not None else raw.get("sd_checkpoint")
    sd_name = model_name(checkpoint) if checkpoint is not None else raw.get("sd_checkpoint_name")

    def batch_loss(step: int, part: int) -> tuple[torch.Tensor, str]:
        idx, texts = data.captions(name, seed, step, part, batch_size, gradient_step, shuffle_tags=shuffle_tags,
                                   tag_drop_out=tag_drop_out)
        with torch.no_grad():
            cond = encode_captions(conditioner, texts, grad=False, clip_skip=clip_skip)
        w, h = data.images[idx[0]].pixels.shape[2], data.images[idx[0]].pixels.shape[1]
        with torch.random.fork_rng(devices=[]), hypernetwork_ops.applied(model.unet, [(hn, strength)]):
            torch.manual_seed(_mix(seed, 5, step, part))  # the dropout masks, the same on a resumed run
            loss = diffusion_loss(model, [data.latents[i] for i in idx], cond, generator(seed, 4, step, part),
                                  schedule=noise_schedule, device=device, width=w, height=h)
        return loss, texts[0]

    def save(step: int, target: Path | None, file_name: str) -> Path:
        out = target.with_suffix(".pt") if target is not None else path
        data = {k: v for k, v in raw.items() if not isinstance(k, int)}
        for width, (mk, mv) in hn.layers.items():
            data[width] = (_module_state(mk), _module_state(mv))
        data.update({"step": step, "name": name, "sd_checkpoint": sd_hash, "sd_checkpoint_name": sd_name})
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic(out, lambda f: torch.save(data, f))
        if save_optimizer_state:
            _atomic(optim_path(out), lambda f: torch.save(
                {"optimizer_name": optimizer_name, "hash": legacy_model_hash(out),
                 "optimizer_state_dict": optimizer.state_dict(), "seed": seed, "step": step}, f))
        return out

    log_dir = log_folder(log_directory, name)
    make = None
    if create_image_every and engine is not None and log_dir is not None:
        def make(step: int, caption: str):
            options = preview or PreviewOptions()
            tag = f" <hypernet:{name}:{strength:g}>"
            if options.prompt is not None:
                options = PreviewOptions(**{**options.__dict__, "prompt": options.prompt + tag})
            return make_preview(engine, checkpoint, options, caption + tag, training_width, training_height,
                                log_dir / "images", f"{name}-{step}")

    spec = LoopSpec(name, "hypernetwork", params, optimizer, initial_step, int(steps), learn_rate, clip_grad_mode,
                    clip_grad_value, int(gradient_step), steps_per_epoch(data.n_items, batch_size, gradient_step),
                    batch_loss, save, make, log_dir, int(save_hypernetwork_every or 0), int(create_image_every or 0),
                    "hypernetwork_loss.csv", on_progress, should_stop)
    try:
        return run_loop(spec, result)
    finally:
        for m in modules:
            m.eval().requires_grad_(False)


def _load_optim(path: Path, step: int) -> dict | None:
    """The saved optimizer state beside ``path`` if it was saved with the file as it is (A1111's ``hash`` is
    the old 8-digit file hash, which small files share, so the step is checked too)."""
    saved = read_optim(path)
    if saved is not None and (saved.get("hash") != legacy_model_hash(path) or saved.get("step", step) != step):
        return None
    return saved


def run_job(engine, request: dict, *, on_progress: Callable[[TrainProgress], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:
    """The ``train`` queue job for a hypernetwork (see :func:`sdstudio.training.embedding.run_job`)."""
    kwargs = dict(request.get("kwargs") or {})
    if isinstance(kwargs.get("preview"), dict):
        kwargs["preview"] = PreviewOptions(**kwargs["preview"])
    file, model = engine.load(request.get("model"))
    with engine.placement.use(model.unet, model.vae, *model.text_encoders):
        result = train_hypernetwork(model=model, folder=engine.paths.hypernetwork_dir, checkpoint=file, engine=engine,
                                    library=engine.embeddings, device=engine.plan.device, on_progress=on_progress,
                                    should_stop=should_stop, **kwargs)
    engine.registry.refresh()
    return json.loads(json.dumps(result.to_dict()))
