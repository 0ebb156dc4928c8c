"""IP-Adapter units (sdstudio.models.ip_adapter, sdstudio.engine.ip_adapter) with tiny random files in the
published layouts: detection and strict loading (flat .safetensors and nested .bin, plain / plus / full face),
the projections against diffusers' own converter and against the resampler's formula, CLIP vision files in
transformers' and OpenCLIP's layouts, the extension's CLIP preprocessing against the published mean/std, the
attention of one layer against a direct formula, the processors given back after a pass, weight 0 / outside
the window = no unit, per-block weights, stacked units, SDXL, the denoiser path and the factory's errors."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from sdstudio.core.controlnet import ControlNetError, ControlUnit, Preprocessor
from sdstudio.engine import ip_adapter as ipa
from sdstudio.engine.conditioning import Conditioning
from sdstudio.engine.controlnet import PreparedUnit
from sdstudio.engine.denoiser import CFGDenoiser, ComposedConditioning, ScheduledConditioning
from sdstudio.engine.hooks import SamplingPlan, Step, UNetCall
from sdstudio.engine.schedules import DiscreteSchedule
from sdstudio.models import ip_adapter as files
from sdstudio.models.errors import ModelFileError
from sdstudio.testing.ip_adapter_files import (
    TINY_CLIP,
    ip_adapter_state,
    tiny_clip_vision,
    write_clip_vision,
    write_ip_adapter,
)
from sdstudio.testing.synthetic import tiny_unet, unet_config

torch.set_num_threads(1)

CPU = torch.device("cpu")
SCHEDULE = DiscreteSchedule()
TOKENS = 8
PUBLISHED_MEAN = (0.48145466, 0.4578275, 0.40821073)
PUBLISHED_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return tiny_unet("sd1")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("ipa")
    cn = d / "ControlNet"
    write_ip_adapter(cn / "ip-adapter_sd15.safetensors", "plain", seed=1)
    write_ip_adapter(cn / "ip-adapter_sd15.bin", "plain", seed=1)
    write_ip_adapter(cn / "ip-adapter-plus_sd15.safetensors", "plus", seed=2)
    write_ip_adapter(cn / "ip-adapter-full-face_sd15.safetensors", "full", seed=3)
    write_ip_adapter(cn / "ip-adapter_sdxl_tiny.safetensors", "plain", config=unet_config("sdxl", "tiny"), seed=4)
    write_clip_vision(d / "clip_vision" / "clip_h.pth", "hf", seed=0)
    write_clip_vision(d / "clip_openclip" / "clip_h.safetensors", "openclip", seed=0, with_text=True)
    return d


@pytest.fixture(scope="module")
def plain(root):
    return files.load_ip_adapter(root / "ControlNet" / "ip-adapter_sd15.safetensors")


@pytest.fixture(scope="module")
def plus(root):
    return files.load_ip_adapter(root / "ControlNet" / "ip-adapter-plus_sd15.safetensors")


@pytest.fixture(scope="module")
def encoder():
    return tiny_clip_vision(0)


def _picture(h: int = 96, w: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :, 0] = np.linspace(0, 255, w)[None, :]
    img[:, :, 1] = np.linspace(255, 0, h)[:, None]
    img[: h // 2, : w // 2, 2] = 200
    return np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def _prompt(model, encoder, seed: int = 0) -> ipa.ImagePrompt:
    return ipa.image_prompt(model, encoder, _picture(seed=seed))


def _hook(model, prompt, weight=1.0, advanced=None, start=0.0, end=1.0) -> ipa.IPAdapterHook:
    return ipa.IPAdapterHook("ControlNet unit 0", model, prompt, weight, advanced, start, end, CPU, torch.float32)


def _call(rows_uncond: list[bool], width: int = 64, seed: int = 0, step: int = 0, added=None) -> UNetCall:
    g = torch.Generator().manual_seed(seed)
    rows = len(rows_uncond)
    x = torch.randn(rows, 4, 16, 16, generator=g)
    hidden = torch.randn(rows, TOKENS, width, generator=g)
    return UNetCall(x, torch.full((rows,), 500.0), hidden, [0] * rows, list(rows_uncond),
                    Step(step, 10, torch.ones(rows)), added)


def _forward(unet, call: UNetCall, extra: dict | None = None) -> torch.Tensor:
    kwargs = dict(extra or {})
    if call.added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = call.added_cond_kwargs
    with torch.no_grad():
        return unet(call.x, call.timestep, encoder_hidden_states=call.encoder_hidden_states, **kwargs).sample


def _run(unet, hooks, call: UNetCall) -> torch.Tensor:
    """One UNet call as the denoiser makes it: the plan's hooks around the pass, their inputs, the call."""
    plan = SamplingPlan(unet, SCHEDULE, "epsilon", [], [], 5.0, torch.float32, CPU, steps=10, hooks=list(hooks))
    with plan.applied():
        extra = plan.unet_inputs(call)
        return _forward(unet, call, extra)


