"""SDXL base and refiner files in Stability's released (SGM) layout, from an independent key table.

The files come from :mod:`sdstudio.testing.sgm_layout`, written from sgm's model definitions and not from
our converter, and the reference modules are diffusers' own single-file conversion of them, configured
from that layout (not from our detection). The full-size layouts are checked by header shapes and meta
tensors; loading and generating use the reduced layout (same key scheme, small widths); a 6.9 GB
full-size file is written and loaded only under ``-m full``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdstudio.cli import main
from sdstudio.models.detect import detect
from sdstudio.models.loader import build_text_encoder, build_unet, build_vae, load_checkpoint
from sdstudio.testing.sgm_layout import (
    CLIP_L,
    OPENCLIP,
    RELEASED_KEY_COUNTS,
    UNET,
    VAE,
    VARIANTS,
    SgmLayout,
    sgm_layout,
    sgm_shapes,
    write_sgm_checkpoint,
)

EOS, BOS = 49407, 49406
IDS = [BOS, 320, 2368, 530, 518, 3326, EOS]  # "a cat on the mat" (the tokens need not be these words)
LOADABLE = [v for v in VARIANTS if v != "fp8"]  # fp8 is checked against quantized weights instead


# ---- the released files' layout (full size, shapes only) --------------------------------------------

@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_key_counts_and_size_of_the_released_files(kind):
    shapes = sgm_shapes(kind)
    counts = RELEASED_KEY_COUNTS[kind]
    assert len(shapes) == counts["total"]
    assert sum(k.startswith(UNET) for k in shapes) == counts["unet"]
    assert sum(k.startswith(VAE) for k in shapes) == counts["vae"]
    assert sum(k.startswith(OPENCLIP[kind]) for k in shapes) == counts["openclip"]
    assert sum(k.startswith(CLIP_L) for k in shapes) == counts.get("clip_l", 0)
    # fp16 payloads of the published files: 6.94 GB (base) and 6.08 GB (refiner)
    size = sum(2 * torch.Size(s).numel() for k, s in shapes.items() if not k.endswith("position_ids"))
    assert round(size / 1e9, 2) == {"base": 6.94, "refiner": 6.08}[kind]


def test_released_base_file_keys_that_loaders_stumble_on():
    shapes = sgm_shapes("base")
    g = OPENCLIP["base"]
    assert shapes[CLIP_L + "text_model.final_layer_norm.weight"] == (768,)
    assert shapes[CLIP_L + "text_model.embeddings.position_ids"] == (1, 77)
    assert shapes[g + "text_projection"] == (1280, 1280) and shapes[g + "logit_scale"] == ()
    assert shapes[g + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes[UNET + "label_emb.0.0.weight"] == (1280, 2816)
    assert shapes[UNET + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)  # upsampler after attention
    assert shapes[UNET + "output_blocks.8.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert not any(k.startswith("model_ema.") or k.endswith("attn_mask") for k in shapes)
    pruned = sgm_shapes("base", variant="pruned")
    assert set(shapes) - set(pruned) == {CLIP_L + "text_model.final_layer_norm.weight",
                                         CLIP_L + "text_model.final_layer_norm.bias",
                                         CLIP_L + "text_model.embeddings.position_ids", g + "logit_scale"}


def test_detect_full_size_base():
    spec = detect(sgm_shapes("base"))
    assert spec.family == "sdxl" and spec.describe() == "SDXL" and spec.prediction == "epsilon"
    u = spec.unet
    assert u["block_out_channels"] == [320, 640, 1280] and u["layers_per_block"] == 2
    assert u["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert u["transformer_layers_per_block"] == [1, 2, 10]  # the first unused: no attention at level 0
    assert u["attention_head_dim"] == [5, 10, 20]  # 64 channels a head (num_head_channels: 64)
    assert u["cross_attention_dim"] == 2048 and u["use_linear_projection"] is True
    assert u["projection_class_embeddings_input_dim"] == 2816 and u["addition_time_embed_dim"] == 256
    clip_l, big_g = spec.text_encoders
    assert (clip_l.prefix, clip_l.layout, clip_l.with_projection) == (CLIP_L, "clip_hf", False)
    assert clip_l.config["hidden_size"] == 768 and clip_l.config["num_hidden_layers"] == 12
    assert clip_l.hidden_layer == -2 and clip_l.final_norm is False
    assert (big_g.prefix, big_g.layout, big_g.with_projection, big_g.pad_token) == (OPENCLIP["base"], "openclip",
                                                                                     True, "!")
    assert big_g.config["hidden_size"] == 1280 and big_g.config["num_hidden_layers"] == 32
    assert big_g.config["intermediate_size"] == 5120 and big_g.config["projection_dim"] == 1280
    assert spec.vae["block_out_channels"] == [128, 256, 512, 512] and spec.vae["scaling_factor"] == 0.13025
    assert _mid_depth(spec.unet) == 10


def test_detect_full_size_refiner():
    spec = detect(sgm_shapes("refiner"))
    assert spec.family == "sdxl_refiner"
    u = spec.unet
    assert u["block_out_channels"] == [384, 768, 1536, 1536]
    assert u["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert u["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert u["cross_attention_dim"] == 1280 and u["projection_class_embeddings_input_dim"] == 2560
    (big_g,) = spec.text_encoders
    assert big_g.prefix == OPENCLIP["refiner"] and big_g.with_projection and big_g.config["hidden_size"] == 1280
    assert _mid_depth(spec.unet) == 4  # sgm: transformer_depth_middle = transformer_depth[-1] = 4


@pytest.mark.parametrize("variant", ["pruned", "ema", "linear_projection", "fp8"])
def test_variants_detect_as_the_release(variant):
    assert detect(sgm_shapes("base", variant=variant)) == detect(sgm_shapes("base"))


@pytest.mark.parametrize("kind", ["base", "refiner"])
@pytest.mark.parametrize("variant", LOADABLE)
def test_full_size_layout_builds_through_the_loader(kind, variant):
    """Every full-size tensor goes where the modules want it (meta tensors: shapes, no memory)."""
    with torch.device("meta"):
        source = {k: torch.empty(s, dtype=torch.float16) for k, s in sgm_shapes(kind, variant=variant).items()}
    spec = detect({k: tuple(v.shape) for k, v in source.items()})
    build_unet(spec, source, torch.float16)
    build_vae(spec.vae, spec.vae_levels, source, VAE, torch.float16)
    warnings: list[str] = []
    for te in spec.text_encoders:
        build_text_encoder(te, source, torch.float16, warnings)
    assert warnings == []  # what the variants leave out, SDXL never reads


def _mid_depth(unet_config: dict) -> int:
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
    return len(unet.mid_block.attentions[0].transformer_blocks)


# ---- the reference: diffusers' single-file conversion, configured from the layout ---------------------

def diffusers_config_folder(layout: SgmLayout, folder: Path) -> Path:
    """What diffusers' from_single_file(config=...) needs, translated from sgm's parameters directly."""
    u, ch = layout.unet, layout.unet.channels
    configs = {
        "unet": {
            "_class_name": "UNet2DConditionModel", "in_channels": u.in_channels, "out_channels": u.out_channels,
            "block_out_channels": ch, "layers_per_block": u.num_res_blocks,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels)],
            "transformer_layers_per_block": list(u.transformer_depth),  # diffusers' middle block takes the last
            "attention_head_dim": [max(1, c // u.num_head_channels) for c in ch],  # diffusers' name for heads
            "cross_attention_dim": u.context_dim, "use_linear_projection": True, "sample_size": 128,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": u.adm_in_channels,
        },
        "vae": {
            "_class_name": "AutoencoderKL", "block_out_channels": layout.vae.channels,
            "layers_per_block": layout.vae.num_res_blocks, "latent_channels": layout.vae.z_channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(layout.vae.ch_mult),
            "up_block_types": ["UpDecoderBlock2D"] * len(layout.vae.ch_mult), "scaling_factor": 0.13025,
        },
    }
    g = layout.openclip
    te2 = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_size": g.width,
           "intermediate_size": g.mlp, "num_hidden_layers": g.layers, "num_attention_heads": g.heads,
           "hidden_act": "gelu", "vocab_size": g.vocab, "max_position_embeddings": g.positions,
           "projection_dim": g.proj, "pad_token_id": 0, "bos_token_id": BOS, "eos_token_id": EOS}
    if layout.clip_l is not None:
        t = layout.clip_l
        configs["text_encoder"] = {
            "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": t.width,
            "intermediate_size": t.mlp, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "hidden_act": "quick_gelu", "vocab_size": t.vocab, "max_position_embeddings": t.positions,
            "projection_dim": t.width, "pad_token_id": EOS, "bos_token_id": BOS, "eos_token_id": EOS}
        configs["text_encoder_2"] = te2
    else:
        configs["text_encoder"] = te2
    for name, config in configs.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    return folder


def diffusers_reference(path: Path, layout: SgmLayout, folder: Path) -> dict[str, torch.nn.Module]:
    config = str(diffusers_config_folder(layout, folder))
    kw = {"config": config, "local_files_only": True, "torch_dtype": torch.float32}
    ref = {"unet": UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kw),
           "vae": AutoencoderKL.from_single_file(str(path), subfolder="vae", **kw)}
    sd = load_file(str(path))
    names = ["text_encoder", "text_encoder_2"] if layout.clip_l else ["text_encoder"]
    classes = [CLIPTextModel, CLIPTextModelWithProjection] if layout.clip_l else [CLIPTextModelWithProjection]
    for name, cls in zip(names, classes):
        ref[name] = create_diffusers_clip_model_from_ldm(cls, sd, subfolder=name, **kw)
    return ref


def _ids(pad: int) -> torch.Tensor:
    return torch.tensor([IDS + [pad] * (77 - len(IDS))])


def outputs(unet, vae, encoders, layout: SgmLayout) -> dict[str, torch.Tensor]:
    """Each component on the same fixed inputs: what SDXL reads of each."""
    g = torch.Generator().manual_seed(0)
    out = {}
    with torch.no_grad():
        hidden = []
        pads = [EOS, 0] if layout.clip_l else [0]
        for i, (enc, pad) in enumerate(zip(encoders, pads)):
            o = enc(_ids(pad), output_hidden_states=True)
            out[f"te{i}.penultimate"] = o.hidden_states[-2]
            hidden.append(o.hidden_states[-2])
        out["pooled"] = o.text_embeds
        size = [64.0, 64.0, 0.0, 0.0] + ([64.0, 64.0] if layout.clip_l else [6.0])
        out["unet"] = unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]),
                           encoder_hidden_states=torch.randn(1, 77, layout.unet.context_dim, generator=g),
                           added_cond_kwargs={"text_embeds": torch.randn(1, layout.openclip.proj, generator=g),
                                              "time_ids": torch.tensor([size])}).sample
        out["vae.decode"] = vae.decode(torch.randn(1, 4, 8, 8, generator=g)).sample
    return out


def assert_close(ours: dict, theirs: dict, atol: float = 1e-5):
    worst = {k: (ours[k] - theirs[k]).abs().max().item() for k in theirs}
    assert all(v <= atol for v in worst.values()), worst
    assert all(theirs[k].abs().max() > 0 for k in theirs)  # nothing trivially zero


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sgm")
    made: dict[tuple[str, str], Path] = {}

    def get(kind: str, variant: str = "release") -> Path:
        if (kind, variant) not in made:
            made[kind, variant] = write_sgm_checkpoint(root / f"sdxl-{kind}-{variant}.safetensors", kind,
                                                       variant=variant, seed=3)
        return made[kind, variant]

    return get


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """diffusers' modules and outputs for the release layout of each kind (seed 3, reduced)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            layout = sgm_layout(kind, reduced=True)
            ref = diffusers_reference(files(kind), layout, tmp_path_factory.mktemp(f"config-{kind}"))
            encoders = [ref["text_encoder"], ref["text_encoder_2"]] if layout.clip_l else [ref["text_encoder"]]
            cache[kind] = ref, outputs(ref["unet"], ref["vae"], encoders, layout)
        return cache[kind]

    return get


