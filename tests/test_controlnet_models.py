"""ControlNet / T2I-Adapter model files: detection from shapes, key conversion, safe strict loading, the
registry's listing and the extension's lookup rules."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
from safetensors.torch import save_file

from sdstudio.core.paths import Paths
from sdstudio.models import controlnet as cn
from sdstudio.models.controlnet import (
    ControlModelCache,
    controlnet_hf_to_ldm,
    controlnet_key_hf_to_ldm,
    controlnet_ldm_to_hf,
    detect_control,
    load_control_model,
    t2i_adapter_hf_to_tencentarc,
)
from sdstudio.models.errors import ModelFileError, ModelNotFoundError
from sdstudio.models.files import legacy_model_hash
from sdstudio.models.registry import ModelRegistry
from sdstudio.models.safe_load import open_state_dict
from sdstudio.testing.controlnet_files import (
    CONTROLNET_LAYOUTS,
    controlnet_for,
    write_control_lora,
    write_controlnet,
    write_difference_controlnet,
    write_t2i_adapter,
)
from sdstudio.testing.hostile import SystemCall
from sdstudio.testing.synthetic import unet_config, write_checkpoint

torch.set_num_threads(1)


def _unet(family: str, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(family, "tiny"))


def _residuals(module: ControlNetModel, family: str, seed: int = 1) -> list[torch.Tensor]:
    """The down and mid residuals for fixed inputs (what the UNet receives from the ControlNet)."""
    g = torch.Generator().manual_seed(seed)
    cfg = module.config
    sample = torch.randn(2, 4, 16, 16, generator=g)
    hint = torch.rand(2, cfg.conditioning_channels, 128, 128, generator=g)
    kwargs = {}
    if family == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g) * 100}
    context = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)  # last: its width may differ where unused
    dtype = next(module.parameters()).dtype
    with torch.no_grad():
        down, mid = module(sample.to(dtype), torch.tensor([10, 500]), context.to(dtype), hint.to(dtype),
                           return_dict=False, **kwargs)
    return [t.float() for t in (*down, mid)]


def _assert_same_outputs(a: ControlNetModel, b: ControlNetModel, family: str, tol: float = 1e-5) -> None:
    ra, rb = _residuals(a, family), _residuals(b, family)
    assert len(ra) == len(rb)
    assert any(x.abs().max() > 1e-3 for x in ra), "the test ControlNet has no effect"
    worst = max((x - y).abs().max().item() for x, y in zip(ra, rb))
    assert worst < tol, worst


def _path(tmp_path, family, layout, suffix=".safetensors"):
    return tmp_path / (f"{family}_{layout}" + ("" if layout == "diffusers_folder" else suffix))


# ---- round trips: every layout loads into a module with identical outputs ---------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("layout", CONTROLNET_LAYOUTS)
def test_layout_round_trip(tmp_path, family, layout):
    path = _path(tmp_path, family, layout)
    original = write_controlnet(path, family, "tiny", layout, seed=3)
    loaded = load_control_model(path)
    assert loaded.spec.kind == "controlnet" and loaded.spec.base == family
    assert loaded.spec.layout == ("diffusers" if layout.startswith("diffusers") else "ldm")
    assert loaded.spec.prefix == ("control_model." if layout in ("ldm_prefixed", "full_sd") else "")
    assert isinstance(loaded.module, ControlNetModel) and not loaded.module.training
    assert loaded.name == path.name if layout == "diffusers_folder" else path.stem
    _assert_same_outputs(original, loaded.module, family)


@pytest.mark.parametrize("layout,suffix", [("ldm", ".pth"), ("full_sd", ".ckpt"), ("diffusers_file", ".bin"),
                                           ("diffusers_folder", ".bin")])
def test_pickled_files_load_through_safe_loading(tmp_path, layout, suffix):
    path = tmp_path / f"sd1_{layout}{suffix}"
    original = write_controlnet(path, "sd1", "tiny", layout)
    target = path.with_suffix("") if layout == "diffusers_folder" else path
    if layout == "diffusers_folder":
        assert (target / "diffusion_pytorch_model.bin").is_file()
    _assert_same_outputs(original, load_control_model(target).module, "sd1")


def test_fp16_pruned_file(tmp_path):
    path = tmp_path / "control_v11p_sd15_canny_fp16.safetensors"
    original = write_controlnet(path, "sd1", "tiny", "ldm", fp16=True)
    assert {open_state_dict(path)[k].dtype for k in open_state_dict(path)} == {torch.float16}
    loaded = load_control_model(path)  # fp32 module from fp16 tensors: exactly the rounded weights
    ref = {k: v.half().float() for k, v in original.state_dict().items()}
    got = loaded.module.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    half = load_control_model(path, torch.float16)
    assert {p.dtype for p in half.module.parameters()} == {torch.float16}


def test_controlnet_from_our_tiny_checkpoint_unet_fits(tmp_path):
    """The engine tests pair write_checkpoint's UNet with write_controlnet's ControlNet: the residuals fit the
    UNet and change its output."""
    from sdstudio.models.loader import load_checkpoint

    ckpt = load_checkpoint(write_checkpoint(tmp_path / "m.safetensors", "sd1", "tiny", seed=7))
    path = tmp_path / "cn.safetensors"
    write_controlnet(path, "sd1", "tiny", "ldm", unet=ckpt.unet)
    loaded = load_control_model(path).module
    assert torch.equal(loaded.conv_in.weight, ckpt.unet.conv_in.weight)  # the copied encoder
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 64, generator=g)
    with torch.no_grad():
        down, mid = loaded(sample, 5, ctx, torch.rand(1, 3, 64, 64, generator=g), return_dict=False)
        plain = ckpt.unet(sample, 5, ctx).sample
        controlled = ckpt.unet(sample, 5, ctx, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid).sample
    assert (controlled - plain).abs().max() > 1e-3


def test_difference_controlnet_needs_and_uses_the_unet(tmp_path):
    unet = _unet("sd1")
    path = tmp_path / "control_sd15_canny_diff.safetensors"
    original = write_difference_controlnet(path, unet)
    assert detect_control(open_state_dict(path).shapes).difference
    with pytest.raises(ModelFileError, match=r"control_sd15_canny_diff\.safetensors: .*base model's UNet"):
        load_control_model(path)
    assert cn.detect_control_file(path).needs_unet
    write_controlnet(tmp_path / "folder", "sd1", "tiny", "diffusers_folder")
    assert not cn.detect_control_file(tmp_path / "folder").needs_unet
    (tmp_path / "junk.safetensors").write_bytes(b"12")
    with pytest.raises(ModelFileError, match=r"^junk\.safetensors: "):
        cn.detect_control_file(tmp_path / "junk.safetensors")
    _assert_same_outputs(original, load_control_model(path, unet=unet).module, "sd1")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_control_lora(tmp_path, family):
    unet = _unet(family)
    path = tmp_path / f"control-lora-canny-rank2-{family}.safetensors"
    original = write_control_lora(path, unet)
    spec = detect_control(open_state_dict(path).shapes)
    assert (spec.kind, spec.base, spec.needs_unet) == ("control_lora", family, True)
    with pytest.raises(ModelFileError, match="base model's UNet"):
        load_control_model(path)
    _assert_same_outputs(original, load_control_model(path, unet=unet).module, family)


def test_global_pool_from_config_or_the_extensions_name_rule(tmp_path):
    plain = write_controlnet(tmp_path / "control_v11e_sd15_shuffle.safetensors", "sd1", "tiny", "ldm")
    assert load_control_model(tmp_path / "control_v11e_sd15_shuffle.safetensors").module.config.global_pool_conditions
    assert not load_control_model(tmp_path / "control_v11e_sd15_shuffle.safetensors",
                                  global_pool=False).module.config.global_pool_conditions
    plain.register_to_config(global_pool_conditions=True)
    write_controlnet(tmp_path / "folder", "sd1", "tiny", "diffusers_folder", controlnet=plain)
    assert load_control_model(tmp_path / "folder").module.config.global_pool_conditions
    write_controlnet(tmp_path / "canny.safetensors", "sd1", "tiny", "ldm", controlnet=plain)
    assert not load_control_model(tmp_path / "canny.safetensors").module.config.global_pool_conditions


# ---- T2I-Adapters -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["tencentarc", "diffusers_file", "diffusers_folder"])
def test_t2i_adapter_round_trip(tmp_path, family, layout):
    path = tmp_path / (f"t2iadapter_{layout}" + ("" if layout == "diffusers_folder" else ".pth"))
    original = write_t2i_adapter(path, family, "tiny", layout, seed=2)
    loaded = load_control_model(path)
    assert (loaded.spec.kind, loaded.spec.base) == ("t2i_adapter", family)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        a, b = original(x), loaded.module(x)
    assert len(a) == len(b) == 4
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a, b))


@pytest.mark.parametrize("layout", ["tencentarc", "diffusers_file"])
def test_t2i_light_adapter(tmp_path, layout):
    """t2iadapter_color_sd14v1's layout (the extension's Adapter_light: body.N.in_conv / body.N.body.M / out_conv)."""
    from diffusers import T2IAdapter

    torch.manual_seed(0)
    original = T2IAdapter(in_channels=3, channels=[32, 64, 64], num_res_blocks=4, adapter_type="light_adapter").eval()
    path = tmp_path / "t2iadapter_color_sd14v1.pth"
    write_t2i_adapter(path, layout=layout, adapter=original)
    if layout == "tencentarc":
        assert "body.3.out_conv.weight" in open_state_dict(path).shapes
    loaded = load_control_model(path)
    assert loaded.spec.config["adapter_type"] == "light_adapter"
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(original(x), loaded.module(x)))


def test_t2i_sketch_adapter_single_channel(tmp_path):
    """t2iadapter_sketch/canny_sd14v1 take one channel: conv_in sees 1 x 8 x 8 = 64 inputs."""
    path = tmp_path / "t2iadapter_sketch_sd14v1.pth"
    write_t2i_adapter(path, "sd1", "tiny", "tencentarc", in_channels=1)
    shapes = open_state_dict(path).shapes
    assert shapes["conv_in.weight"][1] == 64
    assert detect_control(shapes).config["in_channels"] == 1


def test_t2i_tencentarc_names():
    """TencentARC numbers resnet blocks across levels (body.N, N = level * 2 + block; in_conv on a level's
    first block), the extension's reading of diffusers' adapter.body.L.resnets.B."""
    state = {"adapter.conv_in.weight": torch.zeros(1), "adapter.body.0.resnets.0.block1.weight": torch.zeros(1),
             "adapter.body.0.resnets.1.block2.bias": torch.zeros(1), "adapter.body.2.in_conv.weight": torch.zeros(1),
             "adapter.body.3.resnets.1.block1.weight": torch.zeros(1)}
    assert set(t2i_adapter_hf_to_tencentarc(state)) == {
        "conv_in.weight", "body.0.block1.weight", "body.1.block2.bias", "body.4.in_conv.weight", "body.7.block1.weight"}


# ---- key conversion pinned to published names -------------------------------------------------------

def _full_controlnet_state(family: str) -> dict[str, torch.Tensor]:
    """A full-size ControlNet's state dict on the meta device (shapes only; no memory)."""
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config(family, "full"))
        return ControlNetModel.from_unet(unet, load_weights_from_unet=False).state_dict()