# ---- files: detection and loading ------------------------------------------------------------------------------
def test_detects_the_published_layouts(root, plain, plus):
    full = files.load_ip_adapter(root / "ControlNet" / "ip-adapter-full-face_sd15.safetensors")
    assert (plain.spec.kind, plain.spec.tokens, plain.spec.clip_dim, plain.spec.feature) == (
        "plain", 4, TINY_CLIP["projection_dim"], "image_embeds")
    assert (plus.spec.kind, plus.spec.tokens, plus.spec.clip_dim, plus.spec.heads, plus.spec.depth) == (
        "plus", 16, TINY_CLIP["hidden_size"], 2, 4)
    assert plus.spec.feature == full.spec.feature == "penultimate"
    assert full.spec.kind == "full" and full.spec.tokens is None
    for model in (plain, plus, full):  # SD 1.x: 16 cross-attention layers, numbered 1, 3, ..., 31
        assert model.spec.layers == 16 and model.spec.cross_attention_dim == 64
    assert plain.spec.widths == tuple(layer.attn.to_k.out_features for layer in ipa.cross_attention_layers(tiny_unet()))
    shapes = {k: tuple(v.shape) for k, v in ip_adapter_state("plain").items()}
    assert files.is_ip_adapter(shapes)
    assert not files.is_ip_adapter({"input_blocks.0.0.weight": (320, 4, 3, 3)})
    assert files.ip_adapter_shapes(root / "ControlNet" / "ip-adapter_sd15.bin") == shapes
    assert files.ip_adapter_shapes(root / "clip_vision" / "clip_h.pth") is None


def _published_shapes(family: str, proj: dict) -> dict:
    """A published file's shapes at full size (no tensors): ``proj`` plus one k/v pair per layer."""
    from sdstudio.testing.ip_adapter_files import cross_attention_widths

    config = unet_config(family, "full")
    cross = config["cross_attention_dim"]
    shapes = {f"image_proj.{k}": v for k, v in proj.items()}
    for i, w in enumerate(cross_attention_widths(config)):
        shapes |= {f"ip_adapter.{2 * i + 1}.to_k_ip.weight": (w, cross), f"ip_adapter.{2 * i + 1}.to_v_ip.weight": (w, cross)}
    return shapes


def _resampler(hidden: int, clip: int, out: int, heads: int) -> dict:
    proj = {"latents": (1, 16, hidden), "proj_in.weight": (hidden, clip), "proj_in.bias": (hidden,),
            "proj_out.weight": (out, hidden), "proj_out.bias": (out,), "norm_out.weight": (out,),
            "norm_out.bias": (out,)}
    for i in range(4):
        proj |= {f"layers.{i}.0.to_q.weight": (64 * heads, hidden), f"layers.{i}.0.to_kv.weight": (128 * heads, hidden),
                 f"layers.{i}.0.to_out.weight": (hidden, 64 * heads), f"layers.{i}.1.1.weight": (4 * hidden, hidden),
                 f"layers.{i}.1.3.weight": (hidden, 4 * hidden)}
    return proj


def test_published_sizes_are_detected():
    """ip-adapter_sd15, -plus_sd15, -full-face_sd15, _sdxl and -plus_sdxl_vit-h at their real shapes."""
    sd15 = files.detect_ip_adapter(_published_shapes("sd1", {"proj.weight": (3072, 1024), "proj.bias": (3072,),
                                                             "norm.weight": (768,), "norm.bias": (768,)}))
    assert (sd15.kind, sd15.tokens, sd15.clip_dim, sd15.layers) == ("plain", 4, 1024, 16)
    assert sd15.widths == (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)
    assert ipa.encoder_for("ip-adapter-auto", "renamed", sd15) == "clip_h"
    plus15 = files.detect_ip_adapter(_published_shapes("sd1", _resampler(768, 1280, 768, 12)))
    assert (plus15.kind, plus15.tokens, plus15.clip_dim, plus15.heads, plus15.depth, plus15.hidden_dims) == (
        "plus", 16, 1280, 12, 4, 768)
    assert ipa.encoder_for("ip-adapter-auto", "renamed", plus15) == "clip_h"
    face = files.detect_ip_adapter(_published_shapes("sd1", {"proj.0.weight": (1280, 1280), "proj.0.bias": (1280,),
                                                             "proj.2.weight": (768, 1280), "proj.2.bias": (768,),
                                                             "proj.3.weight": (768,), "proj.3.bias": (768,)}))
    assert (face.kind, face.clip_dim) == ("full", 1280)
    xl = files.detect_ip_adapter(_published_shapes("sdxl", {"proj.weight": (8192, 1280), "proj.bias": (8192,),
                                                            "norm.weight": (2048,), "norm.bias": (2048,)}))
    assert (xl.kind, xl.tokens, xl.clip_dim, xl.layers, xl.describe()) == ("plain", 4, 1280, 70, "SDXL IP-Adapter")
    assert ipa.encoder_for("ip-adapter-auto", "renamed", xl) == "clip_g"
    plus_xl = files.detect_ip_adapter(_published_shapes("sdxl", _resampler(1280, 1280, 2048, 20)))
    assert (plus_xl.heads, plus_xl.hidden_dims, plus_xl.clip_dim) == (20, 1280, 1280)


