"""The quality harness's training rows: a LoRA and a textual-inversion embedding trained with sdstudio's own
trainers on a small rendered shapes-world set, and how far each moves the generated pictures in the trained
direction (read back with the harness's reader).

- **LoRA** (:func:`sdstudio.training.train_lora`): pictures whose object is always ``lora_colour``, captioned
  with the colour the scene had before (``"a red circle on a blue background"`` under a green circle): a LoRA
  that makes every object that colour. Measured on new prompts naming other colours: the share of objects the
  reader reads in ``lora_colour`` at ``<lora:NAME:0 / 0.5 / 1>`` (should rise with the weight). It trains the
  text encoder's adapters only (kohya's ``--network_train_text_encoder_only``): trained on the UNet alone
  (120 steps at 128², lr 2e-3) the LoRA made 58 % / 50 % of the objects green at CFG 1 / 3 but 8 % at the
  harness's CFG 7 (mostly blue ones; UNet + text encoder gave the same, also with 15 % caption dropout):
  guidance extrapolates from the unconditional pass along what the prompt's own colour word still adds.
- **Embedding** (:func:`sdstudio.training.embedding.train_embedding`): pictures whose object is always
  ``embedding_colour``, template ``a [name] [filewords]`` with the colourless caption ("circle on a blue
  background") as the file words. Measured on new prompts ``a NAME circle on ...``: the share in that colour
  with the untrained (initial) vectors and with the trained ones, against the bare prompt without the name.

Everything lives in a work folder (the trained files, the rendered sets); the base checkpoint is only read.
``python -m sdstudio.eval --only training`` prints the rows (:data:`FULL`, a few minutes on one CPU thread);
the test suite runs :data:`QUICK` (a few steps, a few prompts) and asserts the direction.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import harness, shapes

LORA_NAME = "harness-lora"
EMBEDDING_NAME = "harness-colour"
UNTRAINED_NAME = "harness-init"  # the same vectors before training, under a name of its own


@dataclass(frozen=True)
class TrainingRun:
    """The sizes of one run of the rows (training sets, trainer steps, evaluation prompts)."""

    images: int = 32  # rendered training pictures (each trainer has its own set)
    size: int = 128  # the embedding's pictures: the demo model's native size
    # The LoRA's pictures: its adapters sit on the text encoder and learn what the colour words mean, which
    # carries over to 128² pictures; at 64² a step costs a quarter. At 128² (48 pictures) 120 steps at lr 2e-3
    # gave 0 / 31 / 31 % and 300 steps at 1e-3 0 / 50 / 50 % (16 prompts) against 0 / 50 / 62 % for these.
    lora_size: int = 64
    lora_steps: int = 80
    lora_lr: float = 3e-3  # 1e-2 overshot (the shares fell back to the base model's)
    lora_dim: int = 8
    lora_weights: tuple[float, ...] = (0.0, 0.5, 1.0)  # the <lora:NAME:w> measured
    embedding_steps: int = 100
    embedding_lr: str = "0.03"
    embedding_vectors: int = 2
    batch: int = 4
    prompts: int = 32  # evaluation prompts (scenes x seeds) per measured value
    lora_colour: str = "green"
    embedding_colour: str = "yellow"  # rare for colourless prompts (purple, the demo model's favourite, was 44 %)
    seed: int = 0


FULL = TrainingRun()
# the suite's run: fewer embedding steps, fewer prompts, the LoRA at weights 0 and 1 only
QUICK = TrainingRun(embedding_steps=40, embedding_lr="0.05", prompts=8, lora_weights=(0.0, 1.0))


def colourless(scene: shapes.Scene) -> str:
    """The plain caption without the object's colour: "a circle on a blue background"."""
    t = scene.main
    return shapes.caption(scene).replace(f"{shapes._a(t.colour)} {t.shape}", f"a {t.shape}", 1)


def recoloured(scene: shapes.Scene, colour: str) -> shapes.Scene:
    return dataclasses.replace(scene, things=(dataclasses.replace(scene.main, colour=colour),))