@pytest.mark.parametrize("variant", LOADABLE)
def test_reduced_base_loads_like_diffusers(variant, files, reference):
    model = load_checkpoint(files("base", variant))
    assert model.spec.family == "sdxl" and model.warnings == []
    layout = sgm_layout("base", reduced=True)
    ours = outputs(model.unet, model.vae, model.text_encoders, layout)
    assert_close(ours, reference("base")[1])


def test_reduced_refiner_loads_like_diffusers(files, reference):
    model = load_checkpoint(files("refiner"))
    assert model.spec.family == "sdxl_refiner" and model.warnings == []
    ours = outputs(model.unet, model.vae, model.text_encoders, sgm_layout("refiner", reduced=True))
    assert_close(ours, reference("refiner")[1])


@pytest.mark.parametrize("variant, key", [("release", "text_projection"), ("linear_projection", "text_projection.weight")])
def test_pooled_output_is_the_projection_of_the_file(variant, key, files):
    """OpenCLIP's ``text_projection`` [width, proj] multiplies as x @ P; a Linear's ``.weight`` [proj, width]
    as x @ W.T. Checked with the file's own tensor, on the final-norm EOS state of the loaded encoder."""
    path = files("base", variant)
    with safe_open(str(path), "pt") as f:
        stored = f.get_tensor(OPENCLIP["base"] + key).float()
    projection = stored if key == "text_projection" else stored.T  # [width, proj] either way
    assert projection.shape == (128, 96)  # the reduced bigG: not square, so a transposition cannot hide
    encoder = load_checkpoint(path).text_encoders[1]
    with torch.no_grad():
        o = encoder(_ids(0))
    x = o.last_hidden_state[0, IDS.index(EOS)]
    assert torch.allclose(o.text_embeds[0], x @ projection, atol=1e-5)


