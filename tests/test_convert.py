"""Layout conversion: original <-> diffusers names round-trip exactly, for every family at full size."""

import pytest
import torch

from sdstudio.models.convert import component_to_ldm, convert_component, openclip_to_hf, unet_ldm_to_hf
from sdstudio.models.detect import detect
from sdstudio.testing.synthetic import make_checkpoint


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_round_trip_names(family):
    sd = make_checkpoint(family, "full", meta=True)
    spec = detect({k: tuple(v.shape) for k, v in sd.items()})
    unet = convert_component(sd, "model.diffusion_model.", "unet", layers_per_block=spec.layers_per_block)
    back = component_to_ldm(unet, "model.diffusion_model.", "unet", layers_per_block=spec.layers_per_block,
                            up_has_attention=list(spec.up_has_attention))
    assert set(back) == {k for k in sd if k.startswith("model.diffusion_model.")}
    vae = convert_component(sd, "first_stage_model.", "vae", levels=4)
    assert set(component_to_ldm(vae, "first_stage_model.", "vae", levels=4)) == \
        {k for k in sd if k.startswith("first_stage_model.")}


def test_tiny_round_trip_values():
    sd = make_checkpoint("sd2", "tiny")
    te = convert_component(sd, "cond_stage_model.model.", "openclip")
    back = component_to_ldm(te, "cond_stage_model.model.", "openclip")
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k


def test_known_name_pairs():
    assert unet_ldm_to_hf("input_blocks.1.1.proj_in.weight", 2) == "down_blocks.0.attentions.0.proj_in.weight"
    assert unet_ldm_to_hf("input_blocks.3.0.op.weight", 2) == "down_blocks.0.downsamplers.0.conv.weight"
    assert unet_ldm_to_hf("input_blocks.4.0.skip_connection.weight", 2) == "down_blocks.1.resnets.0.conv_shortcut.weight"
    assert unet_ldm_to_hf("middle_block.2.emb_layers.1.bias", 2) == "mid_block.resnets.1.time_emb_proj.bias"
    assert unet_ldm_to_hf("output_blocks.2.1.conv.weight", 2) == "up_blocks.0.upsamplers.0.conv.weight"
    assert unet_ldm_to_hf("output_blocks.5.2.conv.bias", 2) == "up_blocks.1.upsamplers.0.conv.bias"
    assert unet_ldm_to_hf("output_blocks.5.1.norm.bias", 2) == "up_blocks.1.attentions.2.norm.bias"
    assert openclip_to_hf("transformer.resblocks.3.attn.in_proj_weight") == [
        f"text_model.encoder.layers.3.self_attn.{p}_proj.weight" for p in "qkv"]