def test_full_size_layer_order_and_blocks():
    """SD 1.5: 16 layers in 16 blocks; SDXL: 70 layers in the extension's 11 blocks (2, 2, 10, 10 in the
    input blocks, 10 in the middle, 10, 10, 10, 2, 2, 2 in the output blocks), the middle's last in the file."""
    from accelerate import init_empty_weights

    for family, counts in (("sd1", [1] * 16), ("sdxl", [2, 2, 10, 10, 10, 10, 10, 10, 2, 2, 2])):
        with init_empty_weights():
            big = UNet2DConditionModel(**unet_config(family, "full"))
        layers = ipa.cross_attention_layers(big)
        assert [sum(1 for la in layers if la.transformer == t) for t in range(len(counts))] == counts
        middle = [i for i, la in enumerate(layers) if la.path.startswith("mid_block.")]
        assert middle == list(range(len(layers) - len(middle), len(layers)))


def test_safetensors_and_nested_bin_hold_the_same_adapter(root):
    flat = files.read_ip_adapter(root / "ControlNet" / "ip-adapter_sd15.safetensors")
    nested = files.read_ip_adapter(root / "ControlNet" / "ip-adapter_sd15.bin")
    assert flat.keys() == nested.keys()
    assert all(torch.equal(flat[k], nested[k]) for k in flat)
    raw = torch.load(root / "ControlNet" / "ip-adapter_sd15.bin", weights_only=True)
    assert set(raw) == {"image_proj", "ip_adapter"} and "1.to_k_ip.weight" in raw["ip_adapter"]


