"""Textual inversion as A1111 trains it, written as a library: create an embedding, train its vectors.

Only the embedding's vectors learn: they stand in the text encoder's token-embedding output wherever the
embedding's name appears in a caption (the engine's :class:`~sdstudio.engine.conditioning.TextConditioner`
puts them there, the same code that uses them when generating), and the loss is the UNet's denoising
error at a random timestep of the model's own noise schedule, for its prediction type (epsilon or v).

Files: A1111's ``.pt`` (``string_to_token`` ``{"*": 265}``, ``string_to_param`` ``{"*": [n, width]}``,
``name``, ``step``, ``sd_checkpoint`` (the base model's short hash, set once trained),
``sd_checkpoint_name``); SDXL embeddings are ``.safetensors`` with ``clip_l`` [n, 768] and ``clip_g``
[n, 1280], the layout A1111 and ComfyUI read, their other fields in the header's metadata. The optimizer
state goes beside the file in ``<file>.optim`` as A1111 writes it (``hash``: the vectors' checksum,
``optimizer_state_dict``), plus the run's ``seed``.

The dataset is A1111's: the images of one folder, each resized to the training size, its ``[filewords]``
from a ``.txt`` beside it or else its file name (leading numbers and dashes cut); captions are a random
line of a prompt template with ``[name]`` and ``[filewords]`` filled in, tags shuffled or dropped on
request. Everything random in a step (its batches, timesteps, noise, template lines, tag shuffles) is
drawn from generators seeded with ``(seed, step)``, so a run interrupted and resumed (its file and
``.optim``) ends with the same vectors as one that ran through.

Learning rates are A1111's strings: ``"0.005"``, or a schedule ``"0.005:100, 1e-3:1000, 1e-5"`` (a rate
until a step, the last one to the end); the clip-gradient value takes the same syntax.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..engine.conditioning import Conditioning, TextConditioner
from ..engine.refiner import sdxl_time_ids
from ..engine.schedules import DiscreteSchedule
from ..models.embeddings import Embedding, EmbeddingLibrary
from ..models.files import ModelFile
from ..models.loader import LoadedModel
from ..models.safe_load import load_pickle
from .loop import TrainingError, TrainProgress, TrainResult, noised

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).with_name("templates")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LATENT_SAMPLING = ("once", "deterministic", "random")
CLIP_GRAD_MODES = ("disabled", "value", "norm")
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")  # "00012-a cat.png" -> "a cat", as A1111 reads file names
_ENCODE_WITH_GRAD = inspect.unwrap(TextConditioner.encode)  # the engine's encoder, without its no_grad


# ---- prompt templates ---------------------------------------------------------------------------------
def list_templates(extra_dir: Path | None = None) -> dict[str, Path]:
    """Template file name -> path: ours, then those of ``extra_dir`` (A1111's ``textual_inversion_templates``
    folder in the data dir), which win on equal names."""
    found = {p.name: p for p in sorted(TEMPLATES_DIR.glob("*.txt"))}
    if extra_dir is not None and Path(extra_dir).is_dir():
        found.update({p.name: p for p in sorted(Path(extra_dir).rglob("*.txt"))})
    return found


def template_lines(template: str | Path, extra_dir: Path | None = None) -> list[str]:
    """The non-empty lines of a template, named as in A1111's list (``style_filewords.txt``) or by an
    absolute path."""
    path = Path(template)
    if not (path.is_absolute() and path.is_file()):
        path = list_templates(extra_dir).get(str(template))
    if path is None:
        raise TrainingError(f"Prompt template file {template} not found; available: "
                            + ", ".join(list_templates(extra_dir)))
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise TrainingError(f"Prompt template file {path.name} is empty")
    return lines


def make_caption(line: str, name: str, filewords: str, *, shuffle_tags: bool = False, tag_drop_out: float = 0.0,
                 rng: random.Random | None = None) -> str:
    """A1111's caption: the file words split on commas, some dropped, maybe shuffled, joined back."""
    rng = rng or random.Random(0)
    tags = filewords.split(",")
    if tag_drop_out:
        tags = [t for t in tags if rng.random() > tag_drop_out]
    if shuffle_tags:
        rng.shuffle(tags)
    return line.replace("[filewords]", ",".join(tags)).replace("[name]", name)


# ---- learning-rate schedules --------------------------------------------------------------------------
def parse_learn_rate(text: str | float, max_steps: int) -> list[tuple[float, int]]:
    """``"0.005:100, 1e-3:1000, 1e-5"`` -> [(0.005, 100), (0.001, 1000), (1e-05, max_steps)]: each rate holds
    until its step; a rate without a step (or with -1, or past ``max_steps``) runs to the end."""
    pairs: list[tuple[float, int]] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        rate, _, until = part.partition(":")
        try:
            value, end = float(rate), int(until) if until.strip() else -1
        except ValueError:
            raise TrainingError(f"learning rate: cannot read {part!r} (write 0.005, or a schedule like "
                                f"0.005:100, 1e-3:1000, 1e-5)") from None
        if end == -1 or end >= max_steps:
            pairs.append((value, max_steps))
            break
        pairs.append((value, end))
    if not pairs:
        raise TrainingError("Learning rate is empty or 0")
    return pairs


