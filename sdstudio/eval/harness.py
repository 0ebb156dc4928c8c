"""The quality harness: a small network that reads a picture of the shapes world back into attributes
(background colour, object colour, shape, size, place, count), and the scores built on it.

The reader is trained on the renderer (:mod:`.shapes`) with blur, noise and colour jitter, so that it
also reads imperfect generated pictures; ``python -m sdstudio.eval.harness --train`` trains it from a
fixed seed (a few minutes on 2 CPU cores) and writes ``sdstudio/eval/reader.safetensors``, which ships.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from . import shapes

WEIGHTS = Path(__file__).with_name("reader.safetensors")
SIZE = 64  # the reader looks at 64×64 pictures
HEADS = {"background": list(shapes.COLOURS), "colour": list(shapes.COLOURS), "shape": list(shapes.SHAPES),
         "size": list(shapes.SIZES), "place": list(shapes.PLACES), "count": ["1", "2", "3"]}
SINGLE_ONLY = ("colour", "shape", "size", "place")  # read from pictures of one object


class Reader(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.features = nn.Linear(c_in * 4 * 4, 128)
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(classes)) for name, classes in HEADS.items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.embed(x)
        return {name: head(f) for name, head in self.heads.items()}


def to_batch(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
                    for im in images])
    return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2)


def _augment(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    if rng.random() < 0.6:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 2.0))))
    arr = np.asarray(im, dtype=np.float32)
    arr = arr * rng.uniform(0.8, 1.15, size=3) + rng.uniform(-20, 20, size=3)  # colour jitter
    arr = arr + rng.normal(0, rng.uniform(0, 18), size=arr.shape)  # noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _labels(scene: shapes.Scene) -> dict[str, int]:
    t = scene.main
    return {"background": HEADS["background"].index(scene.background), "colour": HEADS["colour"].index(t.colour),
            "shape": HEADS["shape"].index(t.shape), "size": HEADS["size"].index(t.size),
            "place": HEADS["place"].index(t.place), "count": len(scene.things) - 1}


def train(steps: int = 1500, batch: int = 64, seed: int = 0, out: Path = WEIGHTS, log=print) -> Reader:
    """Train the reader on freshly rendered, augmented scenes (half with one object, half with two or three)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Reader()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        scenes = [shapes.random_scene(rng, max_things=1 if i < batch // 2 else 3, stripes=0.2) for i in range(batch)]
        x = to_batch([_augment(shapes.render(s, SIZE), rng) for s in scenes])
        labels = [_labels(s) for s in scenes]
        single = torch.tensor([len(s.things) == 1 for s in scenes])
        logits = model(x)
        loss = torch.zeros(())
        for name, out_logits in logits.items():
            target = torch.tensor([lab[name] for lab in labels])
            if name in SINGLE_ONLY:
                loss = loss + F.cross_entropy(out_logits[single], target[single])
            else:
                loss = loss + F.cross_entropy(out_logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"reader step {step}/{steps} loss {loss.item():.3f}")
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return model


def load(path: Path = WEIGHTS) -> Reader:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run python -m sdstudio.eval.harness --train")
    model = Reader()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def read(model: Reader, images: list[Image.Image]) -> tuple[list[dict[str, str]], np.ndarray]:
    """Each picture's attributes, and the reader's feature vectors (for distribution distances)."""
    out, feats = [], []
    for i in range(0, len(images), 64):
        x = to_batch(images[i:i + 64])
        f = model.embed(x)
        logits = {name: head(f) for name, head in model.heads.items()}
        feats.append(f.numpy())
        for j in range(x.shape[0]):
            out.append({name: HEADS[name][int(logits[name][j].argmax())] for name in HEADS})
    return out, np.concatenate(feats)


def attribute_accuracy(predicted: list[dict[str, str]], scenes: list[shapes.Scene],
                       attributes: tuple[str, ...] = ("background", "colour", "shape")) -> dict[str, float]:
    """Share of pictures whose attribute matches the scene's, per attribute, and their mean."""
    acc = {}
    for name in attributes:
        truth = [getattr(s, name) if name == "background" else getattr(s.main, name) for s in scenes]
        acc[name] = float(np.mean([p[name] == t for p, t in zip(predicted, truth)]))
    acc["mean"] = float(np.mean([acc[n] for n in attributes]))
    return acc


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (FID's formula on the reader's features)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    eps = np.eye(a.shape[1]) * 1e-6  # few samples for many features: keep the covariances invertible
    s1, s2 = np.cov(a, rowvar=False) + eps, np.cov(b, rowvar=False) + eps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@dataclass
class Prompted:
    scene: shapes.Scene
    prompt: str
    seed: int


def prompt_set(n: int = 200, seed: int = 1234) -> list[Prompted]:
    """A fixed set of single-object scenes with plain captions and seeds."""
    rng = np.random.default_rng(seed)
    return [Prompted(s, shapes.caption(s), int(rng.integers(0, 2**31))) for s in
            (shapes.random_scene(rng, 1) for _ in range(n))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train the quality harness's reader")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    if args.train:
        model = train(args.steps)
        items = prompt_set(200, seed=99)
        predicted, _ = read(model, [shapes.render(p.scene, 256) for p in items])
        acc = attribute_accuracy(predicted, [p.scene for p in items], tuple(HEADS)[:5])
        print("reader accuracy on clean renders:", {k: round(v, 3) for k, v in acc.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