def _write(tmp_path, state, name="x.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_bad_files_are_named_errors(tmp_path):
    good = ip_adapter_state("plain")
    cases = {
        "faceid": ({**good, "image_proj.perceiver_resampler.proj_in.weight": torch.zeros(64, 128)}, "FaceID"),
        "gap": ({k: v for k, v in good.items() if not k.startswith("ip_adapter.5.")}, "none missing"),
        "rows": ({**good, "image_proj.proj.weight": torch.zeros(100, 48)}, "whole number"),
        "extra": ({**good, "image_proj.surprise": torch.zeros(3)}, "image_proj.surprise"),
        "norm": ({**good, "image_proj.norm.weight": torch.zeros(63)}, "image_proj.norm.weight"),
        "no_v": ({k: v for k, v in good.items() if k != "ip_adapter.3.to_v_ip.weight"}, "to_v_ip"),
    }
    for name, (state, words) in cases.items():
        with pytest.raises(ModelFileError, match=words):
            files.load_ip_adapter(_write(tmp_path, state, f"{name}.safetensors"))
    with pytest.raises(ModelFileError, match="not an IP-Adapter"):
        files.load_ip_adapter(_write(tmp_path, {"zero_convs.0.0.weight": torch.zeros(1)}, "cn.safetensors"))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(_write(tmp_path, good, "whole.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="truncated"):
        files.load_ip_adapter(truncated)

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    evil = tmp_path / "evil.bin"
    torch.save({"image_proj": {"x": Evil()}}, str(evil))
    with pytest.raises(ModelFileError, match="refused"):
        files.load_ip_adapter(evil)


def _proj_state(model_path) -> dict[str, torch.Tensor]:
    raw = files.read_ip_adapter(model_path)
    return {k[len("image_proj."):]: v for k, v in raw.items() if k.startswith("image_proj.")}


@pytest.mark.parametrize("name, feature", [("ip-adapter_sd15.safetensors", (2, 48)),
                                           ("ip-adapter-plus_sd15.safetensors", (2, 257, 128)),
                                           ("ip-adapter-full-face_sd15.safetensors", (2, 257, 128))])
def test_projection_matches_diffusers_converter(root, unet, name, feature):
    path = root / "ControlNet" / name
    ours = files.load_ip_adapter(path).projection
    theirs = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(unet, _proj_state(path),
                                                                             low_cpu_mem_usage=False).eval()
    assert type(ours) is type(theirs)
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)
    x = torch.randn(*feature, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_plain_projection_is_linear_then_layernorm(plain, root):
    sd = _proj_state(root / "ControlNet" / "ip-adapter_sd15.safetensors")
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(6))
    tokens = (x @ sd["proj.weight"].t() + sd["proj.bias"]).reshape(3, 4, 64)
    expected = torch.nn.functional.layer_norm(tokens, (64,), sd["norm.weight"], sd["norm.bias"], 1e-5)
    assert torch.allclose(plain.project(x), expected, atol=1e-5)


def test_plus_projection_against_the_resampler_formula(plus, root):
    """The published resampler written out: latents attend (heads of 64, q and k each scaled by d^-1/4) over
    the projected image features and themselves; LayerNorm-GELU feed-forward; residuals; output LayerNorm."""
    sd = _proj_state(root / "ControlNet" / "ip-adapter-plus_sd15.safetensors")
    ln = torch.nn.functional.layer_norm
    feats = torch.randn(2, 257, 128, generator=torch.Generator().manual_seed(7))
    x = feats @ sd["proj_in.weight"].t() + sd["proj_in.bias"]
    lat = sd["latents"].repeat(2, 1, 1)
    heads, d = 2, 64
    for i in range(4):  # every published plus file has 4 blocks
        p = f"layers.{i}."
        xn = ln(x, (64,), sd[p + "0.norm1.weight"], sd[p + "0.norm1.bias"])
        ln_lat = ln(lat, (64,), sd[p + "0.norm2.weight"], sd[p + "0.norm2.bias"])
        q = ln_lat @ sd[p + "0.to_q.weight"].t()
        k, v = (torch.cat([xn, ln_lat], 1) @ sd[p + "0.to_kv.weight"].t()).chunk(2, dim=-1)

        def split(t):
            return t.reshape(2, -1, heads, d).transpose(1, 2)

        s = d ** -0.25
        w = torch.softmax((split(q) * s) @ (split(k) * s).transpose(-1, -2), dim=-1)
        out = (w @ split(v)).transpose(1, 2).reshape(2, -1, heads * d)
        lat = out @ sd[p + "0.to_out.weight"].t() + lat
        h = ln(lat, (64,), sd[p + "1.0.weight"], sd[p + "1.0.bias"])
        h = torch.nn.functional.gelu(h @ sd[p + "1.1.weight"].t()) @ sd[p + "1.3.weight"].t()
        lat = h + lat
    out = ln(lat @ sd["proj_out.weight"].t() + sd["proj_out.bias"], (64,), sd["norm_out.weight"], sd["norm_out.bias"])
    assert torch.allclose(plus.project(feats), out, atol=1e-4)


# ---- CLIP vision --------------------------------------------------------------------------------------------
def test_clip_files_in_both_layouts_load_the_same_encoder(root, encoder):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    want = files.clip_features(encoder, x)
    for path in (root / "clip_vision" / "clip_h.pth", root / "clip_openclip" / "clip_h.safetensors"):
        loaded = files.load_clip_vision(path)
        cfg = loaded.config
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.projection_dim, cfg.image_size,
                cfg.patch_size, cfg.intermediate_size) == (128, 3, 2, 48, 224, 14, 256)
        got = files.clip_features(loaded, x)
        assert torch.allclose(got["image_embeds"], want["image_embeds"], atol=1e-5)
        assert torch.allclose(got["penultimate"], want["penultimate"], atol=1e-5)
    assert want["penultimate"].shape == (1, 257, 128)


def test_clip_config_of_the_published_encoders():
    """ViT-H/14 and ViT-bigG/14 at their real sizes (shapes only): 16 heads, GELU; OpenAI ViT-L: quick GELU."""
    def shapes(width, layers, mlp, proj):
        s = {"vision_model.embeddings.class_embedding": (width,),
             "vision_model.embeddings.patch_embedding.weight": (width, 3, 14, 14),
             "vision_model.embeddings.position_embedding.weight": (257, width),
             "vision_model.encoder.layers.0.mlp.fc1.weight": (mlp, width), "visual_projection.weight": (proj, width)}
        s |= {f"vision_model.encoder.layers.{i}.layer_norm1.weight": (width,) for i in range(layers)}
        return s

    h = files.clip_vision_config(shapes(1280, 32, 5120, 1024))
    g = files.clip_vision_config(shapes(1664, 48, 8192, 1280))
    vitl = files.clip_vision_config(shapes(1024, 24, 4096, 768))
    assert (h.num_attention_heads, h.hidden_act, h.num_hidden_layers, h.projection_dim) == (16, "gelu", 32, 1024)
    assert (g.num_attention_heads, g.hidden_act, g.num_hidden_layers, g.projection_dim) == (16, "gelu", 48, 1280)
    assert (vitl.num_attention_heads, vitl.hidden_act) == (16, "quick_gelu")


def test_missing_clip_file_says_what_to_put_where(tmp_path, root):
    with pytest.raises(ModelFileError, match=f"put clip_h.pth in {tmp_path}"):
        files.find_clip_vision(tmp_path, "clip_h")
    with pytest.raises(ModelFileError, match=f"ViT-bigG.*put clip_g.pth in {tmp_path}"):
        files.find_clip_vision(tmp_path, "clip_g")
    assert files.find_clip_vision(root / "clip_openclip", "clip_h").name == "clip_h.safetensors"


def test_clip_preprocessing_uses_the_published_mean_and_std():
    img = _picture(224, 224)
    x = files.clip_pixels(img)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    for c in range(3):
        by_hand = (img[:, :, c].astype(np.float64) / 255.0 - PUBLISHED_MEAN[c]) / PUBLISHED_STD[c]
        assert np.abs(x[0, c].numpy() - by_hand).max() < 1e-5
    # transformers' own CLIP processor with the extension's settings gives the same at 224×224
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(crop_size=224, do_center_crop=True, do_convert_rgb=True, do_normalize=True,
                                 do_resize=True, image_mean=list(PUBLISHED_MEAN), image_std=list(PUBLISHED_STD),
                                 resample=3, size=224)
    assert torch.allclose(proc(images=img, return_tensors="pt")["pixel_values"], x, atol=1e-5)


def test_clip_preprocessing_stretches_with_area_interpolation_and_applies_the_mask():
    img = _picture(96, 160)  # not square: stretched, not cropped
    x = files.clip_pixels(img)
    stretched = cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float64) / 255.0
    by_hand = (stretched - np.asarray(PUBLISHED_MEAN)) / np.asarray(PUBLISHED_STD)
    assert np.abs(x[0].permute(1, 2, 0).numpy() - by_hand).max() < 1e-5
    mask = np.zeros((96, 160, 1), np.uint8)
    mask[:, 80:] = 255  # the right half is masked out
    masked = files.clip_pixels(np.concatenate([img, mask], axis=2))
    assert torch.equal(masked[..., :, 128:], torch.zeros_like(masked[..., :, 128:]))
    assert torch.allclose(masked[..., :, :96], x[..., :, :96])
    unmasked = files.clip_pixels(np.concatenate([img, np.zeros_like(mask)], axis=2))
    assert torch.equal(unmasked, x)


