"""Training moves the quality harness's output in the trained direction, on the demo model: a LoRA trained by
our LoRA trainer on rendered scenes whose objects are all green makes the reader see green objects for prompts
naming other colours, and an embedding trained by our textual-inversion trainer on yellow objects makes
``a NAME circle ...`` yellow where its untrained vectors and the bare prompt are not (the rows of
``python -m sdstudio.eval --only training``; here a few steps and a few prompts, the longer run under --full)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdstudio.engine.generate import Engine
from sdstudio.eval import training

DEMO = Path(__file__).parents[1] / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"

torch.set_num_threads(1)


def test_trained_lora_and_embedding_move_the_pictures_their_way(tmp_path):
    # DPM++ 2M at 8 steps: Euler a needs more steps than that for the colours to settle
    figures = training.measure(DEMO, tmp_path, Engine, training.QUICK, size=128, steps=8, sampler="DPM++ 2M",
                               log=lambda m: None)
    lora, emb = figures.lora, figures.embedding
    assert lora[1] >= lora[0] + 0.25, lora  # weights 0 and 1: 1 of 8 green -> 5 of 8 here
    assert emb[2] >= max(emb[0], emb[1]) + 0.25, emb  # the trained vectors, not the name: 0 / 2 / 7 of 8 here
    rows = training.rows(figures, training.QUICK)
    assert [r[1].count("%") for r in rows] == [2, 3] and "80 steps" in rows[0][2] and "40 steps" in rows[1][2]
    # the files are the trainers' usual ones: kohya's LoRA (text encoder only), A1111's embedding
    from safetensors import safe_open

    with safe_open(str(tmp_path / "Lora" / f"{training.LORA_NAME}.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"
        names = f.keys()  # a safe_open handle is not iterable
    assert names and all(k.startswith("lora_te_") for k in names)
    saved = torch.load(tmp_path / "embeddings" / f"{training.EMBEDDING_NAME}.pt", weights_only=True)
    assert saved["step"] == training.QUICK.embedding_steps and saved["string_to_param"]["*"].shape == (2, 96)


@pytest.mark.full
def test_the_harness_run_moves_the_pictures_further(tmp_path):
    figures = training.measure(DEMO, tmp_path, Engine, training.FULL, size=128, steps=20, log=lambda m: None)
    lora, emb = figures.lora, figures.embedding
    assert lora[1] > lora[0] and lora[2] >= lora[0] + 0.4, lora
    assert emb[2] >= max(emb[0], emb[1]) + 0.5, emb
