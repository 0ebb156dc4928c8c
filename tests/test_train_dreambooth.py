"""The Dreambooth trainer on the tiny SD1 checkpoint: its checkpoint is A1111's single file (original key layout,
fp16 on request) that our loader and diffusers' from_single_file read with the trained weights; it learns (the
loss on a fixed batch falls); prior preservation adds the class loss as its definition says; a resumed run
ends bit-identical; missing class images are generated; the API route, the CLI and the tab run it; unfit
models and empty folders are refused clearly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from train_fixtures import api_client, fixed_loss, squares, wait_job

from sdstudio.models.diffusers_layout import write_config_folder
from sdstudio.models.loader import load_checkpoint
from sdstudio.training import DatasetError, TrainingDataset, TrainingError
from sdstudio.training.dreambooth import (
    ClassBatches,
    count_images,
    engine_class_generator,
    ensure_class_images,
    train_dreambooth,
)
from sdstudio.training.loop import batch_loss

torch.set_num_threads(1)
DS = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Instance images (``2_sks shape``: the class tokens are the caption) and class images (``1_shape``)."""
    root = tmp_path_factory.mktemp("db-data")
    squares(root / "instance" / "2_sks shape", [(220, 40, 40), (230, 60, 30)])
    squares(root / "class" / "1_shape", [(40, 40, 220), (40, 200, 40)], background=120)
    return root


def _ds(folder, **kw):
    return TrainingDataset.from_folder(folder, **DS, **kw)


@pytest.fixture
def sd1(tiny_sd1):
    return load_checkpoint(tiny_sd1)  # fresh: the trainer changes a loaded model's weights in place


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_is_a1111_single_file_that_our_loader_and_diffusers_read(sd1, data, tiny_sd1, tmp_path):
    base_unet = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    base_te = {k: v.clone() for k, v in sd1.text_encoders[0].state_dict().items()}
    result = train_dreambooth(sd1, _ds(data / "instance"), max_train_steps=2, learning_rate=1e-4,
                              train_text_encoder=True, output_dir=tmp_path, output_name="db")
    assert result.path == tmp_path / "db.safetensors" and result.steps == 2 and not result.interrupted
    trained_unet, trained_te = sd1.unet.state_dict(), sd1.text_encoders[0].state_dict()
    assert not _same(trained_unet, base_unet) and not _same(trained_te, base_te)
    assert not any(p.requires_grad for p in sd1.unet.parameters()) and not sd1.unet.training  # as the loader leaves it

    # the original layout: the base file's keys, the VAE and buffers as they were
    base = load_file(str(tiny_sd1))
    saved = load_file(str(result.path))
    assert set(saved) == set(base)
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in saved)
    assert all(torch.equal(saved[k], base[k]) for k in base if k.startswith("first_stage_model."))
    assert all(v.dtype == torch.float32 for v in saved.values() if v.is_floating_point())
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert '"prior_loss_weight": null' in meta["sdstudio_training"] and '"steps": 2' in meta["sdstudio_training"]

    ours = load_checkpoint(result.path)
    assert _same(ours.unet.state_dict(), trained_unet) and _same(ours.text_encoders[0].state_dict(), trained_te)
    pipe = StableDiffusionPipeline.from_single_file(str(result.path),
                                                    config=str(write_config_folder(sd1.spec, tmp_path / "config")),
                                                    local_files_only=True, torch_dtype=torch.float32)
    assert _same(pipe.unet.state_dict(), trained_unet)
    theirs_te = pipe.text_encoder.state_dict()
    assert all(torch.equal(theirs_te[k], v) for k, v in trained_te.items() if k in theirs_te) and len(theirs_te) > 20

    # fp16: every float tensor halved, the same weights at that precision
    from sdstudio.training.dreambooth import save_checkpoint

    half = save_checkpoint(sd1, tmp_path / "half.safetensors", base=tiny_sd1, precision="fp16")
    halved = load_file(str(half))
    assert {v.dtype for v in halved.values() if v.is_floating_point()} == {torch.float16}
    loaded = load_checkpoint(half, torch.float16)
    assert all(torch.equal(loaded.unet.state_dict()[k], v.half()) for k, v in trained_unet.items())


def test_training_lowers_the_loss_on_a_fixed_batch(sd1, data, tmp_path):
    ds = _ds(data / "instance")
    before = fixed_loss(sd1, ds)
    result = train_dreambooth(sd1, ds, max_train_steps=8, batch_size=4, learning_rate=1e-3, seed=1,
                              output_dir=tmp_path, output_name="fit")
    after = fixed_loss(sd1, ds)
    assert after < 0.8 * before, (before, after)
    assert len(result.losses) == 8 and (tmp_path / "fit-log.csv").read_text().count("\n") == 9