def test_negative_rows_get_the_blank_image_prompt(plain, plus, encoder):
    p = _prompt(plain, encoder)
    assert torch.allclose(p.uncond, plain.project(torch.zeros(1, TINY_CLIP["projection_dim"])))
    q = _prompt(plus, encoder)
    blank = files.clip_features(encoder, torch.zeros(1, 3, 224, 224))["penultimate"]
    assert torch.allclose(q.uncond, plus.project(blank))
    feats = files.clip_features(encoder, files.clip_pixels(_picture()))
    assert torch.allclose(p.cond, plain.project(feats["image_embeds"]))
    assert torch.allclose(q.cond, plus.project(feats["penultimate"]))
    assert p.cond.shape == (1, 4, 64) and q.cond.shape == (1, 16, 64)


# ---- the attention ------------------------------------------------------------------------------------------
def _sdpa(q, k, v, heads):
    b, n, c = q.shape
    d = c // heads

    def split(t):
        return t.reshape(b, -1, heads, d).transpose(1, 2)

    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ split(v)).transpose(1, 2).reshape(b, n, c)


def test_one_layer_is_text_attention_plus_scale_times_image_attention(unet, plain, encoder):
    prompt = _prompt(plain, encoder)
    layer = ipa.cross_attention_layers(unet)[3]
    attn = layer.attn
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(3, 20, attn.to_q.in_features, generator=g)
    text = torch.randn(3, TOKENS, 64, generator=g)
    scale = 0.7
    proc = ipa.ImagePromptAttnProcessor(plain.spec.widths[3], 64, [prompt], [scale], [plain.to_k[3]], [plain.to_v[3]])
    before = attn.processor
    attn.set_processor(proc)
    try:
        prompt.begin_call([False, True, False], on=True)
        with torch.no_grad():
            got = attn(hidden, encoder_hidden_states=text)
    finally:
        attn.set_processor(before)
        prompt.end_pass()
    with torch.no_grad():
        q = attn.to_q(hidden)
        out = _sdpa(q, attn.to_k(text), attn.to_v(text), attn.heads)
        tokens = torch.cat([prompt.cond, prompt.uncond, prompt.cond])  # the negative row sees the blank prompt
        out = out + scale * _sdpa(q, plain.to_k[3](tokens), plain.to_v[3](tokens), attn.heads)
        want = attn.to_out[1](attn.to_out[0](out))
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():  # and the text part alone is the layer's own processor's output
        plain_out = attn(hidden, encoder_hidden_states=text)
        no_image = attn.to_out[1](attn.to_out[0](_sdpa(q, attn.to_k(text), attn.to_v(text), attn.heads)))
    assert torch.allclose(plain_out, no_image, atol=1e-5)
    assert not torch.allclose(got, plain_out, atol=1e-3)


