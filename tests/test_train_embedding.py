"""Textual inversion training (sdstudio.training.embedding) and A1111's create/train embedding routes.

Formats and routes run on the tiny random SD1 checkpoint; whether training learns anything is measured on
the shipped demo model (a real, if small, SD 1.x v-prediction model: a random UNet barely listens to its
conditioning, so no embedding could lower its loss). "Lower" is a fixed probe: the denoising loss of the
training pictures at 8 fixed (timestep, noise) draws, before and after, with the prompt "zz".
"""

from __future__ import annotations

import copy
import os
import shutil
import threading
import time

import pytest
import torch
from PIL import Image
from train_fixtures import api_client, demo_engine, demo_root, plain_colours, red_circles

from sdstudio.engine.conditioning import TextConditioner
from sdstudio.engine.schedules import DiscreteSchedule
from sdstudio.models.embeddings import EmbeddingLibrary, load_embedding
from sdstudio.models.loader import load_checkpoint
from sdstudio.training.embedding import (
    TrainingError,
    create_embedding,
    diffusion_loss,
    encode_captions,
    encode_latents,
    filewords_of,
    generator,
    learn_rate_at,
    load_images,
    make_caption,
    parse_learn_rate,
    read_embedding,
    train_embedding,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """An engine over a data dir holding the demo model, the model itself, its file, and red-circle pictures."""
    root = demo_root(tmp_path_factory, "ti-demo")
    data = red_circles(root / "data", [f"{i:03d}-red circle.png" for i in range(4)])
    (root / "zz.txt").write_text("[name]\n")
    return (*demo_engine(root), data, root)


def probe_loss(model, data, path) -> float:
    images, _ = load_images(data, 64, 64)
    latents = encode_latents(model.vae, images, CPU, "deterministic")
    conditioner = TextConditioner(model, CPU, {"zz": load_embedding(path)})
    cond = encode_captions(conditioner, ["zz"] * len(latents), grad=False)
    with torch.no_grad():
        return sum(float(diffusion_loss(model, latents, cond, generator(99, k), schedule=DiscreteSchedule(),
                                        device=CPU, width=64, height=64)) for k in range(8)) / 8


def test_create_writes_a1111_embedding(tiny_sd1, tmp_path):
    model = load_checkpoint(tiny_sd1)
    path = create_embedding("my/emb!", 4, "red square", model, folder=tmp_path)
    assert path == tmp_path / "myemb.pt"  # A1111 keeps letters, digits and ._- and spaces
    data = torch.load(path, weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265} and data["name"] == "myemb" and data["step"] == 0
    assert data["sd_checkpoint"] is None and data["sd_checkpoint_name"] is None  # set by training, as A1111 does
    vec = data["string_to_param"]["*"]
    assert isinstance(vec, torch.Tensor) and vec.shape == (4, 64) and vec.dtype == torch.float32
    # init text "red square" is 2 tokens: each fills its share of the 4 vectors (A1111: vec[i] = emb[i*2//4])
    ids = model.tokenizers[0]("red square", add_special_tokens=False).input_ids
    rows = model.text_encoders[0].get_input_embeddings().weight[ids].detach()
    assert torch.equal(vec, rows[[0, 0, 1, 1]])
    with pytest.raises(TrainingError, match="already exists"):
        create_embedding("myemb", 1, "x", model, folder=tmp_path)
    empty = torch.load(create_embedding("blank", 3, "", model, folder=tmp_path), weights_only=True)
    assert not empty["string_to_param"]["*"].any()
    assert load_embedding(path).vectors[0].shape == (4, 64)


def test_create_sdxl_writes_clip_l_and_clip_g(tiny_dir, tmp_path):
    model = load_checkpoint(tiny_dir / "tiny-sdxl.safetensors")
    path = create_embedding("xl", 2, "cat", model, folder=tmp_path)
    assert path.suffix == ".safetensors"
    emb = load_embedding(path)
    assert emb.for_width(64).shape == (2, 64) and emb.for_width(128).shape == (2, 128)
    vectors, fields = read_embedding(path)
    assert fields["name"] == "xl" and fields["step"] == 0 and len(vectors) == 2


def test_learn_rate_schedule():
    assert parse_learn_rate("0.005", 100) == [(0.005, 100)]
    schedule = parse_learn_rate("0.005:100, 1e-3:1000, 1e-5", 2000)
    assert schedule == [(0.005, 100), (0.001, 1000), (1e-5, 2000)]
    assert [learn_rate_at(schedule, s) for s in (0, 99, 100, 999, 1000, 1999, 2000)] == \
        [0.005, 0.005, 0.001, 0.001, 1e-5, 1e-5, None]
    assert parse_learn_rate("0.1:50, 0.01:5000", 300) == [(0.1, 50), (0.01, 300)]  # clamped to the run's steps
    with pytest.raises(TrainingError, match="cannot read"):
        parse_learn_rate("fast", 10)


def test_captions_from_files_and_templates(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "00012-a cat.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("dog, grass, sky\n")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    assert filewords_of(tmp_path / "00012-a cat.png") == "a cat"  # leading numbers cut, as A1111 reads names
    images, skipped = load_images(tmp_path, 16, 16)
    assert [i.filewords for i in images] == ["a cat", "dog, grass, sky"] and images[0].pixels.shape == (3, 16, 16)
    assert len(skipped) == 1 and skipped[0][0] == "broken.png"
    assert make_caption("a photo of [name], [filewords]", "zz", "dog, grass") == "a photo of zz, dog, grass"
    import random

    dropped = make_caption("[filewords]", "zz", "a,b,c,d,e,f,g,h", tag_drop_out=0.5, rng=random.Random(1))
    assert 0 < len(dropped.split(",")) < 8
    shuffled = make_caption("[filewords]", "zz", "a,b,c,d,e,f,g,h", shuffle_tags=True, rng=random.Random(1))
    assert sorted(shuffled.split(",")) == list("abcdefgh") and shuffled != "a,b,c,d,e,f,g,h"


def test_training_lowers_the_loss_and_changes_only_the_embedding(demo, tmp_path):
    _, file, model, data, root = demo
    before_weights = {k: v.clone() for m in (model.unet, model.vae, *model.text_encoders)
                      for k, v in m.state_dict().items()}
    path = create_embedding("zz", 1, "blue", model, folder=tmp_path)
    start = probe_loss(model, data, path)
    seen = []
    result = train_embedding("zz", model, data, folder=tmp_path, checkpoint=file, learn_rate="0.05", steps=20,
                             batch_size=2, training_width=64, training_height=64, template_file=root / "zz.txt",
                             seed=1, on_progress=seen.append)
    end = probe_loss(model, data, result.path)
    print(f"probe loss {start:.4f} -> {end:.4f}")
    assert end < start * 0.9
    assert result.steps == 20 and [p.step for p in seen] == list(range(1, 21))
    assert "Step: 20" in seen[-1].textinfo and "Loss:" in seen[-1].textinfo
    data_out = torch.load(result.path, weights_only=True)
    assert data_out["step"] == 20 and data_out["sd_checkpoint"] == file.short_hash
    assert data_out["sd_checkpoint_name"] == "sdstudio-demo" and data_out["name"] == "zz"
    assert data_out["string_to_param"]["*"].shape == (1, 96)
    after_weights = {k: v for m in (model.unet, model.vae, *model.text_encoders) for k, v in m.state_dict().items()}
    assert all(torch.equal(before_weights[k], after_weights[k]) for k in before_weights)  # only the vectors moved


def test_trained_embedding_loads_here_and_in_diffusers(demo, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    _, file, model, data, root = demo
    initial = create_embedding("zz", 1, "blue", model, folder=tmp_path / "init")
    shutil.copy(initial, tmp_path / "zz-initial.pt")
    result = train_embedding("zz", model, data, folder=tmp_path / "init", checkpoint=file, learn_rate="0.05",
                             steps=5, training_width=64, training_height=64, template_file=root / "zz.txt", seed=3)
    trained_vec = torch.load(result.path, weights_only=True)["string_to_param"]["*"]
    library = EmbeddingLibrary(tmp_path / "init")
    usable = library.usable([96])
    assert set(usable) == {"zz"} and torch.equal(usable["zz"].vectors[0], trained_vec)
    ours = TextConditioner(model, CPU, usable).encode("zz").crossattn
    # the untrained vectors give other conditioning
    untrained = TextConditioner(model, CPU, {"zz": load_embedding(tmp_path / "zz-initial.pt")}).encode("zz").crossattn
    assert not torch.allclose(ours, untrained, atol=1e-4)

    tokenizer, encoder = copy.deepcopy(model.tokenizers[0]), copy.deepcopy(model.text_encoders[0])
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=encoder, tokenizer=tokenizer, unet=model.unet,
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_textual_inversion(str(result.path), token="<zz>")  # "zz" is a CLIP word already
    token_id = tokenizer.convert_tokens_to_ids("<zz>")
    assert torch.equal(encoder.get_input_embeddings().weight[token_id].detach(), trained_vec[0])
    ids = tokenizer("<zz>", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = encoder(ids).last_hidden_state
    # CLIP's attention is causal: BOS, the vector and EOS see the same tokens in both, whatever the padding
    assert torch.allclose(ours[:, :3], theirs[:, :3], atol=1e-5)


def test_resume_after_interrupt_gives_the_same_vectors(demo, tmp_path):
    _, file, model, data, _ = demo
    (data.parent / "tags.txt").write_text("[name], [filewords]\n[filewords] by [name]\n")
    kwargs = {"checkpoint": file, "learn_rate": "0.05:4, 0.01", "steps": 8, "batch_size": 2, "gradient_step": 2,
              "training_width": 64, "training_height": 64, "template_file": data.parent / "tags.txt",
              "shuffle_tags": True, "tag_drop_out": 0.3, "latent_sampling_method": "random",
              "clip_grad_mode": "norm", "clip_grad_value": "1.0", "seed": 11}
    for run in ("straight", "resumed", "no-optim"):
        create_embedding("zz", 2, "blue circle", model, folder=tmp_path / run)
    straight = train_embedding("zz", model, data, folder=tmp_path / "straight", **kwargs)

    def stop_after_3():
        return len(seen) >= 3
    for run in ("resumed", "no-optim"):
        seen = []
        first = train_embedding("zz", model, data, folder=tmp_path / run, on_progress=seen.append,
                                should_stop=stop_after_3, **kwargs)
        assert first.interrupted and first.steps == 3
        assert torch.load(first.path, weights_only=True)["step"] == 3
        if run == "no-optim":
            os.remove(f"{first.path}.optim")
        again = train_embedding("zz", model, data, folder=tmp_path / run, **{**kwargs, "seed": 11})
        assert again.initial_step == 3 and again.steps == 8
        if run == "resumed":
            resumed_losses = again.losses
    vec = {run: torch.load(tmp_path / run / "zz.pt", weights_only=True)["string_to_param"]["*"]
           for run in ("straight", "resumed", "no-optim")}
    assert torch.equal(vec["straight"], vec["resumed"])
    assert not torch.allclose(vec["straight"], vec["no-optim"])  # without the optimizer state it drifts: the test bites
    assert resumed_losses == straight.losses[3:]  # the same batches, noise and steps after the restart


def test_routes(data_dir):
    from tests.test_server import AUTH

    client = api_client(data_dir)
    pics = plain_colours(data_dir / "pics", ["0.png", "1.png"], "a plain colour")
    r = client.post("/sdapi/v1/create/embedding", headers=AUTH,
                    json={"name": "tiny-emb", "num_vectors_per_token": 2, "overwrite_old": False, "init_text": "cat"})
    assert r.status_code == 200
    assert r.json() == {"info": f"create embedding filename: {data_dir / 'embeddings' / 'tiny-emb.pt'}"}
    again = client.post("/sdapi/v1/create/embedding", headers=AUTH, json={"name": "tiny-emb", "init_text": "cat"})
    assert again.json()["info"].startswith("create embedding error: file ") and "already exists" in again.json()["info"]
    listed = client.get("/sdapi/v1/embeddings", headers=AUTH).json()
    assert listed["loaded"]["tiny-emb"]["vectors"] == 2
    body = {"id_task": "task(1)", "embedding_name": "tiny-emb", "learn_rate": "0.005", "batch_size": 1,
            "gradient_step": 1, "data_root": str(pics), "log_directory": "textual_inversion", "training_width": 64,
            "training_height": 64, "varsize": False, "steps": 3, "clip_grad_mode": "disabled",
            "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling_method": "once",
            "use_weight": False, "create_image_every": 0, "save_embedding_every": 2,
            "template_filename": "style_filewords.txt", "save_image_with_stored_embedding": False,
            "preview_from_txt2img": False, "preview_prompt": "", "preview_negative_prompt": "", "preview_steps": 20,
            "preview_sampler_name": "Euler a", "preview_cfg_scale": 7, "preview_seed": -1, "preview_width": 512,
            "preview_height": 512}
    r = client.post("/sdapi/v1/train/embedding", headers=AUTH, json=body)
    path = data_dir / "embeddings" / "tiny-emb.pt"
    assert r.json() == {"info": f"train embedding complete: filename: {path} error: None"}
    assert torch.load(path, weights_only=True)["step"] == 3
    copies = list((data_dir / "textual_inversion").rglob("tiny-emb-2.pt"))
    assert len(copies) == 1 and list((data_dir / "textual_inversion").rglob("textual_inversion_loss.csv"))
    bad = client.post("/sdapi/v1/train/embedding", headers=AUTH, json={**body, "bogus": 1}).json()["info"]
    assert bad == "train embedding error: train_embedding() got an unexpected keyword argument 'bogus'"
    missing = client.post("/sdapi/v1/train/embedding", headers=AUTH,
                          json={**body, "embedding_name": "nope", "steps": 5}).json()["info"]
    assert missing.startswith("train embedding complete: filename:  error: embedding 'nope' not found")
    outside = client.post("/sdapi/v1/train/embedding", headers=AUTH, json={**body, "log_directory": "/tmp/x"})
    assert outside.status_code == 403

    # a long run: /progress shows its step and loss as A1111's textinfo; /interrupt stops it with the file saved
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(client.post(
        "/sdapi/v1/train/embedding", headers=AUTH, json={**body, "steps": 100000, "save_embedding_every": 0}).json()))
    worker.start()
    textinfo, deadline = None, time.time() + 60
    while time.time() < deadline:
        textinfo = client.get("/sdapi/v1/progress", headers=AUTH).json()["textinfo"] or ""
        if "Step: " in textinfo:
            break
        time.sleep(0.05)
    assert "Loss: " in textinfo and "Last prompt: " in textinfo
    assert client.post("/sdapi/v1/interrupt", headers=AUTH).json()["interrupted"]
    worker.join(60)
    assert answer["info"] == f"train embedding complete: filename: {path} error: None"
    assert 3 < torch.load(path, weights_only=True)["step"] < 100000


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_loss_is_the_ddpm_objective(which, demo, tiny_sd1):
    """Against diffusers' DDPM scheduler (scaled-linear betas): noised latents by add_noise, the target the
    noise (epsilon models) or get_velocity (v-prediction: the demo model)."""
    from diffusers import DDPMScheduler

    model = demo[2] if which == "demo" else load_checkpoint(tiny_sd1)
    images, _ = load_images(demo[3], 64, 64)
    latents = encode_latents(model.vae, images[:2], CPU, "deterministic")
    cond = encode_captions(TextConditioner(model, CPU), ["a circle", "a red circle"], grad=False)
    with torch.no_grad():
        ours = float(diffusion_loss(model, latents, cond, generator(5, 0), schedule=DiscreteSchedule(), device=CPU,
                                    width=64, height=64))
        g = generator(5, 0)  # the same draws, in the same order
        t = torch.randint(0, 1000, (2,), generator=g)
        noise = torch.randn((2, 4, 8, 8), generator=g)
        x0 = torch.stack([lat.mean for lat in latents])
        ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        target = ddpm.get_velocity(x0, noise, t) if model.spec.prediction == "v_prediction" else noise
        pred = model.unet(ddpm.add_noise(x0, noise, t), t, encoder_hidden_states=cond.crossattn).sample
    assert model.spec.prediction == ("v_prediction" if which == "demo" else "epsilon")
    assert ours == pytest.approx(float(((pred - target) ** 2).mean()), rel=1e-5)