def learn_rate_at(schedule: list[tuple[float, int]], step: int) -> float | None:
    """The rate for optimizer step ``step`` (0-based); None once the schedule is over (training ends)."""
    return next((rate for rate, end in schedule if step < end), None)


# ---- the dataset --------------------------------------------------------------------------------------
@dataclass
class TrainImage:
    path: Path
    filewords: str
    pixels: torch.Tensor  # [3, h, w] in [-1, 1]
    alpha: torch.Tensor | None = None  # [h, w] in [0, 1]: the loss weight map (use_weight)


@dataclass
class Latent:
    mean: torch.Tensor  # [4, h/8, w/8], scaled into the UNet's latent space
    std: torch.Tensor | None  # "random" sampling: drawn again at each use
    weight: torch.Tensor | None  # [h/8, w/8], mean 1 (use_weight)


def filewords_of(path: Path, word_regex: str = "", join: str = " ") -> str:
    """An image's ``[filewords]``: its ``.txt`` (or ``.caption``) beside it, else its file name without the
    leading numbers; ``word_regex`` (A1111's dataset_filename_word_regex) picks words out of the name."""
    for suffix in (".txt", ".caption"):
        caption = path.with_suffix(suffix)
        if caption.is_file():
            return caption.read_text(encoding="utf-8", errors="replace").strip()
    text = _LEADING_NUMBERS.sub("", path.stem)
    if word_regex:
        text = join.join(re.findall(word_regex, text))
    return text