def other_scenes(n: int, colour: str, seed: int) -> list[tuple[shapes.Scene, int]]:
    """``n`` single-object scenes in which neither the object nor the background is ``colour``, each with a
    seed (the training sets' and the evaluations' come from different ``seed``)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        scene = shapes.random_scene(rng, 1)
        seed_ = int(rng.integers(0, 2**31))
        if colour not in (scene.background, scene.main.colour):
            out.append((scene, seed_))
    return out


def render_set(folder: Path, items: list[tuple[shapes.Scene, str]], size: int) -> Path:
    """(scene, caption) pairs as ``NNN.png`` with a ``.txt`` caption each (kohya's and A1111's layout alike)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, caption) in enumerate(items):
        shapes.render(scene, size).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def colour_share(reader, pictures: list[Image.Image], colour: str) -> float:
    """Share of pictures whose object the reader reads as ``colour``."""
    return float(np.mean([r["colour"] == colour for r in harness.read(reader, pictures)[0]]))


def _paths(work: Path, checkpoint: Path):
    from ..core.paths import Paths

    return Paths(work, ckpt_dirs=[checkpoint.parent], lora_dir=work / "Lora", embeddings_dir=work / "embeddings")


def train_colour_lora(model, work: Path, run: TrainingRun, log=print) -> tuple[Path, float]:
    """A LoRA that makes objects ``run.lora_colour``: its file and the seconds training took."""
    from ..training import TrainingDataset, train_lora

    items = [(recoloured(s, run.lora_colour), shapes.caption(s)) for s, _ in
             other_scenes(run.images, run.lora_colour, run.seed + 1)]
    data = render_set(work / "lora-data" / "1_shapes", items, run.lora_size)
    ds = TrainingDataset.from_folder(data.parent, resolution=run.lora_size, caption_extension=".txt",
                                     min_bucket_reso=64, max_bucket_reso=max(256, run.lora_size), seed=run.seed)
    started = time.perf_counter()
    result = train_lora(model, ds, max_train_steps=run.lora_steps, batch_size=run.batch, learning_rate=run.lora_lr,
                        network_dim=run.lora_dim, network_alpha=run.lora_dim, seed=run.seed, train_unet=False,
                        output_dir=work / "Lora", output_name=LORA_NAME,
                        on_progress=lambda p: p.step % 20 == 0 and log(f"LoRA step {p.step}/{p.total}, "
                                                                       f"loss {p.loss:.4f}"))
    return result.path, time.perf_counter() - started


def train_colour_embedding(model, file, work: Path, run: TrainingRun, log=print) -> tuple[Path, Path, float]:
    """An embedding standing for ``run.embedding_colour``: the trained file, a copy of the untrained one beside
    it (:data:`UNTRAINED_NAME`), and the seconds training took."""
    import shutil

    from ..training.embedding import create_embedding, train_embedding

    items = [(recoloured(s, run.embedding_colour), colourless(s).removeprefix("a ")) for s, _ in
             other_scenes(run.images, run.embedding_colour, run.seed + 2)]
    data = render_set(work / "embedding-data", items, run.size)
    template = work / "colour_template.txt"
    template.write_text("a [name] [filewords]\n", encoding="utf-8")
    folder = work / "embeddings"
    created = create_embedding(EMBEDDING_NAME, run.embedding_vectors, "colour", model, overwrite_old=True,
                               folder=folder)
    initial = folder / f"{UNTRAINED_NAME}{created.suffix}"
    shutil.copy(created, initial)
    started = time.perf_counter()
    result = train_embedding(EMBEDDING_NAME, model, data, folder=folder, checkpoint=file,
                             learn_rate=run.embedding_lr, batch_size=run.batch, steps=run.embedding_steps,
                             training_width=run.size, training_height=run.size, template_file=template,
                             seed=run.seed, save_optimizer_state=False,
                             on_progress=lambda p: p.step % 20 == 0 and log(f"embedding step {p.step}/{p.total}, "
                                                                            f"loss {p.loss:.4f}"))
    return result.path, initial, time.perf_counter() - started


