"""The Train tab: it builds with A1111's train element ids and sub-tabs, every text translated, and its
functions queue real jobs on the tiny SD1 checkpoint: a LoRA (progress text while it runs, then the file,
listed at once) and an embedding (created, then trained a few steps); a folder outside the data dir is refused."""

from __future__ import annotations

import json
import re
import time

import gradio as gr
import pytest
import torch
from PIL import Image
from train_fixtures import plain_colours, squares

from sdstudio.core.settings import Settings
from sdstudio.ui import localization
from sdstudio.ui.app import StudioUI
from sdstudio.ui.progress import snapshot

A1111_IDS = {"tab_train", "train_tabs", "train_new_embedding_name", "train_initialization_text", "train_nvpt",
             "train_overwrite_old_embedding", "train_create_embedding", "train_new_hypernetwork_name",
             "train_new_hypernetwork_sizes", "train_new_hypernetwork_layer_structure",
             "train_new_hypernetwork_activation_func", "train_new_hypernetwork_initialization_option",
             "train_new_hypernetwork_add_layer_norm", "train_new_hypernetwork_use_dropout",
             "train_new_hypernetwork_dropout_structure", "train_overwrite_old_hypernetwork", "train_create_hypernetwork",
             "train_embedding", "train_hypernetwork", "train_embedding_learn_rate", "train_hypernetwork_learn_rate",
             "train_batch_size", "train_gradient_step", "train_dataset_directory", "train_log_directory",
             "train_template_file", "train_training_width", "train_training_height", "train_varsize", "train_steps",
             "train_create_image_every", "train_save_embedding_every", "use_weight", "train_shuffle_tags",
             "train_tag_drop_out", "train_latent_sampling_method", "train_train_embedding", "train_interrupt_training",
             "train_train_hypernetwork", "ti_output", "train_train_lora", "train_lora_dataset"}


@pytest.fixture
def ui(service, data_dir):
    title = service.engine.registry.checkpoint(None).title
    studio_ui = StudioUI(service, Settings(data_dir / "config.json", {"sd_model_checkpoint": title}))
    studio_ui.page = studio_ui.build()
    return studio_ui


def test_the_tab_builds_with_a1111_ids_in_both_languages(ui):
    ids = {getattr(b, "elem_id", None) for b in ui.page.blocks.values()}
    assert A1111_IDS <= ids, sorted(A1111_IDS - ids)
    strings = localization.ui_strings(ui.page)
    assert {"Create embedding", "Train Hypernetwork", "Choose latent sampling method", "Train LoRA"} <= strings
    for language in ("en", "zh_CN"):
        shipped = json.loads((localization.PACKAGE_DIR / f"{language}.json").read_text(encoding="utf-8"))
        assert not sorted(strings - set(shipped)), (language, sorted(strings - set(shipped)))
    zh = json.loads((localization.PACKAGE_DIR / "zh_CN.json").read_text(encoding="utf-8"))
    assert zh["Train"] == "训练" and zh["Create embedding"] == "创建嵌入式模型"


def test_a_lora_job_runs_from_the_tab(ui, data_dir):
    """A long run shows "Step i of N, loss ..." as it goes; Interrupt stops it with the state saved; Resume carries
    on to the file, which is in the LoRA list at once."""
    tab = ui.train
    squares(data_dir / "set", [(30, 200, 60), (30, 180, 90)], "a green block")
    args = {"dataset": "set", "model": ui.settings.get("sd_model_checkpoint"), "name": "green", "dim": 2, "alpha": 1,
                "steps": 100000, "lr": 1e-3, "resolution": 64, "batch": 2, "scheduler": "constant", "flip": True, "shuffle": False,
                "resume": False}
    run = tab.run_train_lora("ui:test", *args.values())
    live, *_ = next(run)  # the progress area the page's script polls, with a line for the step and loss
    job_id = re.search(r'class="sd-live" data-job="([^"]+)"', live).group(1)
    assert 'class="sd-live-info' in live
    while not (state := snapshot(ui.service, job_id))["done"]:  # what /sdstudio/progress/JOB answers
        text = state["info"]
        if text.startswith("Step ") and " of 100000, loss " in text and "ETA" in text:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no step shown")
    tab.stop("ui:test")
    *_, (_, text, extra) = run
    state = data_dir / "models" / "Lora" / "green-state.pt"
    assert text.startswith("Stopped at step ") and text.endswith(f"of 100000; state saved to {state}"), text
    reached = int(text.split()[3])
    assert reached >= 1 and state.is_file()
    *_, (_, text, extra) = tab.run_train_lora("ui:test", *{**args, "steps": reached + 2, "resume": True}.values())
    path = data_dir / "models" / "Lora" / "green.safetensors"
    assert text.startswith(f"LoRA saved: {path} ({reached + 2} steps") and extra == "" and path.is_file()
    assert "green" in {m.name for m in ui.service.engine.registry.loras}
    with pytest.raises(gr.Error, match="outside"):
        next(tab.run_train_lora("ui:test", *{**args, "dataset": "/tmp"}.values()))
    with pytest.raises(gr.Error, match="lr_scheduler"):
        next(tab.run_train_lora("ui:test", *{**args, "scheduler": "bogus"}.values()))