def test_prior_preservation_adds_the_weighted_class_loss(tiny_sd1, data, tmp_path):
    """The first step's loss (weights not yet changed) is instance + prior_loss_weight x class, each the batch
    loss with the run's generator drawn in that order; weight 0 leaves the instance loss alone."""
    ds, classes = _ds(data / "instance"), _ds(data / "class")
    model = load_checkpoint(tiny_sd1)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        instance = float(batch_loss(model, ds.load_batch(ds.epoch_batches(0, 2)[0], 0, 0), gen))
        cls = float(batch_loss(model, ClassBatches(classes, 2).at(0), gen))
    assert cls > 0.1
    for weight in (0.0, 2.0):
        run = train_dreambooth(load_checkpoint(tiny_sd1), ds, class_dataset=classes, max_train_steps=1, batch_size=2,
                               prior_loss_weight=weight, seed=5, output_dir=tmp_path / str(weight), output_name="p")
        assert run.losses[0] == pytest.approx(instance + weight * cls, rel=1e-5), weight
    with safe_open(str(run.path), "pt") as f:
        assert '"prior_loss_weight": 2.0' in f.metadata()["sdstudio_training"]


def test_class_batches_cycle_through_the_class_set(data):
    classes = ClassBatches(_ds(data / "class"), 1)
    seen = [classes.at(s).paths[0].name for s in range(4)]
    assert sorted(seen[:2]) == ["0.png", "1.png"] and sorted(seen[2:]) == ["0.png", "1.png"]
    assert [classes.at(s).paths[0].name for s in (3, 0)] == [seen[3], seen[0]]  # any step, any order


def test_resume_after_interrupt_is_bit_identical(tiny_sd1, data, tmp_path):
    kw = {"max_train_steps": 3, "batch_size": 2, "learning_rate": 1e-4, "seed": 3, "lr_scheduler": "cosine",
          "noise_offset": 0.05, "output_name": "r"}

    def sets():
        return _ds(data / "instance", flip_aug=True), _ds(data / "class", flip_aug=True)

    ds, classes = sets()
    whole = train_dreambooth(load_checkpoint(tiny_sd1), ds, class_dataset=classes, output_dir=tmp_path / "a", **kw)
    progress = []
    ds, classes = sets()
    stopped = train_dreambooth(load_checkpoint(tiny_sd1), ds, class_dataset=classes, output_dir=tmp_path / "b",
                               work_dir=tmp_path / "work", should_stop=lambda: len(progress) == 1,
                               on_progress=progress.append, **kw)
    assert [(p.step, p.total) for p in progress] == [(1, 3)] and progress[-1].eta >= 0
    assert stopped.interrupted and stopped.path is None and stopped.state_path == tmp_path / "work" / "r-state.pt"
    ds, classes = sets()
    resumed = train_dreambooth(load_checkpoint(tiny_sd1), ds, class_dataset=classes, output_dir=tmp_path / "b",
                               work_dir=tmp_path / "work", resume=True, **kw)
    assert resumed.steps == 3 and resumed.losses == whole.losses
    assert _same(load_file(str(whole.path)), load_file(str(resumed.path)))
    # text encoders not trained: their tensors are the base file's, untouched
    base = load_file(str(tiny_sd1))
    saved = load_file(str(resumed.path))
    assert all(torch.equal(saved[k], base[k]) for k in base if k.startswith("cond_stage_model."))
    with pytest.raises(TrainingError, match="train_text_encoder"):
        train_dreambooth(load_checkpoint(tiny_sd1), ds, output_dir=tmp_path / "c", work_dir=tmp_path / "work",
                         resume=stopped.state_path, train_text_encoder=True, **kw)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_checkpoints_round_trip_their_text_encoders(tiny_dir, tmp_path, family):
    """OpenCLIP's fused q/k/v and SDXL's two encoders are written back in the original layout: every weight
    moved (as training would) reads back as it was written."""
    from sdstudio.training.dreambooth import save_checkpoint

    base = tiny_dir / f"tiny-{family}.safetensors"
    model = load_checkpoint(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in [model.unet, *model.text_encoders]:
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    path = save_checkpoint(model, tmp_path / "out.safetensors", base=base, text_encoders=True)
    back = load_checkpoint(path)
    assert _same(back.unet.state_dict(), model.unet.state_dict())
    for a, b in zip(back.text_encoders, model.text_encoders):
        assert _same(a.state_dict(), b.state_dict())
    assert set(load_file(str(path))) == set(load_file(str(base)))


def test_unfit_models_and_empty_folders_are_refused(tiny_dir, data, tmp_path):
    with pytest.raises(TrainingError, match="refiner"):
        train_dreambooth(tiny_dir / "tiny-sdxl_refiner.safetensors", _ds(data / "instance"), output_dir=tmp_path)
    with pytest.raises(TrainingError, match="float32"):
        train_dreambooth(load_checkpoint(tiny_dir / "tiny-sd1.safetensors", torch.float16), _ds(data / "instance"),
                         output_dir=tmp_path)
    with pytest.raises(TrainingError, match="overwrite the base"):
        train_dreambooth(tiny_dir / "tiny-sd1.safetensors", _ds(data / "instance"), output_dir=tiny_dir,
                         output_name="tiny-sd1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        _ds(tmp_path / "empty")
    with pytest.raises(TrainingError, match="class prompt"):
        ensure_class_images(tmp_path / "empty", 2, None, None)


def test_missing_class_images_are_generated_with_the_engine(make_data_root, data, tmp_path):
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine

    engine = Engine(Paths(make_data_root("db-gen")))
    folder = tmp_path / "classes"
    squares(folder / "1_shape", [(40, 40, 220)])
    generate = engine_class_generator(engine, "tiny-sd1", "a shape", width=64, height=64, steps=2, seed=7)
    written = ensure_class_images(folder, 3, "a shape", generate, batch_size=2, **DS)
    assert [p.name for p in written] == ["class-00000.png", "class-00001.png"]
    assert all(p.parent == folder / "1_shape" and p.with_suffix(".caption").read_text() == "a shape" for p in written)
    assert count_images(folder, **DS) == 3 and ensure_class_images(folder, 3, "a shape", generate, **DS) == []
    again = generate(1, 1)[0]  # picture i is seeded by i: the same whatever the batches
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(written[1]).convert("RGB")))


