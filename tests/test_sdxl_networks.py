"""Full-size SDXL networks, cheaply: a kohya SDXL LoRA written from Stability's released key names (the
independent table in sdstudio.testing.sgm_layout, not our converter) matches every module of a full-size
SDXL built on the meta device, and SDXL embeddings (clip_l / clip_g) fit its two encoders."""

from __future__ import annotations

import re

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdstudio.engine import lora as lora_ops
from sdstudio.models.detect import detect
from sdstudio.models.embeddings import EmbeddingLibrary
from sdstudio.models.loader import LoadedModel
from sdstudio.testing.sgm_layout import UNET, sgm_shapes

# kohya's default SDXL LoRA targets: the Transformer2D blocks' linears (attn1/attn2 q k v out, ff, proj in/out)
_UNET_TARGET = re.compile(r"(.*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
                          r"|.*\.1\.(proj_in|proj_out))\.weight$")


def full_sdxl_on_meta() -> LoadedModel:
    shapes = sgm_shapes("base")
    spec = detect(shapes)
    with init_empty_weights():
        unet = UNet2DConditionModel(**spec.unet)
        encoders = [cls(CLIPTextConfig(**te.config)) for te, cls in
                    zip(spec.text_encoders, (CLIPTextModel, CLIPTextModelWithProjection))]
    return LoadedModel(None, spec, unet, None, encoders, [], torch.float32)


def kohya_sdxl_lora(path):
    """Rank-1 entries under the names sd-scripts writes for SDXL: LDM names for the UNet, lora_te1/te2."""
    state = {}
    for key, shape in sgm_shapes("base").items():
        if key.startswith(UNET) and _UNET_TARGET.match(key):
            name = "lora_unet_" + key[len(UNET):].removesuffix(".weight").replace(".", "_")
            state[name + ".lora_down.weight"] = torch.full((1, shape[1]), 0.01)
            state[name + ".lora_up.weight"] = torch.full((shape[0], 1), 0.01)
            state[name + ".alpha"] = torch.tensor(1.0)
    for te, width, layers in (("lora_te1_", 768, 12), ("lora_te2_", 1280, 32)):
        for i in range(layers):
            for proj, (out, inp) in {"self_attn_q_proj": (width, width), "self_attn_k_proj": (width, width),
                                     "self_attn_v_proj": (width, width), "self_attn_out_proj": (width, width),
                                     "mlp_fc1": (4 * width, width), "mlp_fc2": (width, 4 * width)}.items():
                name = f"{te}text_model_encoder_layers_{i}_{proj}"
                state[name + ".lora_down.weight"] = torch.full((1, inp), 0.01)
                state[name + ".lora_up.weight"] = torch.full((out, 1), 0.01)
    save_file(state, str(path))
    return path


def test_a_full_size_kohya_sdxl_lora_fits_every_module(tmp_path):
    model = full_sdxl_on_meta()
    lora = lora_ops.LoraFile(kohya_sdxl_lora(tmp_path / "sdxl-lora.safetensors"), model)
    assert lora.unmatched == []
    kinds = [kind for kind, _, _ in lora.targets]
    # 70 transformer blocks x 10 linears + 11 Transformer2D x (proj_in, proj_out); CLIP-L 12 x 6, bigG 32 x 6
    assert kinds.count("unet") == 722 and kinds.count("te") == 72 + 192
    for _, module, parts in lora.targets:
        assert tuple(module.weight.shape[:2]) == (parts["lora_up.weight"].shape[0], parts["lora_down.weight"].shape[1])


def test_sdxl_embeddings_fit_both_encoders(tmp_path):
    (tmp_path / "emb").mkdir()
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "emb" / "xl-style.safetensors"))
    save_file({"emb_params": torch.randn(2, 768)}, str(tmp_path / "emb" / "sd15-style.safetensors"))
    widths = [te.config["hidden_size"] for te in full_sdxl_on_meta().spec.text_encoders]
    assert widths == [768, 1280]
    usable = EmbeddingLibrary(tmp_path / "emb").usable(widths, {})
    assert "xl-style" in usable and "sd15-style" not in usable
    vectors = usable["xl-style"]
    assert vectors.for_width(768).shape == (2, 768) and vectors.for_width(1280).shape == (2, 1280)