# ---- the hook around a pass ------------------------------------------------------------------------------------
def test_processors_are_given_back_after_the_pass(unet, plain, encoder):
    call = _call([False, True])
    before = dict(unet.attn_processors)
    keys = set(unet.state_dict())
    bare = _forward(unet, call)
    hook = _hook(plain, _prompt(plain, encoder))
    plan = SamplingPlan(unet, SCHEDULE, "epsilon", [], [], 5.0, torch.float32, CPU, steps=10, hooks=[hook])
    with plan.applied():
        cross = [n for n, p in unet.attn_processors.items() if isinstance(p, ipa.ImagePromptAttnProcessor)]
        assert len(cross) == 16 and all(n.endswith("attn2.processor") for n in cross)
        with_unit = _forward(unet, call, plan.unet_inputs(call))
    assert not torch.allclose(with_unit, bare, atol=1e-4)
    after = dict(unet.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert set(unet.state_dict()) == keys
    assert torch.equal(_forward(unet, call), bare)
    with pytest.raises(RuntimeError, match="boom"), plan.applied():  # also given back when the pass fails
        raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is before[k] for k in before)


def test_weight_zero_is_no_unit_and_weight_changes_the_output(unet, plain, encoder):
    call = _call([False, False, True], seed=1)
    bare = _forward(unet, call)
    prompt = _prompt(plain, encoder)
    zero = _run(unet, [_hook(plain, prompt, weight=0.0)], call)
    assert torch.equal(zero, bare)
    half = _run(unet, [_hook(plain, prompt, weight=0.5)], call)
    full = _run(unet, [_hook(plain, prompt, weight=1.0)], call)
    strong = _run(unet, [_hook(plain, prompt, weight=2.0)], call)
    d_half, d_full, d_strong = ((o - bare).abs().mean() for o in (half, full, strong))
    assert 0 < d_half < d_full < d_strong
    other = _run(unet, [_hook(plain, _prompt(plain, encoder, seed=3), weight=1.0)], call)
    assert not torch.allclose(other, full, atol=1e-5)  # another image, another result


def test_outside_the_guidance_window_the_output_is_bit_identical(unet, plain, encoder):
    prompt = _prompt(plain, encoder)
    hook = _hook(plain, prompt, start=0.3, end=0.6)
    for step, inside in ((0, False), (3, True), (6, True), (7, False)):
        call = _call([False, True], seed=2, step=step)
        got = _run(unet, [hook], call)
        assert torch.equal(got, _forward(unet, call)) is not inside


