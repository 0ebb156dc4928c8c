"""The demo ControlNet's training code (training/demo_controlnet) on a tiny random-weight base checkpoint:
a run saves and resumes to the same state, the loss falls on a fixed batch, the targets and the IoU measure
are what they say."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sdstudio.eval import shapes
from sdstudio.models.loader import load_checkpoint
from sdstudio.testing.synthetic import write_checkpoint
from training.demo_controlnet.train import (
    Config,
    Run,
    canny_map,
    hint_tensor,
    object_mask,
    render_scenes,
    scene_mask,
    shape_iou,
    unit_variance_init,
)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("base") / "tiny.safetensors")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(folder: Path, base_file: Path, **kw) -> Run:
    return Run(folder, Config.tiny(str(base_file), **kw), log=lambda *_: None)


# ---- measuring ----------------------------------------------------------------------------------

def test_shape_iou_on_hand_made_masks():
    a = np.zeros((4, 4), bool)
    a[:, :2] = True  # left half, 8 pixels
    assert shape_iou(a, a) == 1.0
    assert shape_iou(a, ~a) == 0.0
    b = np.zeros((4, 4), bool)
    b[:2, :] = True  # top half: 4 pixels shared, 12 in the union
    assert shape_iou(a, b) == pytest.approx(4 / 12)
    c = np.zeros((4, 4), bool)
    c[:, 1:3] = True  # one column shared (4 pixels), 12 in the union
    assert shape_iou(a, c) == pytest.approx(4 / 12)
    assert shape_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # nothing expected, nothing found
    with pytest.raises(ValueError, match="differ in shape"):
        shape_iou(a, np.zeros((3, 3), bool))


def test_scene_mask_is_the_objects_area():
    size = 64
    square = shapes.Scene("blue", (shapes.Thing("yellow", "square", "medium", "center"),))
    mask = scene_mask(square, size)
    side = shapes.SIZES["medium"] * 0.85 * size  # a square's half-side is 0.85 of its radius
    assert mask.sum() == pytest.approx(side * side, rel=0.08)
    ys, xs = np.nonzero(mask)
    assert ys.mean() == pytest.approx(size / 2 - 0.5, abs=0.6) and xs.mean() == pytest.approx(size / 2 - 0.5, abs=0.6)
    # stripes and colours do not change it
    striped = replace(square, background="orange", stripes=True)
    assert shape_iou(mask, scene_mask(striped, size)) == 1.0


def test_object_mask_finds_rendered_objects_against_any_background():
    rng = np.random.default_rng(3)
    for _ in range(12):
        scene = shapes.random_scene(rng, max_things=3)
        picture = np.asarray(shapes.render(scene, 128))
        assert shape_iou(scene_mask(scene, 128), object_mask(picture)) > 0.9, scene
    flat = np.full((32, 32, 3), 120, np.uint8)
    assert not object_mask(flat).any()
    with pytest.raises(ValueError, match="H×W×3"):
        object_mask(np.zeros((8, 8)))


def test_canny_map_sees_edges_between_colours_of_like_grey():
    """Red and green are 25 grey levels apart: a grayscale Canny at 100/200 misses their edge, the RGB one
    (what the extension's preprocessor runs) sees it."""
    picture = np.zeros((20, 20, 3), np.uint8)
    picture[:, :10] = shapes.COLOURS["green"]
    picture[:, 10:] = shapes.COLOURS["red"]
    edges = canny_map(picture)
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 255}
    assert (edges[:, 9:11] == 255).any(axis=1).all() and not edges[:, :8].any()
    with pytest.raises(ValueError, match="uint8"):
        canny_map(picture.astype(np.float32))


