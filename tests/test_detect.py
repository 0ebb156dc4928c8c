"""Architecture detection from keys and shapes, on the real full-size layouts (shape-only tensors)."""

import pytest

from sdstudio.models.detect import detect, detect_vae
from sdstudio.models.errors import ModelFileError
from sdstudio.testing.synthetic import make_checkpoint


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def full():
    return {f: shapes(make_checkpoint(f, "full", meta=True)) for f in ("sd1", "sd2", "sdxl")}


def test_sd1_full(full):
    spec = detect(full["sd1"])
    assert spec.family == "sd1" and spec.describe() == "SD 1.x"
    assert spec.unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert spec.unet["cross_attention_dim"] == 768 and spec.unet["attention_head_dim"] == 8
    assert spec.unet["use_linear_projection"] is False
    assert spec.text_encoders[0].config["num_hidden_layers"] == 12
    assert spec.vae["block_out_channels"] == [128, 256, 512, 512] and spec.vae["scaling_factor"] == 0.18215
    # a real SD 1.5 file has this many keys in these components (EMA and buffers aside)
    assert sum(k.startswith("model.diffusion_model.") for k in full["sd1"]) == 686


def test_sd2_full(full):
    spec = detect(full["sd2"])
    assert spec.family == "sd2" and spec.prediction == "epsilon"
    assert spec.unet["cross_attention_dim"] == 1024 and spec.unet["use_linear_projection"] is True
    assert spec.unet["attention_head_dim"] == [5, 10, 20, 20]
    te = spec.text_encoders[0]
    assert te.layout == "openclip" and te.config["num_hidden_layers"] == 24 and te.pad_token == "!"
    assert detect(full["sd2"], v_prediction=True).describe() == "SD 2.x (v-prediction)"
    assert detect({**full["sd2"], "v_pred": ()}).prediction == "v_prediction"


def test_sdxl_full(full):
    spec = detect(full["sdxl"])
    assert spec.family == "sdxl" and spec.is_sdxl
    assert spec.unet["block_out_channels"] == [320, 640, 1280]
    assert spec.unet["transformer_layers_per_block"] == [1, 2, 10]
    assert spec.unet["projection_class_embeddings_input_dim"] == 2816
    assert spec.unet["cross_attention_dim"] == 2048
    assert [t.config["hidden_size"] for t in spec.text_encoders] == [768, 1280]
    assert spec.vae["scaling_factor"] == 0.13025


def test_inpainting_and_ema_detected_by_shape():
    sd = shapes(make_checkpoint("sd1", "full", meta=True, inpainting=True, ema=True))
    spec = detect(sd)
    assert spec.inpainting and spec.describe() == "SD 1.x (inpainting)"


def test_file_name_does_not_matter_only_keys():
    tiny = shapes(make_checkpoint("sd2", "tiny", meta=True))
    assert detect(tiny).family == "sd2"
    assert detect(tiny).unet["block_out_channels"] == [64, 64, 128, 128]


def test_old_sd1_layout_without_text_model_level():
    sd = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
          for k, v in shapes(make_checkpoint("sd1", "tiny", meta=True)).items()}
    assert detect(sd).text_encoders[0].config["num_hidden_layers"] == 4


@pytest.mark.parametrize("keys, needle", [
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "stand-alone VAE"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "LoRA"),
    ({"foo": (1,)}, "not a Stable Diffusion checkpoint"),
])
def test_wrong_kind_of_file_is_named(keys, needle):
    with pytest.raises(ModelFileError, match=needle):
        detect(keys)


def test_truncated_unet_is_refused():
    sd = shapes(make_checkpoint("sd1", "tiny", meta=True))
    del sd["model.diffusion_model.out.2.weight"]
    with pytest.raises(ModelFileError, match="out.2.weight"):
        detect(sd)


def test_standalone_vae():
    sd = shapes(make_checkpoint("sd1", "full", meta=True))
    vae = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    prefix, config, levels = detect_vae(vae)
    assert prefix == "" and levels == 4 and config["latent_channels"] == 4
