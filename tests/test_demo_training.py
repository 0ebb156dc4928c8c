"""The demo model's trainer: a seconds-long run of the real pipeline, resumed, exported, and loaded back
through the normal checkpoint loader with the same networks."""

from __future__ import annotations

import csv

import numpy as np
import torch

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.models.loader import load_checkpoint
from training.demo_model.train import SCALING, Config, Run


def test_train_resume_export_and_load(tmp_path):
    run_dir = tmp_path / "run"
    Run(run_dir, Config.tiny(unet_steps=1), log=lambda m: None).train()
    resumed = Run(run_dir, Config.tiny(unet_steps=3), log=lambda m: None)
    assert (resumed.stage, resumed.step) == ("done", 1)  # the first run's state was found
    resumed.stage = "diffusion"  # a longer schedule continues where it stopped
    resumed.opt = resumed._diffusion_optimizer()
    resumed.train()
    rows = list(csv.DictReader((run_dir / "log.csv").open()))
    assert [r["step"] for r in rows if r["stage"] == "diffusion"] == ["1", "2", "3"]
    with torch.no_grad():  # the folded latent scale: latents × SCALING have about unit spread
        images = torch.rand(4, 3, 64, 64) * 2 - 1
        std = float(resumed.vae.encode(images).latent_dist.mean.std() * SCALING)
    assert 0.3 < std < 3
    assert [r["step"] for r in rows if r["stage"] == "v"][-1] == "1"  # then the v-prediction stage
    path = resumed.export(tmp_path / "data" / "models" / "Stable-diffusion" / "demo.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.spec.prediction == "v_prediction"  # the file's v_pred key says so
    resumed.unet.eval()
    resumed.text.eval()
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    ctx = torch.randn(1, 77, 32)
    with torch.no_grad():
        ours = resumed.unet(x, t, ctx).sample
        back = loaded.unet(x, t, ctx.to(loaded.unet.dtype)).sample.float()
        tokens = torch.tensor([[49406, 320, 736, 2866, 49407] + [49407] * 72])
        text_a = resumed.text(tokens).last_hidden_state
        text_b = loaded.text_encoders[0](tokens).last_hidden_state.float()
    assert torch.allclose(ours, back, atol=2e-2), (ours - back).abs().max()  # fp16 export
    assert torch.allclose(text_a, text_b, atol=2e-2)
    engine = Engine(Paths(tmp_path / "data"))
    image = engine.txt2img(Txt2ImgRequest(prompt="a red circle on a blue background", steps=2, width=64, height=64,
                                          seed=1)).images[0].image
    assert np.asarray(image).std() > 0


def test_noise_loss_targets():
    """With a UNet that predicts 0 and pictures that are 0, the loss is the target's mean square: the noise's
    (1) for epsilon, alpha_cumprod(t) times it for v = sqrt(a)·noise − sqrt(1−a)·picture."""
    from training.demo_model.train import _alphas_cumprod, noise_loss

    class Zero(torch.nn.Module):
        def forward(self, x, t, context):
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    alphas = _alphas_cumprod()
    latents = torch.zeros(4096, 1, 4, 4)
    eps = noise_loss(Zero(), latents, None, alphas)
    v = noise_loss(Zero(), latents, None, alphas, prediction="v_prediction")
    assert abs(float(eps) - 1) < 0.02
    assert abs(float(v) - float(alphas.mean())) < 0.02


def test_variants_load_as_users_files(tmp_path):
    """The LoRA, embedding and inpainting variant, trained for a few steps from a tiny run, load through
    the normal paths: the LoRA's every key matches a module, the embedding is used, the 9-channel model inpaints."""
    from PIL import Image

    from sdstudio.core.params import Img2ImgRequest
    from training.demo_model import variants

    run_dir = tmp_path / "run"
    Run(run_dir, Config.tiny(unet_steps=1), log=lambda m: None).train()
    run = variants.load_run(run_dir)
    data = tmp_path / "data"
    run.export(data / "models" / "Stable-diffusion" / "demo.safetensors")
    variants.train_lora(run, data / "models" / "Lora" / "demo-zebra.safetensors", steps=2)
    variants.train_embedding(run, data / "embeddings" / "demo-red.safetensors", steps=2)
    variants.train_inpainting(run, data / "models" / "Stable-diffusion" / "demo-inpainting.safetensors", steps=2)
    engine = Engine(Paths(data))
    base = {"steps": 2, "width": 64, "height": 64, "seed": 3, "model": "demo"}
    plain = engine.txt2img(Txt2ImgRequest(prompt="zebra, a red circle", **base))
    styled = engine.txt2img(Txt2ImgRequest(prompt="zebra, a red circle <lora:demo-zebra:1>", **base))
    assert not [w for w in styled.warnings if "LoRA" in w or "lora" in w], styled.warnings
    assert "Lora hashes" in styled.images[0].infotext
    from sdstudio.engine.lora import LoraFile

    lora = LoraFile(data / "models" / "Lora" / "demo-zebra.safetensors",
                    load_checkpoint(data / "models" / "Stable-diffusion" / "demo.safetensors"))
    assert not lora.unmatched
    assert any(isinstance(module, torch.nn.Conv2d) for _, module, _ in lora.targets)  # the LoCon part
    with_emb = engine.txt2img(Txt2ImgRequest(prompt="a circle", negative_prompt="demo-red", **base))
    assert "TI hashes" in with_emb.images[0].infotext and "demo-red" in with_emb.images[0].infotext
    assert np.asarray(plain.images[0].image).shape == (64, 64, 3)
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(mask)
    out = engine.img2img(Img2ImgRequest(prompt="a blue square", init_images=[str(init)], mask=str(mask), mask_blur=0,
                                        steps=2, width=64, height=64, seed=3, model="demo-inpainting"))
    assert out.inpainting_model
    pixels = np.asarray(out.images[0].image)
    assert (pixels[:8, :8] == (200, 30, 30)).all()  # outside the mask: the original


def test_stage_seconds_leaves_out_pauses_and_counts_redone_steps_once(tmp_path):
    from training.demo_model.plot_log import stage_seconds

    log = tmp_path / "log.csv"
    rows = ["time,stage,step,loss",
            "100,vae,1,1.0", "102,vae,2,1.0", "104,vae,3,1.0",  # 2 s a step
            "5000,vae,3,1.0", "5003,vae,4,1.0",  # resumed after a long pause: step 3 redone, then 3 s
            "5004,text,1,1.0", "5014,text,2,1.0"]
    log.write_text("\n".join(rows) + "\n")
    # vae: step 2 (2 s) + step 4 (3 s); step 3's first time is replaced by its redo, which follows the pause
    assert stage_seconds(log) == {"vae": 5.0, "text": 11.0}


def test_bfloat16_encoding_fills_the_pool_with_float32_latents_close_to_float32_encoding(tmp_path):
    runs = {dtype: Run(tmp_path / dtype, Config.tiny(encode_dtype=dtype, fresh=1.0), log=lambda m: None)
            for dtype in ("float32", "bfloat16")}
    latents = {dtype: run._encoded_batch()[0] for dtype, run in runs.items()}  # same seed: same pictures
    pool = runs["bfloat16"].pool
    assert pool[0][0].dtype == pool[0][1].dtype == torch.float32 == latents["bfloat16"].dtype
    means = {dtype: torch.stack([e[0] for e in run.pool]) for dtype, run in runs.items()}
    assert not torch.equal(means["float32"], means["bfloat16"])  # it did encode in bfloat16
    assert torch.allclose(means["float32"], means["bfloat16"], atol=0.05 * float(means["float32"].std()) + 0.02)


def test_companions_encode_like_the_run_float32_unchanged_and_bfloat16_when_asked(tmp_path):
    """The companions' encoder follows the run's ``encode_dtype``; in float32 it draws exactly what
    ``latent_dist.sample()`` draws (the shipped companions stay reproducible)."""
    from sdstudio.eval import shapes
    from training.demo_model import variants
    from training.demo_model.train import render_batch

    scenes = [shapes.random_scene(np.random.default_rng(4)) for _ in range(3)]
    run = Run(tmp_path / "f32", Config.tiny(encode_dtype="float32"), log=lambda m: None)
    torch.manual_seed(5)
    ours, images = variants._encode(run, scenes, 32)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = run.vae.encode(render_batch(scenes, 32, shapes.STRIPE_BANDS)).latent_dist.sample() * SCALING
    assert torch.equal(ours, expected) and images.shape[-1] == 32
    fast = Run(tmp_path / "bf16", Config.tiny(encode_dtype="bfloat16"), log=lambda m: None)
    torch.manual_seed(5)
    latents, _ = variants._encode(fast, scenes, 32)
    assert latents.dtype == torch.float32 and not torch.equal(latents, expected)
    assert torch.allclose(latents, expected, atol=0.1 * float(expected.std()) + 0.05)
