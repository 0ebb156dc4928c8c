"""The LoRA trainer: it learns (the loss falls), its file is kohya's (keys, metadata, hashes), loads in our
loader and in diffusers with the same deltas, resumes bit-identically, and leaves the base model as it was."""

from __future__ import annotations

import json

import numpy as np
import peft  # noqa: F401 - diffusers' load_lora_weights needs it; a missing one must fail here
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from train_fixtures import fixed_loss, squares

from sdstudio.engine import lora as lora_ops
from sdstudio.models.diffusers_layout import write_config_folder
from sdstudio.models.loader import load_checkpoint
from sdstudio.training import TrainingDataset, TrainingError, train_lora
from sdstudio.training.lora import _snr_weight, safetensors_hashes

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 synthetic 64² pictures (a coloured square on a background) with captions, 2 repeats."""
    root = tmp_path_factory.mktemp("lora-data")
    squares(root / "2_sks shape", [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 230, 30)],
            [f"sks shape, {c}" for c in ("red", "green", "blue", "yellow")])
    return root


def _dataset(root, **kw):
    return TrainingDataset.from_folder(root, resolution=64, min_bucket_reso=64, max_bucket_reso=128, **kw)


@pytest.fixture(scope="module")
def sd1(tiny_dir):
    return load_checkpoint(tiny_dir / "tiny-sd1.safetensors")


def test_training_reduces_the_loss_and_writes_a_kohya_file(sd1, data, tmp_path):
    ds = _dataset(data)
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    result = train_lora(sd1, ds, max_train_steps=30, batch_size=4, learning_rate=1e-2, network_dim=4,
                        network_alpha=2, seed=1, output_dir=tmp_path, output_name="shape")
    assert result.path == tmp_path / "shape.safetensors" and not result.interrupted and result.steps == 30
    # the base model is left as it was: weights and forwards
    assert all(torch.equal(before[k], v) for k, v in sd1.unet.state_dict().items())
    assert not any("forward" in vars(m) for m in sd1.unet.modules())
    loss0, loss1 = fixed_loss(sd1, ds, 4), fixed_loss(sd1, ds, 4, result.path)
    assert loss1 < 0.9 * loss0, (loss0, loss1)

    state = load_file(str(result.path))
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert any(n.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") for n in names)
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for n in names)
    for n in names:
        assert {f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha"} <= set(state)
        assert state[f"{n}.lora_down.weight"].shape[0] == 4 and float(state[f"{n}.alpha"]) == 2.0
    # no 3x3 convs without LoCon; kohya's UNet targets live in the transformer blocks only
    assert not any("resnets" in n for n in names)
    lf = lora_ops.LoraFile(result.path, sd1)
    assert lf.unmatched == [] and len(lf.targets) == len(names)

    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    for key in ("ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_tag_frequency", "ss_output_name",
                "ss_base_model_version", "ss_training_started_at", "ss_training_finished_at", "ss_steps",
                "ss_epoch", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_num_train_images",
                "ss_resolution", "ss_seed", "ss_lr_scheduler", "ss_noise_offset", "ss_min_snr_gamma",
                "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "sshs_model_hash", "sshs_legacy_hash"):
        assert key in meta, key
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2" and meta["ss_steps"] == "30"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "shape" and meta["ss_num_train_images"] == "8" and meta["ss_epoch"] == "15"
    assert json.loads(meta["ss_tag_frequency"]) == {"2_sks shape": {"sks shape": 4, "red": 1, "green": 1, "blue": 1,
                                                                    "yellow": 1}}
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_sd_model_name"] == "tiny-sd1.safetensors"
    # kohya's hashes: sha256 of the tensor data (what A1111 / addnet index by), and of the file's bytes 1 MiB on
    model_hash, legacy = safetensors_hashes(state, meta)
    assert meta["sshs_model_hash"] == model_hash and meta["sshs_legacy_hash"] == legacy
    raw = result.path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    import hashlib

    assert hashlib.sha256(raw[8 + n:]).hexdigest() == meta["sshs_model_hash"]
    assert (tmp_path / "shape-log.csv").read_text().count("\n") == 31


def test_saved_file_gives_diffusers_the_same_deltas(sd1, data, tiny_dir, tmp_path):
    ckpt = tiny_dir / "tiny-sd1.safetensors"
    result = train_lora(sd1, _dataset(data), max_train_steps=3, batch_size=4, learning_rate=1e-2, seed=2,
                        output_dir=tmp_path, output_name="d")
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    with lora_ops.applied(sd1, [(lora_ops.LoraFile(result.path, sd1), 1.0, 1.0)]):
        ours = {k: v - before[k] for k, v in sd1.unet.state_dict().items() if not torch.equal(v, before[k])}
    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(write_config_folder(sd1.spec, tmp_path / "c")),
                                                    local_files_only=True, torch_dtype=torch.float32)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    # diffusers 0.42 + transformers 5 cannot place kohya text-encoder keys (see test_lora_vs_diffusers): UNet only
    unet_only = {k: v for k, v in load_file(str(result.path)).items() if k.startswith("lora_unet_")}
    pipe.load_lora_weights(unet_only)
    pipe.fuse_lora(lora_scale=1.0)
    after = {k.replace("base_layer.", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    theirs = {k: after[k] - base[k] for k in base if not torch.equal(after[k], base[k])}
    assert set(ours) == set(theirs) and len(ours) > 20
    for k, delta in ours.items():
        assert torch.allclose(delta, theirs[k], atol=1e-6), k


def test_resume_after_interrupt_is_bit_identical(sd1, data, tmp_path):
    ds = _dataset(data, flip_aug=True, shuffle_caption=True)
    kw = {"max_train_steps": 6, "batch_size": 2, "learning_rate": 1e-3, "seed": 3, "lr_scheduler": "cosine",
          "noise_offset": 0.05}
    whole = train_lora(sd1, ds, output_dir=tmp_path / "a", output_name="x", **kw)
    progress = []
    stopped = train_lora(sd1, _dataset(data, flip_aug=True, shuffle_caption=True), output_dir=tmp_path / "b",
                         output_name="x", should_stop=lambda: len(progress) == 3, on_progress=progress.append, **kw)
    assert [(p.step, p.total) for p in progress] == [(1, 6), (2, 6), (3, 6)]
    assert progress[-1].eta >= 0 and progress[-1].loss == stopped.losses[-1]
    assert stopped.interrupted and stopped.steps == 3 and stopped.path is None and stopped.state_path.is_file()
    resumed = train_lora(sd1, _dataset(data, flip_aug=True, shuffle_caption=True), output_dir=tmp_path / "b",
                         output_name="x", resume=True, **kw)
    assert resumed.steps == 6 and not resumed.interrupted
    a, b = load_file(str(whole.path)), load_file(str(resumed.path))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.losses == resumed.losses


def test_locon_adds_conv_modules(sd1, data, tmp_path):
    result = train_lora(sd1, _dataset(data), max_train_steps=2, batch_size=4, conv_dim=2, conv_alpha=1,
                        train_text_encoder=False, output_dir=tmp_path, output_name="locon")
    state = load_file(str(result.path))
    conv = [k for k in state if "resnets_0_conv1.lora_down" in k]
    assert conv and state[conv[0]].shape[0] == 2 and state[conv[0]].shape[2:] == (3, 3)
    assert any("downsamplers_0_conv.lora_down" in k for k in state)
    assert not any(k.startswith("lora_te") for k in state)
    lf = lora_ops.LoraFile(result.path, sd1)
    assert lf.unmatched == []
    with safe_open(str(result.path), "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}


def test_sdxl_run_writes_two_text_encoders_and_original_unet_names(tiny_dir, tmp_path, data):
    model = load_checkpoint(tiny_dir / "tiny-sdxl.safetensors")
    result = train_lora(model, _dataset(data), max_train_steps=2, batch_size=2, output_dir=tmp_path, output_name="xl")
    keys = load_file(str(result.path)).keys()
    assert any(k.startswith("lora_te1_text_model_") for k in keys) and any(k.startswith("lora_te2_text_model_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # kohya's SDXL names: the original layout
    assert not any(k.startswith("lora_unet_down_blocks_") for k in keys)
    assert lora_ops.LoraFile(result.path, model).unmatched == []
    with safe_open(str(result.path), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    # diffusers maps kohya's original-layout SDXL names onto its UNet: the same deltas as ours
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with lora_ops.applied(model, [(lora_ops.LoraFile(result.path, model), 1.0, 1.0)]):
        ours = {k: v - before[k] for k, v in model.unet.state_dict().items() if not torch.equal(v, before[k])}
    pipe = StableDiffusionXLPipeline.from_single_file(str(tiny_dir / "tiny-sdxl.safetensors"),
                                                      config=str(write_config_folder(model.spec, tmp_path / "c")),
                                                      local_files_only=True, torch_dtype=torch.float32)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights({k: v for k, v in load_file(str(result.path)).items() if k.startswith("lora_unet_")})
    pipe.fuse_lora(lora_scale=1.0)
    after = {k.replace("base_layer.", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    theirs = {k: after[k] - base[k] for k in base if not torch.equal(after[k], base[k])}
    assert set(ours) == set(theirs) and len(ours) > 20
    assert all(torch.allclose(d, theirs[k], atol=1e-6) for k, d in ours.items())


def test_schedulers_precision_and_clear_errors(sd1, data, tmp_path):
    ds = _dataset(data)
    lrs = {}
    for name in ("constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts", "polynomial"):
        r = train_lora(sd1, ds, max_train_steps=4, batch_size=4, train_text_encoder=False, lr_scheduler=name,
                       lr_warmup_steps=1 if name == "constant_with_warmup" else 0, learning_rate=1e-3,
                       output_dir=tmp_path / name, output_name="s")
        lrs[name] = [float(line.split(",")[3]) for line in r.log_path.read_text().splitlines()[1:]]
    assert lrs["constant"] == [1e-3] * 4 and lrs["constant_with_warmup"][0] == 0 and lrs["cosine"][-1] < 1e-3
    assert lrs["linear"] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    with pytest.raises(TrainingError, match="lr_scheduler"):
        train_lora(sd1, ds, max_train_steps=1, lr_scheduler="nope", output_dir=tmp_path)
    with pytest.raises(TrainingError, match="8-bit"):
        train_lora(sd1, ds, max_train_steps=1, optimizer="AdamW8bit", output_dir=tmp_path)
    with pytest.raises(TrainingError, match="fp16"):
        train_lora(sd1, ds, max_train_steps=1, mixed_precision="fp16", output_dir=tmp_path)
    # gradient checkpointing recomputes the same forward: the same losses
    kw = {"max_train_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "seed": 4}
    plain = train_lora(sd1, ds, output_dir=tmp_path / "gc0", output_name="g", **kw)
    ckpt = train_lora(sd1, ds, output_dir=tmp_path / "gc1", output_name="g", gradient_checkpointing=True, **kw)
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)
    assert not sd1.unet.is_gradient_checkpointing  # switched off again
    if torch.cpu._is_avx512_bf16_supported():
        r = train_lora(sd1, ds, max_train_steps=2, batch_size=4, mixed_precision="bf16", min_snr_gamma=5,
                       output_dir=tmp_path / "bf16", output_name="b")
        assert all(np.isfinite(r.losses)) and r.path.is_file()


def test_min_snr_weight_formula():
    alphas = torch.tensor([0.99, 0.5, 0.01])
    t = torch.tensor([0, 1, 2])
    snr = alphas / (1 - alphas)  # 99, 1, ~0.0101
    eps = _snr_weight(alphas, t, 5.0, v=False)
    assert torch.allclose(eps, torch.stack([5 / snr[0], torch.tensor(1.0), torch.tensor(1.0)]))
    v = _snr_weight(alphas, t, 5.0, v=True)
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_samples_through_the_engine_with_the_step_file(make_data_root, data):
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine
    from sdstudio.training import engine_sampler

    root = make_data_root("train-samples")
    engine = Engine(Paths(root))
    out = engine.paths.lora_dir / "training"
    sampler = engine_sampler(engine, "tiny-sd1", ["sks shape, red"], out / "samples", steps=2, width=64, height=64)
    result = train_lora(root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors", _dataset(data),
                        max_train_steps=4, batch_size=4, sample_every_n_steps=2, save_every_n_steps=2,
                        sampler=sampler, output_dir=out, output_name="s")
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000002-0-0.png", "00000004-0-0.png"]
    assert (out / "s-step00000002.safetensors").is_file() and result.path.is_file()


def test_the_network_in_training_is_the_one_the_loader_applies(sd1, data, tmp_path):
    """The trainer's forward (original + up(down(x)) x alpha / dim) equals the saved file merged by our loader."""
    from sdstudio.training.lora import LoRANetwork

    result = train_lora(sd1, _dataset(data), max_train_steps=3, batch_size=4, learning_rate=2e-2, network_dim=4,
                        network_alpha=1, conv_dim=2, conv_alpha=4, output_dir=tmp_path, output_name="n")
    net = LoRANetwork(sd1, 4, 1, conv_dim=2, conv_alpha=4)
    net.load_state_dict(load_file(str(result.path)))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = sd1.tokenizers[0](["sks shape, red"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        def run():
            ctx = sd1.text_encoders[0](input_ids=ids).last_hidden_state
            return sd1.unet(x, torch.tensor([500]), ctx).sample
        base = run()
        net.apply_to()
        try:
            trained = run()
        finally:
            net.restore()
        with lora_ops.applied(sd1, [(lora_ops.LoraFile(result.path, sd1), 1.0, 1.0)]):
            merged = run()
    assert not torch.allclose(trained, base, atol=1e-4)
    assert torch.allclose(trained, merged, atol=1e-5), (trained - merged).abs().max()