def test_fp8_unet_is_upcast_and_equals_the_quantized_fp16_weights(files, reference):
    """The fp8 file holds the fp16 release's UNet matrices rounded to float8_e4m3fn (what fp8 savers do);
    loaded, they are float32 and exactly the same rounding done here, so outputs agree to float32 noise.
    The rounding itself is held to e4m3's own bound: 3 mantissa bits, so |q(w) - w| <= 2^-4 |w| for normal
    numbers (|w| >= 2^-6) and <= 2^-10 below, where the grid is absolute (2^-9 apart). Small weights
    therefore lose much, and this random UNet's output moves by ~30%: only "it moved" is asserted there."""
    path = files("base", "fp8")
    with safe_open(str(path), "pt") as f:
        assert f.get_slice(UNET + "input_blocks.0.0.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice(UNET + "input_blocks.0.0.bias").get_dtype() == "F16"
    model = load_checkpoint(path)
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32}
    ref_modules, ref_out = reference("base")
    quantized = UNet2DConditionModel.from_config(ref_modules["unet"].config).eval()
    quantized.load_state_dict({k: v.to(torch.float8_e4m3fn).float() if v.ndim >= 2 else v
                               for k, v in ref_modules["unet"].state_dict().items()})
    layout = sgm_layout("base", reduced=True)
    ours = outputs(model.unet, model.vae, model.text_encoders, layout)
    want = outputs(quantized, ref_modules["vae"], [ref_modules["text_encoder"], ref_modules["text_encoder_2"]], layout)
    assert_close(ours, want)
    for name, w in ref_modules["unet"].state_dict().items():
        if w.ndim >= 2:
            err = (model.unet.state_dict()[name] - w).abs()
            assert (err <= torch.maximum(w.abs() / 16, torch.full_like(w, 2**-10))).all(), name
    assert (ours["unet"] - ref_out["unet"]).norm() > 1e-3 * ref_out["unet"].norm()  # the file is quantized