def load_images(data_root: str | Path, width: int, height: int, *, varsize: bool = False, use_weight: bool = False,
                word_regex: str = "", join: str = " ") -> tuple[list[TrainImage], list[tuple[str, str]]]:
    """The folder's images at the training size (``varsize``: each at its own size, cut to multiples of 8),
    and the files that could not be read (named, with why): those are skipped."""
    root = Path(data_root)
    if not str(data_root) or not root.is_dir():
        raise TrainingError(f"Dataset directory {data_root!s} doesn't exist")
    images, skipped = [], []
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as im:
                im.load()
                alpha = im.getchannel("A") if use_weight and "A" in im.getbands() else None
                rgb = im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            skipped.append((path.name, str(exc)))
            log.warning("training data: skipping %s (%s)", path.name, exc)
            continue
        size = (max(8, rgb.width // 8 * 8), max(8, rgb.height // 8 * 8)) if varsize else (int(width), int(height))
        if rgb.size != size:
            rgb = rgb.resize(size, Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        weight = None
        if alpha is not None:
            weight = torch.from_numpy(np.asarray(alpha.resize(size, Image.BICUBIC), dtype=np.float32) / 255.0)
        images.append(TrainImage(path, filewords_of(path, word_regex, join), pixels, weight))
    if not images:
        detail = f" ({'; '.join(f'{name}: {why}' for name, why in skipped)})" if skipped else ""
        raise TrainingError(f"Dataset directory {root} has no images that can be read{detail}")
    return images, skipped


def generator(seed: int, *parts: int) -> torch.Generator:
    """A generator for one purpose of one run (``parts``: what it is for, which step...), the same every time."""
    return torch.Generator().manual_seed(_mix(seed, *parts))


def _mix(seed: int, *parts: int) -> int:
    h = int(seed) & 0xFFFFFFFFFFFF
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2 ** 63 - 1)
    return h


@torch.no_grad()
def encode_latents(vae, images: list[TrainImage], device: torch.device, method: str = "once", seed: int = 0,
                   use_weight: bool = False) -> list[Latent]:
    """Each image through the VAE once. ``once``: one sample of the VAE's distribution, kept; ``deterministic``:
    its mean; ``random``: mean and spread kept, a new sample at each use (A1111's three methods)."""
    if method not in LATENT_SAMPLING:
        raise TrainingError(f"latent_sampling_method must be one of {', '.join(LATENT_SAMPLING)}, got {method!r}")
    scale = float(vae.config.scaling_factor)
    out = []
    for i, image in enumerate(images):
        dist = vae.encode(image.pixels[None].to(device, vae.dtype)).latent_dist
        mean, std = dist.mean.float().cpu()[0] * scale, dist.std.float().cpu()[0] * scale
        if method == "once":
            mean, std = mean + std * torch.randn(mean.shape, generator=generator(seed, 2, i)), None
        elif method == "deterministic":
            std = None
        weight = None
        if use_weight:
            weight = torch.ones(mean.shape[-2:])
            if image.alpha is not None:
                w = F.interpolate(image.alpha[None, None], size=mean.shape[-2:], mode="bicubic", align_corners=False)[0, 0]
                w = w - w.min()  # A1111: a minimum of 0 and a mean of 1, so the loss compares with unweighted runs
                if float(w.mean()) > 1e-6:
                    weight = w / w.mean()
        out.append(Latent(mean, std, weight))
    return out


def batch_indices(n_items: int, batch_size: int, gradient_step: int, seed: int, step: int, part: int) -> list[int]:
    """The dataset items of accumulation part ``part`` of optimizer step ``step``: epochs are fresh seeded
    permutations, cut into full batches (a partial last batch is dropped, as A1111's loader does)."""
    per_epoch = max(1, n_items // batch_size)
    usable = per_epoch - per_epoch % gradient_step if per_epoch >= gradient_step else per_epoch
    epoch, k = divmod(step * gradient_step + part, usable)
    order = torch.randperm(n_items, generator=generator(seed, 1, epoch)).tolist()
    return order[k * batch_size:(k + 1) * batch_size]


def steps_per_epoch(n_items: int, batch_size: int, gradient_step: int) -> int:
    return max(1, n_items // batch_size // gradient_step)


# ---- the loss -----------------------------------------------------------------------------------------
def check_base_model(model: LoadedModel, what: str = "textual inversion") -> None:
    """A clear refusal for models this trainer cannot train against."""
    if model.spec.is_flow:
        raise TrainingError(f"{what} training needs an SD 1.x, SD 2.x or SDXL model; "
                            f"{model.spec.describe()} is a flow-matching transformer")
    if model.unet.config.in_channels != 4:
        raise TrainingError(f"{what} training needs a plain (4-channel) model; this one takes "
                            f"{model.unet.config.in_channels} input channels (inpainting / instruct models are not "
                            f"supported)")


def encode_captions(conditioner: TextConditioner, texts: list[str], *, grad: bool, clip_skip: int = 1) -> Conditioning:
    """A batch of captions through the engine's encoder (``grad``: keeping the graph back to the embedding's
    vectors); shorter prompts are padded with empty chunks, as A1111 batches them."""
    encode = _ENCODE_WITH_GRAD if grad else TextConditioner.encode
    conds = [encode(conditioner, t, clip_skip) for t in texts]
    longest = max(c.crossattn.shape[1] for c in conds)
    empty = None
    parts = []
    for c in conds:
        z = c.crossattn
        if z.shape[1] < longest:
            empty = empty if empty is not None else TextConditioner.encode(conditioner, "", clip_skip).crossattn
            z = torch.cat([z, *[empty] * ((longest - z.shape[1]) // empty.shape[1])], dim=1)
        parts.append(z)
    pooled = torch.cat([c.pooled for c in conds]) if all(c.pooled is not None for c in conds) else None
    return Conditioning(torch.cat(parts), pooled)


def diffusion_loss(model: LoadedModel, latents: list[Latent], cond: Conditioning, gen: torch.Generator, *,
                   schedule: DiscreteSchedule, device: torch.device, width: int, height: int) -> torch.Tensor:
    """The denoising loss A1111's LatentDiffusion computes: a uniform timestep of the 1000-step schedule,
    Gaussian noise, and the mean squared error of the UNet's prediction against its target (the noise, or
    v for v-prediction models); weighted per latent pixel when the latents carry weights."""
    x0 = torch.stack([lat.mean if lat.std is None else lat.mean + lat.std * torch.randn(lat.mean.shape, generator=gen)
                      for lat in latents])
    b = x0.shape[0]
    t = torch.randint(0, len(schedule.alphas_cumprod), (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    noisy, target = noised(x0, noise, schedule.alphas_cumprod[t].view(-1, 1, 1, 1),
                           model.spec.prediction == "v_prediction")
    dtype = model.unet.dtype
    extra = {}
    if model.spec.is_sdxl:
        time_ids = sdxl_time_ids(model.spec, width, height)[0].repeat(b, 1)
        extra["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}
    pred = model.unet(noisy.to(device, dtype), t.to(device), encoder_hidden_states=cond.crossattn.to(device, dtype),
                      **extra).sample.float()
    err = (pred - target.to(device)) ** 2
    if latents[0].weight is not None:
        err = err * torch.stack([lat.weight for lat in latents])[:, None].to(device)
    return err.mean()


# ---- previews and logs -------------------------------------------------------------------------------
@dataclass
class PreviewOptions:
    """The picture made every ``create_image_every`` steps: A1111's "Read parameters (prompt, etc...) from
    txt2img tab" fields when ``prompt`` is given, else the step's caption at the training size, 20 steps."""

    prompt: str | None = None
    negative_prompt: str = ""
    steps: int = 20
    sampler_name: str = "Euler a"
    cfg_scale: float = 7.0
    seed: int = -1
    width: int | None = None
    height: int | None = None


def model_name(checkpoint: ModelFile | None) -> str | None:
    """A1111's ``model_name`` of a checkpoint: its path in the folder without the extension, ``/`` as ``_``."""
    if checkpoint is None:
        return None
    return os.path.splitext(checkpoint.filename.replace("/", "_").replace("\\", "_"))[0]


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def log_folder(log_directory: str | Path | None, name: str) -> Path | None:
    """A1111's log layout: ``<log_directory>/<YYYY-MM-DD>/<name>``."""
    if not log_directory:
        return None
    return Path(log_directory) / datetime.now().strftime("%Y-%m-%d") / name


def write_loss(folder: Path, filename: str, step: int, per_epoch: int, loss: float, learn_rate: float) -> None:
    """A row of A1111's loss CSV (step, epoch, epoch_step, loss, learn_rate) for each optimizer step."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "epoch", "epoch_step", "loss", "learn_rate"])
        if new:
            writer.writeheader()
        writer.writerow({"step": step, "epoch": (step - 1) // per_epoch, "epoch_step": (step - 1) % per_epoch,
                         "loss": f"{loss:.7f}", "learn_rate": learn_rate})


def make_preview(engine, checkpoint: ModelFile | None, options: PreviewOptions, caption: str, width: int, height: int,
                 folder: Path, basename: str) -> tuple[Image.Image, Path]:
    """A txt2img picture through the engine (which reads the file just saved), written into ``folder``."""
    from ..core import outputs
    from ..core.params import Txt2ImgRequest

    custom = options.prompt is not None
    req = Txt2ImgRequest(prompt=options.prompt if custom else caption,
                         negative_prompt=options.negative_prompt if custom else "",
                         steps=options.steps if custom else 20, sampler_name=options.sampler_name,
                         cfg_scale=options.cfg_scale, seed=options.seed,
                         width=(options.width or width) if custom else width,
                         height=(options.height or height) if custom else height,
                         model=checkpoint.title if checkpoint is not None else None)
    result = engine.generate(req)
    image = result.images[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{basename}.png"
    outputs.write_image(image.image, path, infotext=image.infotext)
    return image.image, path


# ---- the training loop, shared with hypernetworks -----------------------------------------------------
@dataclass
class LoopSpec:
    """What differs between the trainers: their parameters, optimizer, loss, and how they save."""

    name: str
    kind: str  # "embedding" / "hypernetwork", for the progress text
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    initial_step: int
    steps: int
    learn_rate: str | float
    clip_grad_mode: str
    clip_grad_value: str | float
    gradient_step: int
    per_epoch: int
    batch_loss: Callable[[int, int], tuple[torch.Tensor, str]]  # (step, part) -> (loss, first caption)
    save: Callable[[int, Path | None, str], Path]  # (step, path or None: the main file, name) -> path written
    preview: Callable[[int, str], tuple[Image.Image, Path]] | None = None  # (step, caption) -> picture, file
    log_dir: Path | None = None
    save_every: int = 0
    image_every: int = 0
    loss_csv: str = "textual_inversion_loss.csv"
    on_progress: Callable[[TrainProgress], None] | None = None
    should_stop: Callable[[], bool] | None = None


def run_loop(spec: LoopSpec, result: TrainResult) -> TrainResult:
    schedule = parse_learn_rate(spec.learn_rate, spec.steps)
    mode = spec.clip_grad_mode or "disabled"
    if mode not in CLIP_GRAD_MODES:
        raise TrainingError(f"clip_grad_mode must be one of {', '.join(CLIP_GRAD_MODES)}, got {mode!r}")
    clip_schedule = parse_learn_rate(spec.clip_grad_value, spec.steps) if mode != "disabled" else None
    last_file, last_image = "<none>", "<none>"
    step = spec.initial_step
    try:
        while step < spec.steps:
            rate = learn_rate_at(schedule, step)
            if rate is None:
                break
            if spec.should_stop is not None and spec.should_stop():
                result.interrupted = True
                break
            for group in spec.optimizer.param_groups:
                group["lr"] = rate
            total, prompt = 0.0, ""
            for part in range(spec.gradient_step):
                loss, caption = spec.batch_loss(step, part)
                (loss / spec.gradient_step).backward()
                total += float(loss.detach()) / spec.gradient_step
                prompt = prompt or caption
            if clip_schedule is not None:
                limit = learn_rate_at(clip_schedule, step) or clip_schedule[-1][0]
                if mode == "value":
                    torch.nn.utils.clip_grad_value_(spec.params, limit)
                else:
                    torch.nn.utils.clip_grad_norm_(spec.params, limit)
            spec.optimizer.step()
            spec.optimizer.zero_grad(set_to_none=True)
            step += 1
            result.steps = step
            result.losses.append((step, total))
            preview = None
            if spec.log_dir is not None:
                write_loss(spec.log_dir, spec.loss_csv, step, spec.per_epoch, total, rate)
            if spec.save_every and step % spec.save_every == 0 and spec.log_dir is not None:
                path = spec.save(step, spec.log_dir / f"{spec.kind}s" / f"{spec.name}-{step}", f"{spec.name}-{step}")
                result.saved.append(path)
                last_file = str(path)
            if spec.image_every and step % spec.image_every == 0 and spec.preview is not None:
                spec.save(step, None, spec.name)  # the engine reads the main file: bring it up to this step
                preview, image_path = spec.preview(step, prompt)
                result.images.append(image_path)
                last_image = f"{image_path}, prompt: {prompt}"
            if spec.on_progress is not None:
                spec.on_progress(TrainProgress(step, spec.steps, total, None, (step - 1) // spec.per_epoch,
                                               (step - 1) % spec.per_epoch + 1, spec.per_epoch, rate, prompt,
                                               last_file, last_image, preview, spec.kind))
    finally:
        if step > spec.initial_step or result.interrupted:
            result.path = spec.save(step, None, spec.name)
    return result


# ---- embedding files ----------------------------------------------------------------------------------
def checksum(vectors: torch.Tensor) -> str:
    """A1111's ``Embedding.checksum``: a 4-hex-digit hash of the vectors, which ties an ``.optim`` to them."""
    r = 0
    for v in (vectors.detach().float().reshape(-1) * 100).tolist():
        r = (r * 281 ^ int(v) * 997) & 0xFFFFFFFF
    return f"{r & 0xffff:04x}"


def find_embedding(folder: Path, name: str) -> Path | None:
    folder = Path(folder)
    for suffix in (".pt", ".safetensors", ".bin"):
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return next((p for p in sorted(folder.rglob("*")) if p.stem == name and p.suffix.lower() in (".pt", ".safetensors")),
                None) if folder.is_dir() else None


def read_embedding(path: Path) -> tuple[list[torch.Tensor], dict]:
    """The vectors (one tensor per text encoder: SDXL [clip_l, clip_g]) and the other fields of a file."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            if "clip_l" in keys and "clip_g" in keys:
                vectors = [f.get_tensor("clip_l"), f.get_tensor("clip_g")]
            elif "emb_params" in keys:
                vectors = [f.get_tensor("emb_params")]
            else:
                raise TrainingError(f"{path.name}: not a textual-inversion embedding")
        fields = {k: meta.get(k) for k in ("name", "sd_checkpoint", "sd_checkpoint_name")}
        fields["step"] = int(meta["step"]) if str(meta.get("step", "")).isdigit() else 0
        return [v.float() for v in vectors], fields
    data = load_pickle(path)
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        vectors = [next(iter(params.values())).detach().float()]
    elif "clip_l" in data and "clip_g" in data:
        vectors = [data["clip_l"].float(), data["clip_g"].float()]
    else:
        raise TrainingError(f"{path.name}: not an A1111 textual-inversion embedding (no string_to_param)")
    fields = {k: data.get(k) for k in ("name", "sd_checkpoint", "sd_checkpoint_name")}
    fields["step"] = int(data.get("step") or 0)
    return vectors, fields


def write_embedding(path: Path, vectors: list[torch.Tensor], name: str, step: int | None,
                    sd_checkpoint: str | None = None, sd_checkpoint_name: str | None = None) -> Path:
    """A1111's ``.pt`` for one vector set; SDXL's ``clip_l`` / ``clip_g`` safetensors for two."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vecs = [v.detach().float().cpu().clone() for v in vectors]
    if len(vecs) == 2:
        from safetensors.torch import save_file

        meta = {"name": name, "step": str(step or 0), "sd_checkpoint": sd_checkpoint or "",
                "sd_checkpoint_name": sd_checkpoint_name or ""}
        _atomic(path, lambda p: save_file({"clip_l": vecs[0].contiguous(), "clip_g": vecs[1].contiguous()}, str(p),
                                          metadata=meta))
    else:
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vecs[0]}, "name": name, "step": step,
                "sd_checkpoint": sd_checkpoint, "sd_checkpoint_name": sd_checkpoint_name}
        _atomic(path, lambda p: torch.save(data, p))
    return path


def _token_embedding(encoder) -> torch.nn.Module:
    inner = encoder.text_model if hasattr(encoder, "text_model") else encoder
    return inner.embeddings.token_embedding


def clean_name(name: str) -> str:
    """A1111 keeps letters, digits and ``._- `` of a new embedding's or hypernetwork's name."""
    cleaned = "".join(ch for ch in str(name) if ch.isalnum() or ch in "._- ").strip()
    if not cleaned:
        raise TrainingError(f"name {name!r} has no usable characters (letters, digits, . _ - and spaces)")
    return cleaned


@torch.no_grad()
def init_vectors(model: LoadedModel, init_text: str, num_vectors: int) -> list[torch.Tensor]:
    """A1111's initial vectors, per text encoder: the token embeddings of the init text (at most
    ``num_vectors`` tokens), each repeated over its share of the vectors; zeros for an empty init text."""
    out = []
    for encoder in model.text_encoders:
        layer = _token_embedding(encoder)
        vec = torch.zeros(num_vectors, layer.weight.shape[1])
        ids = model.tokenizers[0](init_text or "*", add_special_tokens=False, truncation=True,
                                  max_length=num_vectors).input_ids
        if init_text and ids:
            embedded = layer(torch.tensor(ids, device=layer.weight.device)).float().cpu()
            for i in range(num_vectors):
                vec[i] = embedded[i * embedded.shape[0] // num_vectors]
        out.append(vec)
    return out


def create_embedding(name: str, num_vectors_per_token: int, init_text: str = "*", model: LoadedModel | None = None,
                     overwrite_old: bool = False, *, folder: str | Path) -> Path:
    """A new, untrained embedding in ``folder`` (A1111's Create embedding): ``<name>.pt``, or for SDXL
    ``<name>.safetensors``; step 0, no base model recorded yet (A1111 records it when training)."""
    if model is None:
        raise TrainingError("creating an embedding needs the model whose text encoder it is for")
    check_base_model(model)
    name = clean_name(name)
    try:
        n = int(num_vectors_per_token)
    except (TypeError, ValueError):
        raise TrainingError(f"num_vectors_per_token must be a whole number, got {num_vectors_per_token!r}") from None
    if not 1 <= n <= 75:
        raise TrainingError(f"num_vectors_per_token must be between 1 and 75, got {n}")
    folder = Path(folder)
    suffix = ".safetensors" if len(model.text_encoders) == 2 else ".pt"
    path = folder / f"{name}{suffix}"
    if not overwrite_old:
        existing = [p for p in (folder / f"{name}.pt", folder / f"{name}.safetensors") if p.exists()]
        if existing:
            raise TrainingError(f"file {existing[0]} already exists")
    return write_embedding(path, init_vectors(model, init_text, n), name, 0)


def optim_path(path: Path) -> Path:
    """Where A1111 keeps a trained file's optimizer state: ``<file>.optim`` beside it."""
    return path.with_name(path.name + ".optim")


def read_optim(path: Path) -> dict | None:
    """The ``.optim`` beside ``path``, read safely; None when there is none or it cannot be read."""
    optim = optim_path(path)
    if not optim.is_file():
        return None
    try:
        return load_pickle(optim)
    except Exception as exc:  # noqa: BLE001 - a damaged .optim only costs the optimizer's momentum
        log.warning("%s: not read (%s); starting a new optimizer", optim.name, exc)
        return None


@dataclass
class TrainingData:
    """What both trainers (embedding, hypernetwork) make of the data folder before their loop: the images,
    their latents, the prompt template's lines, and how many items an epoch has (images x repeats)."""

    images: list[TrainImage]
    skipped: list[tuple[str, str]]
    latents: list[Latent]
    lines: list[str]
    n_items: int
    device: torch.device  # where the latents go and the run trains

    def captions(self, name: str, seed: int, step: int, part: int, batch_size: int, gradient_step: int, *,
                 shuffle_tags: bool, tag_drop_out: float) -> tuple[list[int], list[str]]:
        """The images of one batch and their captions (a template line with ``name`` and the filewords),
        drawn from (seed, step, part) alone: a resumed run draws the same."""
        rng = random.Random(_mix(seed, 3, step, part))
        idx = [i % len(self.images) for i in batch_indices(self.n_items, batch_size, gradient_step, seed, step, part)]
        texts = [make_caption(rng.choice(self.lines), name, self.images[i].filewords, shuffle_tags=shuffle_tags,
                              tag_drop_out=tag_drop_out, rng=rng) for i in idx]
        return idx, texts


def prepare_data(model: LoadedModel, data_root: str | Path, *, template_file: str | Path, templates_dir,
                 width: int, height: int, varsize: bool, use_weight: bool, latent_sampling_method: str, seed: int,
                 repeats: int, batch_size: int, device: torch.device) -> TrainingData:
    lines = template_lines(template_file, templates_dir)
    images, skipped = load_images(data_root, width, height, varsize=varsize, use_weight=use_weight)
    latents = encode_latents(model.vae, images, device, latent_sampling_method, seed, use_weight)
    n_items = len(images) * max(1, int(repeats))
    if batch_size > n_items:
        raise TrainingError(f"batch size {batch_size} is larger than the dataset ({n_items} images)")
    return TrainingData(images, skipped, latents, lines, n_items, device)


def start_run(model: LoadedModel, path: Path, initial_step: int, steps: int, optim_saved: dict | None,
              seed: int | None, device: torch.device | None, data_root: str | Path,
              **data_options) -> tuple[TrainResult, TrainingData | None]:
    """What both trainers (embedding, hypernetwork) do before their loop: the result so far and, unless the
    file is already trained up to ``steps`` (A1111's note; no data then), the run's seed (a resumed run's
    saved one, in ``result.seed``) and its data on the device (the model's when None)."""
    result = TrainResult(path, initial_step, int(steps), initial_step=initial_step)
    if initial_step >= steps:
        result.note = "Model has already been trained beyond specified max steps"
        return result, None
    result.seed = _seed(seed, optim_saved)
    device = device or next(model.unet.parameters()).device
    data = prepare_data(model, data_root, seed=result.seed, device=device, **data_options)
    result.skipped_images = data.skipped
    return result, data


def train_embedding(embedding_name: str, model: LoadedModel, data_root: str | Path, *, folder: str | Path,
                    checkpoint: ModelFile | None = None, learn_rate: str | float = "0.005", batch_size: int = 1,
                    gradient_step: int = 1, training_width: int = 512, training_height: int = 512,
                    varsize: bool = False, steps: int = 100000, template_file: str | Path = "style_filewords.txt",
                    templates_dir: Path | None = None, shuffle_tags: bool = False, tag_drop_out: float = 0.0,
                    latent_sampling_method: str = "once", use_weight: bool = False, save_embedding_every: int = 0,
                    create_image_every: int = 0, log_directory: str | Path | None = None, engine=None,
                    preview: PreviewOptions | None = None, clip_grad_mode: str = "disabled",
                    clip_grad_value: str | float = "0.1", clip_skip: int = 1, repeats: int = 1,
                    seed: int | None = None, device: torch.device | None = None,
                    library: EmbeddingLibrary | None = None, schedule: DiscreteSchedule | None = None,
                    on_progress: Callable[[TrainProgress], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, resume: bool = True,
                    save_optimizer_state: bool = True) -> TrainResult:
    """Train the embedding ``embedding_name`` of ``folder`` (A1111's Train > Train Embedding) up to ``steps``
    optimizer steps, from the step its file records (``resume=False``: from 0, with a new optimizer).
    The file is rewritten when training stops (finished, interrupted, or failed mid-way) with its step and
    base model; ``save_embedding_every`` / ``create_image_every`` write copies and pictures under
    ``log_directory/<date>/<name>/`` (pictures need ``engine``)."""
    check_base_model(model)
    _check_counts(batch_size, gradient_step, steps, save_embedding_every, create_image_every, varsize)
    path = find_embedding(Path(folder), embedding_name)
    if path is None:
        raise TrainingError(f"embedding {embedding_name!r} not found in {folder}; create it first")
    vectors, fields = read_embedding(path)
    widths = [_token_embedding(e).weight.shape[1] for e in model.text_encoders]
    if [v.shape[-1] for v in vectors] != widths:
        raise TrainingError(f"{path.name}: its vectors are {[v.shape[-1] for v in vectors]} wide; this model's text "
                            f"encoder{'s are' if len(widths) > 1 else ' is'} {widths} wide")
    initial_step = int(fields["step"] or 0) if resume else 0
    optim_saved = _load_optim(path, checksum(torch.cat(vectors, dim=-1))) if resume else None
    result, data = start_run(model, path, initial_step, steps,
                             optim_saved, seed, device, data_root, template_file=template_file, templates_dir=templates_dir, width=training_width, height=training_height, varsize=varsize,
                             use_weight=use_weight, latent_sampling_method=latent_sampling_method, repeats=repeats,
                             batch_size=batch_size)
    if data is None:
        return result
    seed, device = result.seed, data.device

    params = [torch.nn.Parameter(v.clone().to(device)) for v in vectors]
    emb = Embedding(embedding_name, path, tuple(params))
    others = dict(library.usable(widths)) if library is not None else {}
    others.pop(embedding_name, None)
    conditioner = TextConditioner(model, device, {**others, embedding_name: emb})
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    if optim_saved is not None and optim_saved.get("optimizer_state_dict"):
        optimizer.load_state_dict(optim_saved["optimizer_state_dict"])
    noise_schedule = schedule or DiscreteSchedule()
    sd_hash = checkpoint.short_hash if checkpoint is not None else fields.get("sd_checkpoint")
    sd_name = model_name(checkpoint) if checkpoint is not None else fields.get("sd_checkpoint_name")

    def batch_loss(step: int, part: int) -> tuple[torch.Tensor, str]:
        idx, texts = data.captions(embedding_name, seed, step, part, batch_size, gradient_step,
                                   shuffle_tags=shuffle_tags, tag_drop_out=tag_drop_out)
        cond = encode_captions(conditioner, texts, grad=True, clip_skip=clip_skip)
        w, h = data.images[idx[0]].pixels.shape[2], data.images[idx[0]].pixels.shape[1]
        loss = diffusion_loss(model, [data.latents[i] for i in idx], cond, generator(seed, 4, step, part),
                              schedule=noise_schedule, device=device, width=w, height=h)
        return loss, texts[0]

    def save(step: int, target: Path | None, name: str) -> Path:
        out = target.with_suffix(path.suffix) if target is not None else path
        write_embedding(out, [p.detach() for p in params], name, step, sd_hash, sd_name)
        if save_optimizer_state:
            _atomic(optim_path(out), lambda f: torch.save(
                {"hash": checksum(torch.cat([p.detach().cpu() for p in params], dim=-1)),
                 "optimizer_state_dict": optimizer.state_dict(), "seed": seed}, f))
        return out

    log_dir = log_folder(log_directory, embedding_name)
    make = None
    if create_image_every and engine is not None and log_dir is not None:
        def make(step: int, caption: str):
            return make_preview(engine, checkpoint, preview or PreviewOptions(), caption, training_width,
                                training_height, log_dir / "images", f"{embedding_name}-{step}")

    spec = LoopSpec(embedding_name, "embedding", params, optimizer, initial_step, int(steps), learn_rate,
                    clip_grad_mode, clip_grad_value, int(gradient_step),
                    steps_per_epoch(data.n_items, batch_size, gradient_step), batch_loss, save, make, log_dir,
                    int(save_embedding_every or 0), int(create_image_every or 0), "textual_inversion_loss.csv",
                    on_progress, should_stop)
    return run_loop(spec, result)


def _check_counts(batch_size, gradient_step, steps, save_every, image_every, varsize) -> None:
    """A1111's validate_train_inputs, as messages."""
    for label, value, least in (("Batch size", batch_size, 1), ("Gradient accumulation step", gradient_step, 1),
                                ("Max steps", steps, 1), ("Save every", save_every or 0, 0),
                                ("Create image every", image_every or 0, 0)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TrainingError(f"{label} must be integer")
        if value < least:
            raise TrainingError(f"{label} must be positive" + (" or 0" if least == 0 else ""))
    if varsize and batch_size != 1:
        raise TrainingError("variable-size images (varsize) train with batch size 1")


def _load_optim(path: Path, expected_hash: str) -> dict | None:
    """The saved optimizer state (and seed) beside ``path``, if it belongs to the vectors in the file."""
    saved = read_optim(path)
    if saved is not None and saved.get("hash") != expected_hash:
        log.info("%s belongs to other vectors; starting a new optimizer", optim_path(path).name)
        return None
    return saved


def _seed(seed: int | None, saved: dict | None) -> int:
    if saved is not None and saved.get("seed") is not None:
        return int(saved["seed"])  # a resumed run keeps drawing the same batches and noise
    if seed is None or int(seed) < 0:
        return random.randrange(2 ** 32)
    return int(seed)


# ---- queue jobs ---------------------------------------------------------------------------------------
def run_job(engine, request: dict, *, on_progress: Callable[[TrainProgress], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:
    """A ``train`` queue job: ``request`` = {"what": "create_embedding" | "embedding" | "hypernetwork" |
    "preprocess", "model": checkpoint title or None, "kwargs": the function's keyword arguments}."""
    what = request["what"]
    kwargs = dict(request.get("kwargs") or {})
    if what == "hypernetwork":
        from . import hypernetwork

        return hypernetwork.run_job(engine, request, on_progress=on_progress, should_stop=should_stop)
    if what == "preprocess":  # A1111's Preprocess images: no checkpoint needed
        from . import preprocess

        return preprocess.run_job(engine, request, on_progress=on_progress, should_stop=should_stop)
    file, model = engine.load(request.get("model"))
    if what == "create_embedding":
        with engine.placement.use(*model.text_encoders):
            path = create_embedding(kwargs.pop("name"), kwargs.pop("num_vectors_per_token"), model=model,
                                    folder=engine.paths.embeddings_dir, **kwargs)
        engine.embeddings.refresh()
        return {"path": str(path)}
    if what != "embedding":
        raise TrainingError(f"unknown training job {what!r}")
    if isinstance(kwargs.get("preview"), dict):
        kwargs["preview"] = PreviewOptions(**kwargs["preview"])
    with engine.placement.use(model.unet, model.vae, *model.text_encoders):
        result = train_embedding(model=model, folder=engine.paths.embeddings_dir, checkpoint=file, engine=engine,
                                 library=engine.embeddings, device=engine.plan.device, on_progress=on_progress,
                                 should_stop=should_stop, **kwargs)
    engine.embeddings.refresh()
    return json.loads(json.dumps(result.to_dict()))