def test_per_block_weights_follow_the_extensions_transformer_index(unet, plain, encoder):
    layers = ipa.cross_attention_layers(unet)
    index = {layer.path: layer.transformer for layer in layers}
    assert index["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == 0
    assert index["down_blocks.2.attentions.1.transformer_blocks.0.attn2"] == 5
    assert index["mid_block.attentions.0.transformer_blocks.0.attn2"] == 6
    assert index["up_blocks.1.attentions.0.transformer_blocks.0.attn2"] == 7
    assert index["up_blocks.3.attentions.2.transformer_blocks.0.attn2"] == 15
    # the file's order is down, up, middle: the middle block's layer is ip_adapter.31
    assert layers[-1].path.startswith("mid_block.") and len(layers) == 16
    prompt = _prompt(plain, encoder)
    only_middle = [0.0] * 16
    only_middle[6] = 1.0
    hook = _hook(plain, prompt, advanced=only_middle)
    with hook.applied(unet):
        on = [n for n, p in unet.attn_processors.items() if isinstance(p, ipa.ImagePromptAttnProcessor)]
    assert on == ["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    negative = _hook(plain, prompt, advanced=[-1.0] * 15 + [0.5])  # the extension keeps positive weights only
    assert [negative.layer_weight(i) for i in (0, 6, 15)] == [0.0, 0.0, 0.5]
    call = _call([False, True], seed=4)
    assert not torch.equal(_run(unet, [hook], call), _forward(unet, call))
    with pytest.raises(ControlNetError, match="one per transformer block"), _hook(plain, prompt, advanced=[1.0] * 13).applied(unet):
        pass


def test_two_half_units_equal_one_full_unit(unet, plain, plus, encoder):
    call = _call([False, True], seed=5)
    prompt = _prompt(plain, encoder)
    one = _run(unet, [_hook(plain, prompt, weight=1.0)], call)
    two = _run(unet, [_hook(plain, prompt, weight=0.5), _hook(plain, prompt, weight=0.5)], call)
    assert torch.allclose(one, two, atol=1e-5)
    both = _run(unet, [_hook(plain, prompt), _hook(plus, _prompt(plus, encoder))], call)
    assert not torch.allclose(both, one, atol=1e-4)
    assert not any(isinstance(p, ipa.ImagePromptAttnProcessor) for p in unet.attn_processors.values())


def test_another_dtype_gets_copies_and_the_cached_adapter_stays_float32(unet, plain, encoder):
    import copy

    half = copy.deepcopy(unet).to(torch.bfloat16)
    call = _call([False, True], seed=7)
    low = UNetCall(call.x.to(torch.bfloat16), call.timestep, call.encoder_hidden_states.to(torch.bfloat16),
                   call.images, call.uncond, call.step)
    prompt = _prompt(plain, encoder)
    hook = ipa.IPAdapterHook("ControlNet unit 0", plain, prompt, 1.0, None, 0.0, 1.0, CPU, torch.bfloat16)
    plan = SamplingPlan(half, SCHEDULE, "epsilon", [], [], 5.0, torch.bfloat16, CPU, steps=10, hooks=[hook])
    with plan.applied():
        used = half.get_submodule(ipa.cross_attention_layers(half)[0].path).processor.to_k_ip[0]
        assert used.weight.dtype == torch.bfloat16 and used is not plain.to_k[0]
        got = _forward(half, low, plan.unet_inputs(low)).float()
    want = _run(unet, [_hook(plain, prompt)], call)
    bare = _forward(unet, call)
    assert (got - want).abs().mean() < 0.2 * (want - bare).abs().mean()  # bf16 rounding, far below the effect
    assert all(k.weight.dtype == torch.float32 and k.weight.device == CPU for k in plain.to_k)


def test_unannounced_calls_see_the_prompts_tokens(plain, encoder):
    prompt = _prompt(plain, encoder)
    prompt.begin_call([False, True], on=True)
    assert torch.equal(prompt.tokens(2, CPU, torch.float32), torch.cat([prompt.cond, prompt.uncond]))
    assert torch.equal(prompt.tokens(1, CPU, torch.float32), prompt.cond)  # e.g. PAG's extra evaluation


def test_sdxl_inputs_pass_untouched(root, encoder):
    unet = tiny_unet("sdxl", seed=1)
    model = files.load_ip_adapter(root / "ControlNet" / "ip-adapter_sdxl_tiny.safetensors")
    assert model.spec.layers == 22 and len({layer.transformer for layer in ipa.cross_attention_layers(unet)}) == 11
    rows = 2
    added = {"text_embeds": torch.randn(rows, 128), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * rows)}
    call = _call([False, True], width=192, seed=6, added=added)
    bare = _forward(unet, call)
    prompt = ipa.image_prompt(model, encoder, _picture())
    assert torch.equal(_run(unet, [_hook(model, prompt, weight=0.0)], call), bare)
    assert not torch.allclose(_run(unet, [_hook(model, prompt)], call), bare, atol=1e-4)
    with pytest.raises(ControlNetError, match="SD 1.x|64-wide"), _hook(model, prompt).applied(tiny_unet("sd1")):
        pass


def test_through_the_denoiser(unet, plain, encoder):
    g = torch.Generator().manual_seed(10)
    cond = Conditioning(torch.randn(1, TOKENS, 64, generator=g))
    uncond = Conditioning(torch.randn(1, TOKENS, 64, generator=g))

    def denoise(hooks):
        plan = SamplingPlan(unet, SCHEDULE, "epsilon", [ComposedConditioning([(ScheduledConditioning([(10, cond)]), 1.0)])],
                            [ScheduledConditioning([(10, uncond)])], 5.0, torch.float32, CPU, steps=10,
                            hooks=list(hooks))
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11)) * 3.0
        with plan.applied(), torch.no_grad():
            return CFGDenoiser(plan)(x, torch.tensor([3.0]))

    prompt = _prompt(plain, encoder)
    bare = denoise([])
    assert torch.equal(denoise([_hook(plain, prompt, weight=0.0)]), bare)
    assert not torch.allclose(denoise([_hook(plain, prompt)]), bare, atol=1e-4)


# ---- the factory -------------------------------------------------------------------------------------------------
def _prepared(module="ip-adapter_clip_sd15", model="ip-adapter_sd15 [0000abcd]", image=None, **unit):
    u = ControlUnit(enabled=True, module=module, model=model, **unit)
    return PreparedUnit(0, u, Preprocessor(module), _picture() if image is None else image, None)