def test_hints_are_three_channel_zero_one():
    _, edges = render_scenes([shapes.random_scene(np.random.default_rng(0), max_things=2)], 64)
    h = hint_tensor(edges)
    assert h.shape == (1, 3, 64, 64) and h.dtype == torch.float32
    assert set(h.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(h[:, 0], h[:, 2]) and torch.equal(h, hint_tensor(edges > 0))
    assert h[0, 0].sum() == (edges[0] == 255).sum()


# ---- training -----------------------------------------------------------------------------------

def test_two_steps_save_and_resume_to_the_same_state(tmp_path, base_file):
    folder = tmp_path / "run"
    run = _run(folder, base_file, fresh=1.0)
    run.train()
    assert run.step == 2 and (folder / "state.pt").is_file()
    assert len((folder / "log.csv").read_text().splitlines()) == 3  # header + 2 steps
    resumed = _run(folder, base_file, fresh=1.0)
    assert resumed.step == 2
    for (k, a), b in zip(run.controlnet.state_dict().items(), resumed.controlnet.state_dict().values()):
        assert torch.equal(a, b), k
    assert run.rng.bit_generator.state == resumed.rng.bit_generator.state
    # one more step from each gives the same loss and the same weights: nothing of the run was lost
    saved = torch.get_rng_state()  # what the resumed run restored: both draw the same noise from here
    loss_a = run.train_step(1.0)
    torch.set_rng_state(saved)
    loss_b = resumed.train_step(1.0)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(run.controlnet.parameters(), resumed.controlnet.parameters()):
        torch.testing.assert_close(a, b)
    # a longer run goes on from step 2
    resumed.train(steps=3)
    assert resumed.step == 3 and len((folder / "log.csv").read_text().splitlines()) == 4


def test_only_the_controlnet_learns_and_starts_as_a_no_op(tmp_path, base_file):
    run = _run(tmp_path / "run", base_file)
    frozen = {k: v.clone() for k, v in run.base.unet.state_dict().items()}
    latents, hints, captions = run.batch()
    context = run.context(captions)
    t = torch.tensor([10, 900])
    x = torch.randn_like(latents)
    with torch.no_grad():  # zero convolutions: the controlled UNet is the UNet at step 0
        torch.testing.assert_close(run.predict(x, t, context, hints), run.predict(x, t, context, None))
    run.train()
    assert all(torch.equal(v, frozen[k]) for k, v in run.base.unet.state_dict().items())
    assert not any(p.requires_grad for p in run.base.unet.parameters())
    assert any(p.abs().sum() > 0 for n, p in run.controlnet.named_parameters() if "controlnet_down_blocks" in n)


def test_loss_falls_on_a_fixed_batch(tmp_path, base_file):
    run = _run(tmp_path / "run", base_file, batch=4)
    latents, hints, captions = run.batch()
    context = run.context(captions)
    g = torch.Generator().manual_seed(1)
    t, noise = torch.randint(0, 1000, (4,), generator=g), torch.randn(latents.shape, generator=g)
    opt = torch.optim.Adam(run.controlnet.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = run.loss(latents, hints, context, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_target_is_the_base_models(tmp_path, base_file, prediction):
    """Noise for an epsilon model, v = sqrt(a)·noise − sqrt(1−a)·picture for a v model."""
    base = load_checkpoint(base_file)
    base.spec = replace(base.spec, prediction=prediction)
    run = Run(tmp_path / "run", Config.tiny(str(base_file)), log=lambda *_: None, base=base)
    latents, hints, captions = run.batch()
    context = run.context(captions)
    t, noise = torch.tensor([50, 800]), torch.randn_like(latents)
    a = run.alphas[t].view(-1, 1, 1, 1)
    x = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(run.predict(x, t, context, hints), target)
        assert run.loss(latents, hints, context, t, noise).item() == pytest.approx(expected.item(), rel=1e-5)


def test_generate_and_sanity_check_run(tmp_path, base_file):
    run = _run(tmp_path / "run", base_file)
    with torch.no_grad():  # give the zero convolutions some weight, so that the ControlNet acts
        for block in [*run.controlnet.controlnet_down_blocks, run.controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.05)
    _, edges = render_scenes([shapes.random_scene(np.random.default_rng(1))], 64)
    plain = run.generate(None, [""], steps=3)
    assert plain.shape == (1, 64, 64, 3) and plain.dtype == np.uint8
    assert np.array_equal(run.generate(edges, [""], weight=0.0, steps=3), plain)
    assert not np.array_equal(run.generate(edges, [""], weight=1.0, steps=3), plain)
    figures = run.sanity_check(n=2, steps=2)
    assert set(figures) == {"none", "weight 0", "weight 0.5", "weight 1"}
    assert figures["none"] == figures["weight 0"] and all(0 <= v <= 1 for v in figures.values())


def test_export_is_lllyasviels_layout_and_loads_back(tmp_path, base_file):
    from safetensors import safe_open

    run = _run(tmp_path / "run", base_file)
    run.train()
    path = run.export(tmp_path / "out" / "demo-canny.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    roots = {k.split(".")[0] for k in keys}
    assert roots == {"input_blocks", "zero_convs", "input_hint_block", "middle_block", "middle_block_out", "time_embed"}
    assert len(keys) == len(run.controlnet.state_dict())
    assert meta["sdstudio.demo.steps"] == "2" and "canny 100/200" == meta["sdstudio.demo.control"]
    assert run.check_export(path) < 1e-5


def test_cubic_timesteps_lean_to_high_noise(tmp_path, base_file):
    """t = (1 − u³)·1000: mean 1000·(1 − 1/4) = 750, median 1000·(1 − 1/8) = 875; uniform: 499.5."""
    run = _run(tmp_path / "run", base_file)
    torch.manual_seed(0)
    t = run.timesteps(40000).float()
    assert t.min() >= 0 and t.max() <= 999
    assert t.mean().item() == pytest.approx(749.5, abs=5) and t.median().item() == pytest.approx(875, abs=6)
    run.cfg = replace(run.cfg, timesteps="uniform")
    assert run.timesteps(40000).float().mean().item() == pytest.approx(499.5, abs=6)
    run.cfg = replace(run.cfg, timesteps="lognormal")
    with pytest.raises(ValueError, match="timesteps"):
        run.timesteps(2)


def test_hint_encoder_starts_sensitive_to_the_edge_map(tmp_path, base_file):
    """Built as diffusers does, the hint encoder's output ignores the edge map; after unit_variance_init
    its last layer has the asked spread on real edge maps and the edge map moves it by as much."""
    zero = _run(tmp_path / "a", base_file, hint_init="zero").controlnet.controlnet_cond_embedding
    assert not zero.conv_out.weight.any()
    run = _run(tmp_path / "b", base_file)
    emb = run.controlnet.controlnet_cond_embedding
    rng = np.random.default_rng(2)
    hints = hint_tensor(render_scenes([shapes.random_scene(rng, max_things=3) for _ in range(6)], 64)[1])
    unit_variance_init(emb, hints, 0.5)
    with torch.no_grad():
        out, blank = emb(hints), emb(torch.zeros_like(hints))
        assert out.std().item() == pytest.approx(0.5, rel=1e-3)
        assert (out - blank).abs().mean() > 0.1
        assert emb.conv_in(hints).std().item() == pytest.approx(1.0, rel=1e-3)
    # the zero convolutions still keep the ControlNet a no-op at step 0
    assert not any(b.weight.any() for b in run.controlnet.controlnet_down_blocks)
    # an unknown init is named
    with pytest.raises(ValueError, match="hint_init"):
        _run(tmp_path / "c", base_file, hint_init="gaussian")
