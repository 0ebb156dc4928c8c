"""Latent caching (kohya's cache_latents) for the LoRA and Dreambooth trainers: every picture (and its mirror
image when flipping) goes through the VAE once, batches carry the cached latent distribution instead of
pixels, and the losses and trained weights are those of an uncached run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdstudio.engine import lora as lora_ops
from sdstudio.models.loader import load_checkpoint
from sdstudio.training import TrainingDataset, train_dreambooth, train_lora
from sdstudio.training.loop import batch_loss, vae_encoder

torch.set_num_threads(1)
DS = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Asymmetric pictures (a flip changes them) in two buckets, and class pictures."""
    root = tmp_path_factory.mktemp("cache-data")
    folder = root / "instance" / "2_sks shape"
    folder.mkdir(parents=True)
    for i, (c, size) in enumerate([((220, 40, 40), (64, 64)), ((40, 200, 40), (64, 64)), ((40, 40, 220), (128, 64)),
                                   ((230, 230, 30), (128, 64))]):
        a = np.full((size[1], size[0], 3), 30, np.uint8)
        a[8:40, 4 + 4 * i:24 + 4 * i] = c
        Image.fromarray(a).save(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text(f"sks shape, {['red', 'green', 'blue', 'yellow'][i]}, square")
    classes = root / "class" / "1_shape"
    classes.mkdir(parents=True)
    for i, c in enumerate([(120, 40, 200), (200, 120, 40)]):
        a = np.full((64, 64, 3), 120, np.uint8)
        a[20:50, 10:30] = c
        Image.fromarray(a).save(classes / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return load_checkpoint(tiny_sd1)


def _ds(folder, **kw):
    return TrainingDataset.from_folder(folder, **DS, **kw)


def test_a_cached_batch_gives_the_loss_of_the_pixels(sd1, data):
    plain, cached = _ds(data / "instance", flip_aug=True), _ds(data / "instance", flip_aug=True)
    cached.cache_latents(vae_encoder(sd1.vae))
    assert cached.latents_cached and len(cached._latents) == 2 * len(cached.items)  # each picture and its mirror
    assert not cached._cache  # the pictures themselves are dropped
    flips = set()
    for b, indices in enumerate(plain.epoch_batches(0, 2)):
        a, c = plain.load_batch(indices, 0, b), cached.load_batch(indices, 0, b)
        assert c.pixels is None and c.latents[0].shape == (len(indices), 4, *(s // 8 for s in a.pixels.shape[-2:]))
        assert c.captions == a.captions and c.flipped == a.flipped and c.crops == a.crops and c.size == a.size
        flips.update(a.flipped)
        with torch.no_grad():
            la = batch_loss(sd1, a, torch.Generator().manual_seed(b))
            lc = batch_loss(sd1, c, torch.Generator().manual_seed(b))
        assert torch.allclose(la, lc, rtol=1e-5, atol=1e-7), (la, lc)
    assert flips == {False, True}  # both the pictures and their mirrors were compared


def test_cached_lora_run_trains_the_same_weights(sd1, data, tmp_path):
    kw = {"max_train_steps": 4, "batch_size": 2, "learning_rate": 1e-2, "seed": 5, "train_text_encoder": False}
    plain = train_lora(sd1, _ds(data / "instance"), output_dir=tmp_path / "a", output_name="x", **kw)
    cached = train_lora(sd1, _ds(data / "instance"), output_dir=tmp_path / "b", output_name="x", cache_latents=True,
                        **kw)
    # the first step's loss is the same but for rounding (pictures encoded one by one, not batched: on some CPUs,
    # an AMX Xeon's among them, oneDNN's kernels round a batch of two differently, 2e-7 of the loss); then Adam's
    # normalised steps turn rounding-level differences of the gradients into small differences of the weights
    assert plain.losses[0] == pytest.approx(cached.losses[0], rel=1e-6, abs=0)
    assert np.allclose(plain.losses, cached.losses, rtol=1e-3), (plain.losses, cached.losses)
    # and the two files do the same: the loss on fixed batches with each applied
    ds = _ds(data / "instance")
    fixed = {}
    for run in (plain, cached):
        with torch.no_grad(), lora_ops.applied(sd1, [(lora_ops.LoraFile(run.path, sd1), 1.0, 1.0)]):
            fixed[run.path] = [float(batch_loss(sd1, ds.load_batch(ix, 0, b), torch.Generator().manual_seed(b)))
                               for b, ix in enumerate(ds.epoch_batches(0, 2))]
    with torch.no_grad():
        base = [float(batch_loss(sd1, ds.load_batch(ix, 0, b), torch.Generator().manual_seed(b)))
                for b, ix in enumerate(ds.epoch_batches(0, 2))]
    a, b = fixed[plain.path], fixed[cached.path]
    assert np.allclose(a, b, rtol=2e-3), (a, b)
    # training moved it far more (9x on an AMX Xeon, whose batch-dependent rounding grows over the steps; more elsewhere)
    assert np.abs(np.array(a) - base).max() > 5 * np.abs(np.array(a) - b).max()
    with safe_open(str(cached.path), "pt") as f:
        assert f.metadata()["ss_cache_latents"] == "True"
    with safe_open(str(plain.path), "pt") as f:
        assert f.metadata()["ss_cache_latents"] == "False"


def test_cached_dreambooth_run_has_the_losses_of_an_uncached_one(tiny_sd1, data, tmp_path):
    kw = {"max_train_steps": 2, "batch_size": 2, "learning_rate": 1e-4, "seed": 3}
    runs = {}
    for cache in (False, True):
        runs[cache] = train_dreambooth(load_checkpoint(tiny_sd1), _ds(data / "instance", flip_aug=True),
                                       class_dataset=_ds(data / "class"), output_dir=tmp_path / str(cache),
                                       output_name="db", cache_latents=cache, **kw)
    assert np.allclose(runs[False].losses, runs[True].losses, rtol=1e-4), (runs[False].losses, runs[True].losses)
    assert '"cache_latents": true' in runs[True].metadata["sdstudio_training"]


def test_a_cached_run_resumes_bit_identically(sd1, data, tmp_path):
    kw = {"max_train_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "seed": 7, "cache_latents": True,
          "output_name": "r"}
    whole = train_lora(sd1, _ds(data / "instance", flip_aug=True), output_dir=tmp_path / "a", **kw)
    seen = []
    stopped = train_lora(sd1, _ds(data / "instance", flip_aug=True), output_dir=tmp_path / "b",
                         on_progress=seen.append, should_stop=lambda: len(seen) == 2, **kw)
    assert stopped.interrupted and stopped.steps == 2
    resumed = train_lora(sd1, _ds(data / "instance", flip_aug=True), output_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.losses == whole.losses
    from safetensors.torch import load_file

    a, b = load_file(str(whole.path)), load_file(str(resumed.path))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_caches_latents_when_asked(data_dir, data, capsys):
    """``sdstudio train lora --cache-latents`` reaches the trainer: the file records it (kohya's ss_cache_latents),
    and a run without the flag records its absence."""
    from sdstudio.cli import main

    for flag, name in ((["--cache-latents"], "cached"), ([], "plain")):
        code = main(["train", "lora", str(data / "instance"), "--model", "tiny-sd1", "--steps", "2", "--resolution",
                     "64", "--flip", "--name", name, *flag, "--data-dir", str(data_dir)])
        assert code == 0, capsys.readouterr().err
        with safe_open(str(data_dir / "models" / "Lora" / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["ss_cache_latents"] == str(bool(flag))