def test_factory_makes_the_hook(root, encoder):
    path = root / "ControlNet" / "ip-adapter_sd15.safetensors"
    hook = ipa.ip_adapter_hook(_prepared(weight=0.8, guidance_start=0.1, guidance_end=0.9), path,
                               root / "clip_vision", CPU, torch.float32)
    assert isinstance(hook, ipa.IPAdapterHook)
    assert (hook.weight, hook.start, hook.end, hook.owner) == (0.8, 0.1, 0.9, "ControlNet unit 0")
    expected = _prompt(files.load_ip_adapter(path), encoder)
    assert torch.allclose(hook.prompt.cond, expected.cond, atol=1e-6)
    assert torch.allclose(hook.prompt.uncond, expected.uncond, atol=1e-6)
    mask = np.zeros((96, 80, 1), np.uint8)
    mask[:48] = 255
    masked = ipa.ip_adapter_hook(_prepared(image=np.concatenate([_picture(), mask], axis=2)), path,
                                 root / "clip_vision", CPU, torch.float32)
    assert not torch.allclose(masked.prompt.cond, hook.prompt.cond, atol=1e-5)
    auto = ipa.ip_adapter_hook(_prepared(module="ip-adapter-auto", low_vram=True), path, root / "clip_openclip",
                               CPU, torch.float32)
    assert torch.allclose(auto.prompt.cond, hook.prompt.cond, atol=1e-5)


def test_factory_errors_name_the_unit(root, tmp_path):
    path = root / "ControlNet" / "ip-adapter_sd15.safetensors"
    with pytest.raises(ControlNetError, match=f"unit 0: .*put clip_h.pth in {tmp_path}"):
        ipa.ip_adapter_hook(_prepared(), path, tmp_path, CPU, torch.float32)
    with pytest.raises(ControlNetError, match="unit 0: .*put clip_g.pth"):
        ipa.ip_adapter_hook(_prepared(module="ip-adapter_clip_sdxl"), path, tmp_path, CPU, torch.float32)
    with pytest.raises(ControlNetError, match="gives a face embedding for FaceID adapters"):
        ipa.ip_adapter_hook(_prepared(module="ip-adapter_face_id"), path, root / "clip_vision", CPU, torch.float32)
    with pytest.raises(ControlNetError, match="not an IP-Adapter preprocessor"):
        ipa.ip_adapter_hook(_prepared(module="canny"), path, root / "clip_vision", CPU, torch.float32)
    with pytest.raises(ControlNetError, match="unit 0: .*no such file"):
        ipa.ip_adapter_hook(_prepared(), tmp_path / "gone.safetensors", root / "clip_vision", CPU, torch.float32)
    narrow = write_ip_adapter(tmp_path / "ip-adapter_sd15.safetensors", "plain", clip_dim=40)
    with pytest.raises(ControlNetError, match="40-wide CLIP image embedding; this image encoder gives 48"):
        ipa.ip_adapter_hook(_prepared(), narrow, root / "clip_vision", CPU, torch.float32)


def test_encoder_choice():
    spec = files.IPAdapterSpec("plain", 768, 1024, (320,) * 16, 4)
    assert ipa.encoder_for("ip-adapter_clip_sd15", "x", spec) == "clip_h"
    assert ipa.encoder_for("ip-adapter_clip_h", "x", spec) == "clip_h"
    assert ipa.encoder_for("ip-adapter_clip_sdxl", "x", spec) == "clip_g"
    assert ipa.encoder_for("ip-adapter_clip_sdxl_plus_vith", "x", spec) == "clip_h"
    assert ipa.encoder_for("ip-adapter-auto", "ip-adapter_sdxl [abcd1234]", spec) == "clip_g"
    assert ipa.encoder_for("ip-adapter-auto", "ip-adapter-plus_sdxl_vit-h", spec) == "clip_h"
    assert ipa.encoder_for("ip-adapter-auto", "my-adapter", spec) == "clip_h"  # 1024-wide image_embeds: ViT-H
    wide = files.IPAdapterSpec("plain", 2048, 1280, (640,) * 70, 4)
    assert ipa.encoder_for("ip-adapter-auto", "my-adapter", wide) == "clip_g"
    plus_g = files.IPAdapterSpec("plus", 2048, 1664, (640,) * 70, 16, 1280, 20, 4)
    assert ipa.encoder_for("ip-adapter-auto", "my-adapter", plus_g) == "clip_g"
    with pytest.raises(ControlNetError, match="cannot tell"):
        ipa.encoder_for("ip-adapter-auto", "odd", files.IPAdapterSpec("plain", 768, 99, (320,) * 16, 4))