# ---- interfaces -------------------------------------------------------------------------------------------
def test_api_route_queues_the_job_and_lists_the_checkpoint(data_dir, tiny_dir):
    from tests.test_server import AUTH

    os.link(tiny_dir / "tiny-sdxl_refiner.safetensors", data_dir / "models" / "Stable-diffusion" / "refiner.safetensors")
    client = api_client(data_dir)
    squares(data_dir / "set" / "2_sks shape", [(220, 40, 40), (40, 200, 40)], broken=True)
    body = {"train_data_dir": "set", "reg_data_dir": "classes", "num_class_images": 2, "class_prompt": "a shape",
            "class_infer_steps": 2, "model": "tiny-sd1", "output_name": "sks", "max_train_steps": 2,
            "resolution": 64, "learning_rate": 1e-4, "save_precision": "fp16", "sample_every_n_steps": 2,
            "sample_prompts": ["sks shape"], "cache_latents": True}
    r = client.post("/sdstudio/v1/train/dreambooth", headers=AUTH, json=body)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], AUTH)
    assert job["status"] == "done", job
    result = job["result"]
    path = data_dir / "models" / "Stable-diffusion" / "sks.safetensors"
    assert result["path"] == str(path) and result["steps"] == 2 and result["class_images"] == 2
    assert [n for n, _ in result["skipped_images"]] == ["2_sks shape/broken.png"]
    assert sorted(p.name for p in (data_dir / "classes").iterdir()) == ["class-00000.caption", "class-00000.png",
                                                                      "class-00001.caption", "class-00001.png"]
    work = data_dir / "models" / "dreambooth" / "sks"
    assert (work / "sks-log.csv").is_file() and [p.name for p in (work / "samples").iterdir()] == ["00000002-0-0.png"]
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert '"cache_latents": true' in f.metadata()["sdstudio_training"]  # instance and class pictures
    titles = [m["model_name"] for m in client.get("/sdapi/v1/sd-models", headers=AUTH).json()]
    assert "sks" in titles  # no restart, no refresh call

    def refused(status, text, **change):
        r = client.post("/sdstudio/v1/train/dreambooth", headers=AUTH, json={**body, **change})
        assert r.status_code == status and text in r.text, r.text

    refused(403, "outside", train_data_dir="/tmp")
    refused(403, "outside", reg_data_dir="../")
    refused(422, "bogus", bogus=1)
    refused(422, "refiner", model="refiner")
    refused(422, "no-such", model="no-such")
    (data_dir / "empty").mkdir()
    refused(422, "no usable images", train_data_dir="empty")
    refused(422, "class prompt", reg_data_dir="empty", class_prompt=None)


