"""Hypernetwork creation and training (sdstudio.training.hypernetwork) and A1111's create/train routes.

Layout and routes on the tiny SD1 checkpoint (attention widths 32 and 64); learning is measured on the
shipped demo model, with the probe of tests/test_train_embedding.py: the denoising loss of the training
pictures at 8 fixed (timestep, noise) draws, with and without training.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from train_fixtures import api_client, demo_engine, demo_root, plain_colours, red_circles

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine.conditioning import TextConditioner
from sdstudio.engine.hypernetwork import Hypernetwork, applied
from sdstudio.engine.schedules import DiscreteSchedule
from sdstudio.models.loader import load_checkpoint
from sdstudio.training.embedding import (
    TrainingError,
    diffusion_loss,
    encode_captions,
    encode_latents,
    generator,
    load_images,
)
from sdstudio.training.hypernetwork import create_hypernetwork, train_hypernetwork

CPU = torch.device("cpu")
GEN = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 42}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = demo_root(tmp_path_factory, "hn-demo")
    data = red_circles(root / "data", [f"{i}.png" for i in range(4)], "a circle")
    return (*demo_engine(root), data, root)


def probe_loss(model, data, path) -> float:
    images, _ = load_images(data, 64, 64)
    latents = encode_latents(model.vae, images, CPU, "deterministic")
    cond = encode_captions(TextConditioner(model, CPU), ["a circle"] * len(latents), grad=False)
    with torch.no_grad(), applied(model.unet, [(Hypernetwork(path), 1.0)]):
        return sum(float(diffusion_loss(model, latents, cond, generator(99, k), schedule=DiscreteSchedule(),
                                        device=CPU, width=64, height=64)) for k in range(8)) / 8


def test_create_writes_a1111_layout(tmp_path):
    path = create_hypernetwork("my hn", [64, 32], "1, 2, 1", "relu", "Normal", True, True, "0, 0.1, 0",
                               folder=tmp_path, seed=0)
    assert path == tmp_path / "my hn.pt"
    data = torch.load(path, weights_only=True)
    assert {k for k in data if isinstance(k, int)} == {32, 64}
    meta = {k: v for k, v in data.items() if not isinstance(k, int)}
    assert meta == {"step": 0, "name": "my hn", "layer_structure": [1.0, 2.0, 1.0], "activation_func": "relu",
                    "is_layer_norm": True, "weight_initialization": "Normal", "sd_checkpoint": None,
                    "sd_checkpoint_name": None, "activate_output": False, "use_dropout": True,
                    "dropout_structure": [0.0, 0.1, 0.0], "last_layer_dropout": True, "optional_info": None}
    k, v = data[64]
    # A1111's Sequential: Linear(0), ReLU(1), LayerNorm(2), Dropout(3), Linear(4), LayerNorm(5)
    assert set(k) == set(v) == {f"linear.{i}.{p}" for i in (0, 2, 4, 5) for p in ("weight", "bias")}
    assert k["linear.0.weight"].shape == (128, 64) and k["linear.4.weight"].shape == (64, 128)
    assert 0.008 < float(k["linear.0.weight"].std()) < 0.012 and not k["linear.0.bias"].any()  # N(0, 0.01), 0
    assert not torch.equal(k["linear.0.weight"], v["linear.0.weight"])  # the two MLPs start apart
    hn = Hypernetwork(path)  # the engine's loader reads it, layer for layer
    assert torch.equal(hn.layers[64][0][0].weight, k["linear.0.weight"])
    assert torch.equal(hn.layers[32][1][5].bias, data[32][1]["linear.5.bias"])
    with pytest.raises(TrainingError, match="already exists"):
        create_hypernetwork("my hn", [64], folder=tmp_path)
    with pytest.raises(TrainingError, match="start and end with size 1"):
        create_hypernetwork("bad", [64], "2, 1", folder=tmp_path)
    plain = torch.load(create_hypernetwork("plain", [64], folder=tmp_path, seed=1), weights_only=True)
    assert set(plain[64][0]) == {"linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"}
    assert plain["dropout_structure"] == [0.0, 0.0, 0.0] and plain["activation_func"] == "linear"


def test_training_lowers_the_loss_and_changes_the_output(demo, tmp_path):
    engine, file, model, data, _ = demo
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    folder = engine.paths.hypernetwork_dir
    path = create_hypernetwork("hh", [32, 64, 96], "1, 2, 1", "relu", "Normal", True, True, "0, 0.1, 0",
                               overwrite_old=True, folder=folder, seed=0)
    start = probe_loss(model, data, path)
    engine.registry.refresh()
    untrained = engine.generate(Txt2ImgRequest(**{**GEN, "prompt": "a red circle <hypernet:hh:1>"})).images[0].image
    result = train_hypernetwork("hh", model, data, folder=folder, checkpoint=file, learn_rate="3e-3", steps=20,
                                batch_size=2, training_width=64, training_height=64, seed=1)
    end = probe_loss(model, data, result.path)
    print(f"probe loss {start:.4f} -> {end:.4f}")
    assert end < start * 0.95
    saved = torch.load(result.path, weights_only=True)
    assert saved["step"] == 20 and saved["sd_checkpoint"] == file.short_hash
    assert saved["sd_checkpoint_name"] == "sdstudio-demo" and saved["dropout_structure"] == [0.0, 0.1, 0.0]
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())  # the UNet is untouched
    plain = engine.generate(Txt2ImgRequest(**GEN)).images[0].image
    trained = engine.generate(Txt2ImgRequest(**{**GEN, "prompt": "a red circle <hypernet:hh:1>"})).images[0].image
    a, b, c = (np.asarray(x, dtype=np.int16) for x in (plain, untrained, trained))
    assert np.abs(c - a).mean() > np.abs(b - a).mean() + 0.5  # trained, it moves the picture further


def test_resume_after_interrupt_gives_the_same_weights(demo, tmp_path):
    _, file, model, data, _ = demo
    kwargs = {"checkpoint": file, "learn_rate": "2e-3:3, 1e-3", "steps": 6, "batch_size": 2, "gradient_step": 2,
              "training_width": 64, "training_height": 64, "latent_sampling_method": "random",
              "clip_grad_mode": "value", "clip_grad_value": "0.05", "seed": 4}
    for run in ("straight", "resumed"):
        create_hypernetwork("hh", [64, 96], "1, 2, 1", "relu", "XavierNormal", False, True, "0, 0.2, 0",
                            folder=tmp_path / run, seed=2)
    straight = train_hypernetwork("hh", model, data, folder=tmp_path / "straight", **kwargs)
    seen = []
    first = train_hypernetwork("hh", model, data, folder=tmp_path / "resumed", on_progress=seen.append,
                               should_stop=lambda: len(seen) >= 2, **kwargs)
    assert first.interrupted and first.steps == 2
    again = train_hypernetwork("hh", model, data, folder=tmp_path / "resumed", **kwargs)
    assert again.initial_step == 2 and again.losses == straight.losses[2:]
    a = torch.load(tmp_path / "straight" / "hh.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "hh.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for width in (64, 96):
        for which in range(2):
            assert all(torch.equal(a[width][which][key], b[width][which][key]) for key in a[width][which])


def test_unfit_sizes_are_refused(tiny_sd1, tmp_path):
    model = load_checkpoint(tiny_sd1)
    create_hypernetwork("big", [768, 1280], folder=tmp_path, seed=0)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    with pytest.raises(TrainingError, match="none of its sizes"):
        train_hypernetwork("big", model, tmp_path, folder=tmp_path, steps=2, training_width=64, training_height=64)


def test_routes(data_dir):
    from tests.test_server import AUTH

    client = api_client(data_dir)
    pics = plain_colours(data_dir / "pics", ["0-plain colour.png", "1-plain colour.png"])
    r = client.post("/sdapi/v1/create/hypernetwork", headers=AUTH,
                    json={"name": "tiny-hn", "enable_sizes": [32, 64], "overwrite_old": False,
                          "layer_structure": "1, 2, 1", "activation_func": "relu", "weight_init": "Normal",
                          "add_layer_norm": False, "use_dropout": False, "dropout_structure": "0, 0, 0"})
    path = data_dir / "models" / "hypernetworks" / "tiny-hn.pt"
    assert r.json() == {"info": f"create hypernetwork filename: {path}"}
    listed = client.get("/sdapi/v1/hypernetworks", headers=AUTH).json()
    assert [h["name"] for h in listed] == ["tiny-hn"]
    again = client.post("/sdapi/v1/create/hypernetwork", headers=AUTH, json={"name": "tiny-hn"}).json()["info"]
    assert again.startswith("create hypernetwork error: file ") and again.endswith("already exists")
    body = {"id_task": "task(2)", "hypernetwork_name": "tiny-hn", "learn_rate": "0.001", "batch_size": 1,
            "gradient_step": 1, "data_root": str(pics), "log_directory": "textual_inversion", "training_width": 64,
            "training_height": 64, "varsize": False, "steps": 4, "clip_grad_mode": "disabled",
            "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling_method": "once",
            "use_weight": False, "create_image_every": 2, "save_hypernetwork_every": 2,
            "template_filename": "hypernetwork.txt", "preview_from_txt2img": True, "preview_prompt": "a plain colour",
            "preview_negative_prompt": "", "preview_steps": 2, "preview_sampler_name": "Euler a",
            "preview_cfg_scale": 7, "preview_seed": 1, "preview_width": 64, "preview_height": 64}
    r = client.post("/sdapi/v1/train/hypernetwork", headers=AUTH, json=body)
    assert r.json() == {"info": f"train hypernetwork complete: filename: {path} error: None"}
    assert torch.load(path, weights_only=True)["step"] == 4
    logs = data_dir / "textual_inversion"
    assert sorted(p.name for p in logs.rglob("tiny-hn-*.pt")) == ["tiny-hn-2.pt", "tiny-hn-4.pt"]
    assert sorted(p.name for p in logs.rglob("*.png")) == ["tiny-hn-2.png", "tiny-hn-4.png"]
    assert list(logs.rglob("hypernetwork_loss.csv"))
    bad = client.post("/sdapi/v1/train/hypernetwork", headers=AUTH, json={**body, "steps": "many"}).json()["info"]
    assert bad == "train hypernetwork error: steps must be a whole number, got 'many'"
    gen = {"prompt": "a plain colour", "steps": 3, "width": 64, "height": 64, "seed": 3}
    plain = client.post("/sdapi/v1/txt2img", headers=AUTH, json=gen).json()["images"][0]
    with_hn = client.post("/sdapi/v1/txt2img", headers=AUTH,
                          json={**gen, "prompt": "a plain colour <hypernet:tiny-hn:1>"}).json()["images"][0]
    assert plain != with_hn