@dataclass
class TrainingFigures:
    lora: list[float]  # share in lora_colour at each of the run's lora_weights
    embedding: list[float]  # share in embedding_colour: bare prompt / untrained vectors / trained vectors
    lora_seconds: float
    embedding_seconds: float


def measure(checkpoint: Path, work: Path, make_engine: Callable, run: TrainingRun = FULL, *, size: int = 128,
            steps: int = 20, sampler: str = "Euler a", cfg: float = 7.0, log=print) -> TrainingFigures:
    """Train both in ``work`` (an empty folder) on ``checkpoint`` and measure them; ``make_engine(paths)``
    builds the engine that generates (the caller's precision choices)."""
    from ..core.params import Txt2ImgRequest
    from ..models.loader import load_checkpoint

    checkpoint, work = Path(checkpoint), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    engine = make_engine(_paths(work, checkpoint))
    file = engine.registry.checkpoint(checkpoint.stem)
    reader = harness.load()
    model = load_checkpoint(checkpoint)  # float32: what the trainers train against

    def share(prompts: list[tuple[str, int]], colour: str) -> float:
        pictures = [engine.txt2img(Txt2ImgRequest(prompt=p, seed=s, steps=steps, sampler_name=sampler, cfg_scale=cfg,
                                                  width=size, height=size, model=file.name).validate()).images[0].image
                    for p, s in prompts]
        return colour_share(reader, pictures, colour)

    _, lora_seconds = train_colour_lora(model, work, run, log)
    engine.registry.refresh()
    scenes = other_scenes(run.prompts, run.lora_colour, run.seed + 100)
    lora = [share([(f"{shapes.caption(s)} <lora:{LORA_NAME}:{w:g}>", seed) for s, seed in scenes], run.lora_colour)
            for w in run.lora_weights]
    log(f"LoRA: {lora}")

    _, _, embedding_seconds = train_colour_embedding(model, file, work, run, log)
    scenes = other_scenes(run.prompts, run.embedding_colour, run.seed + 200)
    embedding = [share([(colourless(s).replace("a ", f"a {name} ", 1) if name else colourless(s), seed)
                        for s, seed in scenes], run.embedding_colour) for name in ("", UNTRAINED_NAME, EMBEDDING_NAME)]
    log(f"embedding: {embedding}")
    return TrainingFigures(lora, embedding, lora_seconds, embedding_seconds)


def rows(figures: TrainingFigures, run: TrainingRun = FULL) -> list[tuple[str, str, str]]:
    """The harness table's two rows (measure, value, notes)."""
    def pct(values: list[float]) -> str:
        return " / ".join(f"{100 * v:.1f} %" for v in values)

    lora = (f"trained LoRA (every object {run.lora_colour}): {run.lora_colour} objects for prompts naming other "
            f"colours at <lora:…:{' / '.join(f'{w:g}' for w in run.lora_weights)}>")
    lora_notes = (f"should rise; our LoRA trainer (text encoder only), {run.images} rendered {run.lora_size}² pictures, "
                  f"{run.lora_steps} steps of batch {run.batch}, rank {run.lora_dim}, lr {run.lora_lr:g} "
                  f"({figures.lora_seconds:.0f} s); {run.prompts} prompts")
    emb = (f"trained embedding ({run.embedding_colour}): {run.embedding_colour} objects for 'a …' / "
           f"'a NAME …' with the untrained / the trained vectors")
    emb_notes = (f"trained should rise over both; our textual-inversion trainer, {run.embedding_vectors} vectors "
                 f"(init 'colour'), {run.images} rendered {run.size}² pictures, {run.embedding_steps} steps of "
                 f"batch {run.batch}, lr {run.embedding_lr} ({figures.embedding_seconds:.0f} s); {run.prompts} prompts")
    return [(lora, pct(figures.lora), lora_notes), (emb, pct(figures.embedding), emb_notes)]


def training_rows(checkpoint: Path, work: Path, make_engine: Callable, run: TrainingRun = FULL,
                  **options) -> list[tuple[str, str, str]]:
    """:func:`measure`, as the harness table's rows."""
    return rows(measure(checkpoint, work, make_engine, run, **options), run)