def test_ema_copies_are_not_what_is_loaded(files):
    path = files("base", "ema")
    with safe_open(str(path), "pt") as f:
        ema = f.get_tensor("model_ema.diffusion_modelinput_blocks00weight").float()
        own = f.get_tensor(UNET + "input_blocks.0.0.weight").float()
    assert not torch.equal(ema, own)
    assert torch.equal(load_checkpoint(path).unet.conv_in.weight, own)


# ---- what a new user runs -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["release", "no_final_layer_norm"])
def test_cli_txt2img_on_a_released_layout_sdxl_file(variant, files, tmp_path, capsys):
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    shutil.copyfile(files("base", variant), folder / "my-sdxl.safetensors")
    code = main(["txt2img", "a cat", "--model", "my-sdxl", "--steps", "2", "--width", "64", "--height", "64",
                 "--seed", "5", "--outdir", str(tmp_path / "out"), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "error" not in err.lower()
    (image,) = (tmp_path / "out").glob("*.png")
    assert Image.open(image).size == (64, 64)


# ---- full size ----------------------------------------------------------------------------------------

@pytest.mark.full
def test_full_size_base_file_loads(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    if free < 16e9:
        pytest.skip(f"needs 16 GB free in {tmp_path} for the 6.9 GB file, has {free / 1e9:.1f} GB")
    path = write_sgm_checkpoint(tmp_path / "sd_xl_base_1.0-layout.safetensors", "base", reduced=False, seed=1)
    assert round(path.stat().st_size / 1e9, 2) == 6.94
    model = load_checkpoint(path, torch.float16)
    assert model.spec.family == "sdxl" and model.warnings == []
    with safe_open(str(path), "pt") as f:
        proj = f.get_tensor(OPENCLIP["base"] + "text_projection")
        qkv = f.get_tensor(OPENCLIP["base"] + "transformer.resblocks.31.attn.in_proj_weight")
        label = f.get_tensor(UNET + "label_emb.0.0.weight")
    big_g = model.text_encoders[1]
    assert torch.equal(big_g.text_projection.weight, proj.T)
    assert torch.equal(big_g.text_model.encoder.layers[31].self_attn.k_proj.weight, qkv[1280:2560])
    assert torch.equal(model.unet.add_embedding.linear_1.weight, label)


def test_depth_scale_keeps_widths_and_scales_depths():
    spec = detect(sgm_shapes("base", depth_scale=0.5))
    assert spec.unet["block_out_channels"] == [320, 640, 1280]
    assert spec.unet["transformer_layers_per_block"] == [1, 1, 5]
    assert [t.config["num_hidden_layers"] for t in spec.text_encoders] == [6, 16]