def test_cli_trains_a_checkpoint_that_generates(data_dir, data, capsys, tmp_path):
    from sdstudio.cli import main

    def run(*args):
        code = main([*args, "--data-dir", str(data_dir)])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = run("train", "dreambooth", str(data / "instance"), "--model", "tiny-sd1", "--steps", "2",
                         "--resolution", "64", "--name", "clidb", "--class-dir", str(data / "class"), "--fp16",
                         "--cache-latents")
    assert code == 0, err
    path = data_dir / "models" / "Stable-diffusion" / "clidb.safetensors"
    assert str(path) in out and path.is_file()
    with safe_open(str(path), "pt") as f:
        assert '"cache_latents": true' in f.metadata()["sdstudio_training"]
    code, out, err = run("txt2img", "sks shape", "--model", "clidb", "--steps", "2", "--size", "64x64")
    assert code == 0, err
    (tmp_path / "empty").mkdir()
    code, _, err = run("train", "dreambooth", str(tmp_path / "empty"), "--model", "tiny-sd1")
    assert code == 2 and "no usable images" in err and "Traceback" not in err
    code, _, err = run("train", "dreambooth", str(data / "instance"), "--model", "tiny-sd1",
                       "--class-dir", str(tmp_path / "empty"), "--num-class-images", "3")
    assert code == 2 and "class prompt" in err


def test_the_tab_queues_a_dreambooth_job(service, data_dir):
    """The Dreambooth sub-tab, built in a page of its own around the real job service (the whole UI is
    test_ui_train's): its ids, and a run from its button's function to the listed checkpoint."""
    from types import SimpleNamespace

    import gradio as gr

    from sdstudio.core.settings import Settings
    from sdstudio.ui.train import TrainTab

    title = service.engine.registry.checkpoint(None).title
    shell = SimpleNamespace(service=service, checkpoint_titles=lambda: [title],
                            settings=Settings(data_dir / "config.json", {"sd_model_checkpoint": title}))
    with gr.Blocks() as page:
        tab = TrainTab(shell).build()
    ids = {getattr(b, "elem_id", None) for b in page.blocks.values()}
    assert {"train_dreambooth_tab", "train_train_dreambooth", "train_dreambooth_class_dir",
            "train_dreambooth_prior_loss_weight", "train_dreambooth_interrupt", "train_dreambooth_cache_latents",
            "train_lora_cache_latents"} <= ids
    squares(data_dir / "set", [(220, 40, 40)], "sks shape")
    args = {"dataset": "set", "class_dir": "", "class_prompt": "", "num_class": 0, "prior_weight": 1.0,
            "model": title, "name": "tab", "steps": 2, "lr": 1e-4, "resolution": 64, "batch": 1,
            "scheduler": "constant", "text_encoder": False, "fp16": False, "flip": False, "resume": False,
            "cache_latents": True}
    *_, (plot, text, _) = tab.run_train_dreambooth("ui:test", *args.values())
    assert "<polyline" in plot and "<span>Step</span> 1–2" in plot  # the run's loss curve, at the end
    path = data_dir / "models" / "Stable-diffusion" / "tab.safetensors"
    assert text.startswith(f"Checkpoint saved: {path} (2 steps") and path.is_file()
    with safe_open(str(path), "pt") as f:
        assert '"cache_latents": true' in f.metadata()["sdstudio_training"]
    assert "tab" in {m.name for m in service.engine.registry.checkpoints}
    with pytest.raises(gr.Error, match="outside"):
        next(tab.run_train_dreambooth("ui:test", *{**args, "class_dir": "/tmp"}.values()))
    with pytest.raises(gr.Error, match="class prompt"):
        next(tab.run_train_dreambooth("ui:test", *{**args, "class_dir": "set", "num_class": 5}.values()))


def test_the_loss_plot_draws_each_step_or_bucket_means():
    from sdstudio.ui.train import loss_plot

    def points(svg: str) -> list[tuple[float, float]]:
        line = svg.split('points="')[1].split('"')[0]
        return [tuple(map(float, p.split(","))) for p in line.split()]

    drawn = points(loss_plot([0.5, 0.25, 1.0]))  # floats: steps 1, 2, 3
    assert drawn == [(4.0, 78.7), (160.0, 116.0), (316.0, 4.0)]  # x over the steps, y: the highest loss on top
    assert "loss 0.5000 → 1.0000 (min 0.2500)" in loss_plot([0.5, 0.25, 1.0])
    pairs = loss_plot([[10, 0.2], [20, float("nan")], [30, 0.1]])  # (step, loss) pairs; a NaN left out
    assert len(points(pairs)) == 2 and "<span>Step</span> 10–30" in pairs
    assert len(points(loss_plot([float(i % 7) for i in range(1000)], most=100))) == 100
    assert loss_plot([0.3]) == "" and loss_plot(None) == ""