def test_an_embedding_is_created_and_trained_from_the_tab(ui, data_dir):
    tab = ui.train
    plain_colours(data_dir / "pics", ["0.png", "1.png"], "a green block")
    *_, (_, text, outcome) = tab.run_create_embedding("ui:test", "tab-emb", "cat", 2, False)
    path = data_dir / "embeddings" / "tab-emb.pt"
    assert text == f"Created: {path}" and outcome == "" and path.is_file()
    assert "tab-emb" in tab.embedding_names()
    values = {"embedding_name": "tab-emb", "hypernetwork_name": None, "emb_lr": "0.005", "hn_lr": "0.00001",
                  "clip_grad_mode": "disabled", "clip_grad_value": "0.1", "batch_size": 1, "gradient_step": 1, "data_root": "pics",
                  "log_directory": "textual_inversion", "template": "style_filewords.txt", "width": 64, "height": 64,
                  "varsize": False, "steps": 3, "image_every": 0, "save_every": 0, "use_weight": False, "save_with_embedding": False,
                  "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling": "once"}
    *_, (_, text, outcome) = tab.run_train("ui:test", "embedding", *values.values())
    assert text == f"Training finished: {path}" and outcome == ""
    assert torch.load(path, weights_only=True)["step"] == 3
    with pytest.raises(gr.Error, match="log_directory"):
        next(tab.run_train("ui:test", "embedding", *{**values, "log_directory": "/tmp/x"}.values()))
    output, outcome, dropdown = tab.run_create_hypernetwork("tab-hn", ["768", "320"], "1, 2, 1", "linear", "Normal",
                                                            False, False, "", False)
    assert output == f"Created: {data_dir / 'models' / 'hypernetworks' / 'tab-hn.pt'}" and outcome == ""
    assert "tab-hn" in tab.hypernetwork_names() and dropdown.value == "tab-hn"


def test_the_caption_checkbox_captions_before_a_dreambooth_run(ui, data_dir):
    """"Caption pictures that have no caption" (with its captioner) makes the job caption them first; the
    outcome counts them."""
    from sdstudio.testing.synthetic import write_interrogators

    ids = {getattr(b, "elem_id", None) for b in ui.page.blocks.values()}
    assert {"train_lora_caption_missing", "train_lora_captioner", "train_dreambooth_caption_missing",
            "train_dreambooth_captioner"} <= ids
    write_interrogators(data_dir / "models")
    folder = squares(data_dir / "db" / "1_sks", [(220, 40, 40)])
    args = {"dataset": "db", "class_dir": "", "class_prompt": "", "num_class": 0, "prior_weight": 1.0,
            "model": ui.settings.get("sd_model_checkpoint"), "name": "captioned", "steps": 1, "lr": 1e-4,
            "resolution": 64, "batch": 1, "scheduler": "constant", "text_encoder": False, "fp16": False,
            "flip": False, "resume": False, "cache_latents": False, "caption_missing": True,
            "captioner": "DeepBooru"}
    *_, (_, text, _) = ui.train.run_train_dreambooth("ui:test", *args.values())
    assert text.startswith("Checkpoint saved: ") and text.endswith("; 1 pictures captioned"), text
    tags = ui.service.engine.interrogators.get("deepdanbooru").interrogate(Image.open(folder / "0.png").convert("RGB"))
    assert (folder / "0.caption").read_text().strip() == tags
