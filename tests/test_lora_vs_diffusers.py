"""A kohya-format LoRA with real SD1.5 / SDXL key names changes the same weights by the same amounts
in our loader as in diffusers' own ``load_lora_weights`` + ``fuse_lora``.

diffusers 0.42 cannot load kohya text-encoder keys next to transformers 5 (it guesses an old naming and
then fails to classify it), so text-encoder deltas are checked against the LoRA formula itself.
"""

from __future__ import annotations

import peft  # noqa: F401 - a test dependency: load_lora_weights needs it, and a missing one must fail here
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from sdstudio.engine import lora as lora_ops
from sdstudio.models.diffusers_layout import write_config_folder
from sdstudio.models.loader import load_checkpoint

SCALE = 0.8


def kohya_file(model, path, *, te: bool, seed=0):
    """Kohya names (lora_unet_down_blocks_..., lora_te[1|2]_text_model_...) for real module paths."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (where, module) in lora_ops._module_index(model).items():
        if not name.startswith("lora_") or any(x in name for x in ("input_blocks", "middle_block", "output_blocks")):
            continue
        if (where == "te") != te or not any(p in name for p in ("to_q", "to_k", "to_out_0", "q_proj", "proj_in",
                                                                  "ff_net_2", "out_proj")):
            continue
        w = module.weight
        sd[name + ".lora_down.weight"] = torch.randn(4, w.shape[1], *w.shape[2:], generator=g) * 0.1
        sd[name + ".lora_up.weight"] = torch.randn(w.shape[0], 4, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        sd[name + ".alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))
    return path, sd


def our_deltas(model, path, module_root):
    before = {k: v.clone() for k, v in module_root.state_dict().items()}
    with lora_ops.applied(model, [(lora_ops.LoraFile(path, model), SCALE, SCALE)]):
        after = module_root.state_dict()
        return {k: after[k] - before[k] for k in after if not torch.equal(after[k], before[k])}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_deltas_equal_diffusers_load_lora_weights(family, tiny_dir, tmp_path):
    ckpt = tiny_dir / f"tiny-{family}.safetensors"
    ours = load_checkpoint(ckpt)
    path, _ = kohya_file(ours, tmp_path / "kohya.safetensors", te=False)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(ckpt), config=str(write_config_folder(ours.spec, tmp_path / "cfg")),
                                local_files_only=True, torch_dtype=torch.float32)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=SCALE)
    after = {k.replace("base_layer.", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    theirs = {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}
    mine = our_deltas(ours, path, ours.unet)
    assert set(mine) == set(theirs) and len(mine) > 20
    for k in mine:
        assert torch.allclose(mine[k], theirs[k], atol=1e-6), k


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_encoder_deltas_follow_the_lora_formula(family, tiny_dir, tmp_path):
    ours = load_checkpoint(tiny_dir / f"tiny-{family}.safetensors")
    path, sd = kohya_file(ours, tmp_path / "kohya-te.safetensors", te=True)
    index = lora_ops._module_index(ours)
    for encoder in ours.text_encoders:
        names = {id(m): n for n, m in encoder.named_modules()}
        deltas = our_deltas(ours, path, encoder)
        expected = {}
        for key in {k.rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k}:
            _, module = index[key]
            if id(module) in names:
                up, down = sd[key + ".lora_up.weight"], sd[key + ".lora_down.weight"]
                expected[names[id(module)] + ".weight"] = (up @ down) * (2.0 / 4) * SCALE
        assert set(deltas) == set(expected) and expected
        for k, want in expected.items():
            assert torch.allclose(deltas[k], want, atol=1e-6), k
    if family == "sdxl":  # lora_te1_ and lora_te2_ reach the two different encoders
        assert any(k.startswith("lora_te1_") for k in sd) and any(k.startswith("lora_te2_") for k in sd)