def test_names_match_diffusers_published_table():
    """diffusers' own table of the lllyasviel ControlNet's top-level names."""
    table = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["layers"]
    for hf, ldm in table.items():
        assert controlnet_key_hf_to_ldm(hf, 2, 6) == ldm, hf
    assert controlnet_key_hf_to_ldm("controlnet_cond_embedding.blocks.5.weight", 2, 6) == "input_hint_block.12.weight"
    assert controlnet_key_hf_to_ldm("controlnet_down_blocks.11.bias", 2, 6) == "zero_convs.11.0.bias"
    assert controlnet_key_hf_to_ldm("controlnet_mid_block.weight", 2, 6) == "middle_block_out.0.weight"
    assert (controlnet_key_hf_to_ldm("down_blocks.1.attentions.0.proj_in.weight", 2, 6)
            == "input_blocks.4.1.proj_in.weight")
    assert controlnet_key_hf_to_ldm("down_blocks.2.downsamplers.0.conv.weight", 2, 6) == "input_blocks.9.0.op.weight"


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_conversion_matches_diffusers_converter(family):
    """Our lllyasviel -> diffusers conversion against diffusers' own single-file converter, tensor by tensor,
    on a random tiny ControlNet (the mapping is checked by values, so two swapped names fail)."""
    original = controlnet_for(_unet(family))
    ldm = controlnet_hf_to_ldm(original.state_dict())
    ours = controlnet_ldm_to_hf(ldm)
    theirs = convert_controlnet_checkpoint(dict(ldm), {"layers_per_block": 2})
    theirs = {k: v for k, v in theirs.items() if v is not None}
    assert set(ours) == set(theirs) == set(original.state_dict())
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_published_sd15_controlnet_key_set():
    """The full-size SD1.5 ControlNet in lllyasviel names: 12 zero convs, hint convs at 0..14, input blocks
    1..11, middle block 0..2 -- the control_v11 file's key families."""
    ldm = controlnet_hf_to_ldm(_full_controlnet_state("sd1"))
    assert {int(m[1]) for k in ldm if (m := re.match(r"zero_convs\.(\d+)\.0\.weight", k))} == set(range(12))
    assert {int(m[1]) for k in ldm if (m := re.match(r"input_hint_block\.(\d+)\.weight", k))} == set(range(0, 15, 2))
    assert {int(m[1]) for k in ldm if (m := re.match(r"input_blocks\.(\d+)\.", k))} == set(range(12))
    assert ldm["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert ldm["input_hint_block.14.weight"].shape == (320, 256, 3, 3)


# ---- detection from shapes --------------------------------------------------------------------------

@pytest.mark.parametrize("family,context,heads,depth", [
    ("sd1", 768, 8, 1),
    ("sd2", 1024, [5, 10, 20, 20], 1),
    ("sdxl", 2048, [5, 10, 20], [1, 2, 10]),
])
def test_detect_full_size(family, context, heads, depth):
    hf = _full_controlnet_state(family)
    shapes = {k: tuple(v.shape) for k, v in controlnet_hf_to_ldm(hf).items()}
    for layout, sh in (("ldm", shapes), ("ldm", {"control_model." + k: v for k, v in shapes.items()}),
                       ("diffusers", {k: tuple(v.shape) for k, v in hf.items()})):
        spec = detect_control(sh)
        assert (spec.kind, spec.base, spec.layout) == ("controlnet", family, layout)
        c = spec.config
        assert c["cross_attention_dim"] == context and c["attention_head_dim"] == heads
        assert c["transformer_layers_per_block"] == depth
        assert c["use_linear_projection"] == (family != "sd1")
        assert c["conditioning_channels"] == 3 and c["conditioning_embedding_out_channels"] == [16, 32, 96, 256]
        assert c["block_out_channels"] == unet_config(family, "full")["block_out_channels"]
        assert c["global_pool_conditions"] is False
        if family == "sdxl":
            assert c["projection_class_embeddings_input_dim"] == 2816 and c["addition_embed_type"] == "text_time"
            assert c["down_block_types"][0] == "DownBlock2D"
        else:
            assert "addition_embed_type" not in c


@pytest.mark.parametrize("depths", [[1, 0, 0], [1, 1, 0], [1, 2, 2]])
@pytest.mark.parametrize("layout", ["ldm", "diffusers_file"])
def test_sdxl_mid_and_small_variants(tmp_path, depths, layout):
    """SDXL ControlNets with fewer transformer blocks per level (the extension's sdxl "mid" and "small"
    configurations: depth 0 keeps a transformer's projections without blocks)."""
    config = {k: v for k, v in unet_config("sdxl", "tiny").items() if k != "up_block_types"}
    torch.manual_seed(0)
    original = ControlNetModel(**config | {"transformer_layers_per_block": depths})
    original = controlnet_for(_unet("sdxl")) if depths == [1, 2, 2] else original
    with torch.no_grad():
        for conv in [*original.controlnet_down_blocks, original.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    path = tmp_path / "cn.safetensors"
    write_controlnet(path, layout=layout, controlnet=original)
    loaded = load_control_model(path)
    assert loaded.spec.config["transformer_layers_per_block"] == depths
    _assert_same_outputs(original.eval(), loaded.module, "sdxl")


def test_detect_reads_hint_channels_and_widths():
    hf = _full_controlnet_state("sd1")
    shapes = {k: tuple(v.shape) for k, v in controlnet_hf_to_ldm(hf).items()}
    shapes["input_hint_block.0.weight"] = (16, 1, 3, 3)  # a one-channel hint (some community models)
    assert detect_control(shapes).config["conditioning_channels"] == 1


def test_full_sd_file_takes_only_the_control_part(tmp_path):
    path = tmp_path / "control_sd15_canny.pth"
    write_controlnet(path, "sd1", "tiny", "full_sd")
    shapes = open_state_dict(path).shapes
    assert any(k.startswith("model.diffusion_model.") for k in shapes)
    assert any(k.startswith("cond_stage_model.") for k in shapes)
    spec = detect_control(shapes)
    assert spec.prefix == "control_model." and spec.layout == "ldm"


def test_detect_never_reads_the_file_name(tmp_path):
    a, b = tmp_path / "control_v11p_sd15_canny.safetensors", tmp_path / "t2iadapter_x_sd14v1.safetensors"
    write_controlnet(a, "sdxl", "tiny", "ldm")
    write_controlnet(b, "sdxl", "tiny", "ldm")
    assert load_control_model(a).spec == load_control_model(b).spec


def test_ignored_tensors_are_tolerated(tmp_path):
    """Markers and bookkeeping tensors (the optional-key table's "ignored" side) do not break loading."""
    path = tmp_path / "extra.safetensors"
    original = controlnet_for(_unet("sd1"))
    state = controlnet_hf_to_ldm(original.state_dict())
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file({"control_model." + k: v.contiguous() for k, v in state.items()} | {"logvar": torch.zeros(1000)},
              str(path))
    _assert_same_outputs(original, load_control_model(path).module, "sd1")
    assert cn.TOLERATED["controlnet"]["ignored"]


# ---- bad files: one line naming the file ------------------------------------------------------------

def _one_line_error(path, match: str) -> str:
    with pytest.raises(ModelFileError) as info:
        load_control_model(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message, message
    assert re.search(match, message), message
    return message


def test_missing_used_tensor_is_named(tmp_path):
    path = tmp_path / "control_v11p_sd15_broken.safetensors"
    write_controlnet(path, "sd1", "tiny", "ldm_prefixed",
                     drop=("control_model.zero_convs.3.0.weight", "control_model.input_blocks.4.1.proj_in.bias"))
    message = _one_line_error(path, r"missing 2 tensor")
    assert "control_model.zero_convs.3.0.weight" in message and "control_model.input_blocks.4.1.proj_in.bias" in message


def test_missing_tensor_named_in_diffusers_names(tmp_path):
    path = tmp_path / "cn_folder"
    write_controlnet(path, "sd1", "tiny", "diffusers_folder", drop=("controlnet_mid_block.bias",))
    _one_line_error(path, r"missing 1 tensor.*controlnet_mid_block\.bias")


def test_truncated_file(tmp_path):
    path = tmp_path / "control_v11p_sd15_canny.safetensors"
    write_controlnet(path, "sd1", "tiny", "ldm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(path, "truncated")
    pth = tmp_path / "control_v11p_sd15_canny.pth"
    write_controlnet(pth, "sd1", "tiny", "ldm")
    pth.write_bytes(pth.read_bytes()[:5000])
    _one_line_error(pth, "corrupt or truncated")


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "control_sd15_evil.pth"
    state = controlnet_hf_to_ldm(controlnet_for(_unet("sd1")).state_dict())
    torch.save({**state, "payload": SystemCall(marker)}, path)
    _one_line_error(path, "refused to load")
    assert not marker.exists()
    folder = tmp_path / "evil_folder"
    write_controlnet(folder, "sd1", "tiny", "diffusers_folder")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"payload": SystemCall(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFileError, match="refused to load"):
        load_control_model(folder)
    assert not marker.exists()


def test_shapes_that_do_not_fit(tmp_path):
    path = tmp_path / "control_v11p_sd15_misfit.safetensors"
    state = controlnet_hf_to_ldm(controlnet_for(_unet("sd1")).state_dict())
    state["zero_convs.5.0.weight"] = torch.zeros(64, 32, 1, 1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    _one_line_error(path, r"zero_convs\.5\.0\.weight has shape \(64, 32, 1, 1\).*needs \(64, 64, 1, 1\)")


def test_unknown_tensor_is_named(tmp_path):
    path = tmp_path / "control_extra.safetensors"
    state = controlnet_hf_to_ldm(controlnet_for(_unet("sd1")).state_dict())
    state["zero_convs.40.0.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    _one_line_error(path, r"does not have: zero_convs\.40\.0\.weight")


@pytest.mark.parametrize("what,match", [("checkpoint", "Stable Diffusion checkpoint.*models/Stable-diffusion"),
                                        ("lora", "LoRA"), ("ipadapter", "IP-Adapter"), ("junk", "not a ControlNet")])
def test_other_model_files_are_named(tmp_path, what, match):
    path = tmp_path / f"{what}.safetensors"
    if what == "checkpoint":
        write_checkpoint(path, "sd1", "tiny")
    else:
        keys = {"lora": "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                "ipadapter": "image_proj.proj.weight", "junk": "foo.weight"}
        save_file({keys[what]: torch.zeros(2, 2)}, str(path))
    _one_line_error(path, match)


def test_malformed_shapes_are_model_file_errors():
    """detect_control on shapes that look like a ControlNet but are not: always ModelFileError, never a crash."""
    good = {k: tuple(v.shape) for k, v in controlnet_hf_to_ldm(_full_controlnet_state("sd1")).items()}
    for key in ("input_blocks.0.0.weight", "input_hint_block.0.weight", "input_blocks.1.0.out_layers.3.weight",
                "input_hint_block.4.weight", "middle_block.0.in_layers.0.weight"):
        with pytest.raises(ModelFileError):  # a tensor detection needs is missing
            detect_control({k: v for k, v in good.items() if k != key})
        if not key.startswith("middle_block"):  # whose shape it reads is not a conv/linear shape
            with pytest.raises(ModelFileError):
                detect_control({**good, key: ()})
    with pytest.raises(ModelFileError):
        detect_control({"conv_in.weight": (4,), "body.0.block1.weight": (4, 4, 3, 3)})


def test_empty_and_missing(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    _one_line_error(path, "no tensors")
    with pytest.raises(ModelFileError, match="no such file"):
        load_control_model(tmp_path / "absent.safetensors")
    (tmp_path / "bad_folder").mkdir()
    (tmp_path / "bad_folder" / "config.json").write_text("{not json")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "bad_folder" / "diffusion_pytorch_model.safetensors"))
    _one_line_error(tmp_path / "bad_folder", "config.json")


# ---- cache ------------------------------------------------------------------------------------------

def test_cache_reuses_and_evicts(tmp_path):
    paths = [tmp_path / f"cn{i}.safetensors" for i in range(3)]
    for i, p in enumerate(paths):
        write_controlnet(p, "sd1", "tiny", "ldm", seed=i)
    cache = ControlModelCache()
    first = cache.get(paths[0])
    assert cache.get(paths[0]) is first and cache.loads == 1
    cache.get(paths[1])
    cache.get(paths[2])  # capacity 2: the least recently used (paths[0]) goes
    assert cache.loads == 3
    assert cache.get(paths[0]) is not first and cache.loads == 4
    assert cache.get(paths[0], torch.float16) is not cache.get(paths[0]) and cache.loads == 5
    os.utime(paths[0], (1, 1))  # a replaced file (new mtime) is read again
    cache.get(paths[0])
    assert cache.loads == 6


# ---- registry ---------------------------------------------------------------------------------------

@pytest.fixture
def cn_registry(tmp_path):
    paths = Paths(tmp_path / "data")
    root = paths.controlnet_dir
    write_controlnet(root / "control_v11p_sd15_canny.safetensors", "sd1", "tiny", "ldm", seed=1)
    write_controlnet(root / "control_v11p_sd15_canny_extra.pth", "sd1", "tiny", "ldm", seed=2)
    write_controlnet(root / "sub" / "Control_SD15_Depth.pth", "sd1", "tiny", "ldm", seed=3)
    write_controlnet(root / "diffusers_xl_canny", "sdxl", "tiny", "diffusers_folder", seed=4)
    write_t2i_adapter(root / "t2iadapter_color_sd14v1.pth", "sd1", "tiny", "tencentarc")
    for skipped in ("annotators", "annotator", "downloads"):
        write_controlnet(root / skipped / "hidden.safetensors", "sd1", "tiny", "ldm")
    write_controlnet(root / "None.safetensors", "sd1", "tiny", "ldm")
    (root / "notes.txt").write_text("not a model")
    return ModelRegistry(paths)


def test_registry_lists_like_the_extension(cn_registry):
    names = [m.name for m in cn_registry.controlnets]
    # by file name as Python sorts it (the extension's "name" order), "None" never listed, annotators skipped
    assert names == ["Control_SD15_Depth", "control_v11p_sd15_canny", "control_v11p_sd15_canny_extra",
                     "diffusers_xl_canny", "t2iadapter_color_sd14v1"]
    titles = cn_registry.controlnet_titles()
    assert all(re.fullmatch(r".+ \[[0-9a-f]{8}\]", t) for t in titles)
    for m, title in zip(cn_registry.controlnets, titles):
        weights = m.path / "diffusion_pytorch_model.safetensors" if m.path.is_dir() else m.path
        with open(weights, "rb") as f:  # the legacy A1111 hash, computed here independently
            f.seek(0x100000)
            expected = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        assert title == f"{m.name} [{expected}]" == f"{m.name} [{legacy_model_hash(weights)}]"
    assert len({t.split(" [")[1] for t in titles}) == len(titles)  # the files differ beyond 1 MiB


def test_registry_lookup_rules(cn_registry):
    canny = next(m for m in cn_registry.controlnets if m.name == "control_v11p_sd15_canny")
    assert cn_registry.controlnet(canny.title) is canny  # 1. the exact title
    assert cn_registry.controlnet("CONTROL_v11p_sd15_canny").path == canny.path  # 2. the name, any case
    assert cn_registry.controlnet("control_v11p_sd15_canny [0badc0de]").path == canny.path  # other hash
    assert cn_registry.controlnet("control_sd15_depth").name == "Control_SD15_Depth"
    # 3. the shortest name containing the query
    assert cn_registry.controlnet("sd15_canny").name == "control_v11p_sd15_canny"
    assert cn_registry.controlnet("canny_ext").name == "control_v11p_sd15_canny_extra"
    assert cn_registry.controlnet("xl_canny").name == "diffusers_xl_canny"
    for nothing in ("None", "", None):
        with pytest.raises(ModelNotFoundError, match="no ControlNet model chosen"):
            cn_registry.controlnet(nothing)
    with pytest.raises(ModelNotFoundError) as info:
        cn_registry.controlnet("openpose")
    assert "control_v11p_sd15_canny" in str(info.value) and str(cn_registry.paths.controlnet_dir) in str(info.value)


def test_registry_entries_load(cn_registry):
    for m in cn_registry.controlnets:
        loaded = load_control_model(m.path)
        assert loaded.name == m.name
    assert cn_registry.controlnet("diffusers_xl_canny").is_folder


def test_registry_refresh(cn_registry):
    write_controlnet(cn_registry.paths.controlnet_dir / "aaa.safetensors", "sd1", "tiny", "ldm")
    assert "aaa" not in [m.name for m in cn_registry.controlnets]
    cn_registry.refresh()
    assert [m.name for m in cn_registry.controlnets][1] == "aaa"  # after "Control_..." as Python sorts
    assert cn_registry.checkpoints == []  # the rest still refreshes


def test_empty_registry(tmp_path):
    reg = ModelRegistry(Paths(tmp_path / "fresh"))
    assert reg.controlnets == [] and reg.controlnet_titles() == []
    with pytest.raises(ModelNotFoundError, match=r"available: \(none\); put ControlNet models in .*ControlNet"):
        reg.controlnet("canny")


def test_nan_and_integer_weights_are_named(tmp_path):
    """As for checkpoints: weights that cannot make a picture are refused naming the file and the tensor."""
    from safetensors.torch import load_file

    good = tmp_path / "control_v11p_sd15_good.safetensors"
    write_controlnet(good, "sd1", "tiny", "ldm_prefixed")
    key = "control_model.input_hint_block.0.weight"
    for name, change, problem in (("nan", lambda t: t.fill_(float("nan")), "NaN or infinite"),
                                  ("int", lambda t: t.to(torch.int32), "int32 data")):
        state = load_file(str(good))
        state[key] = change(state[key])
        path = tmp_path / f"control_v11p_sd15_{name}.safetensors"
        save_file(state, str(path))
        _one_line_error(path, rf"{re.escape(key)} holds {problem}")
