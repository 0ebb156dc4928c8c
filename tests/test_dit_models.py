"""SD 3.x / Flux.1 model files: detection from shapes, loading into diffusers / transformers modules, fp8 /
scaled fp8 / GGUF, companion text encoders found by their keys, and clear errors for broken files.

Loaded transformers are checked against reference forwards written here from the published model code
(SAI's MMDiT, Black Forest Labs' Flux), computed directly from the file's tensors in their original
layout: a converter that maps a tensor to the wrong place or in the wrong order fails them.
"""

from __future__ import annotations

import logging
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from sdstudio.models import dit
from sdstudio.models.errors import ModelFileError
from sdstudio.testing import dit_files as DF
from sdstudio.testing.hostile import SystemCall

torch.set_num_threads(1)
P = "model.diffusion_model."


def shapes_of(state) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


# ---- reference forwards (original layouts) ----------------------------------------------------------

def _lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"].float(), sd[name + ".bias"].float() if name + ".bias" in sd else None)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _rms(x, scale):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale.float()


def _tembed(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _mlp2(sd, name, x, a="mlp.0", b="mlp.2"):
    return _lin(sd, f"{name}.{b}", F.silu(_lin(sd, f"{name}.{a}", x)))


def _attn(q, k, v, heads):  # [B, L, H*D] each
    b, n, _ = q.shape
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)


def sd3_reference(sd, x, context, pooled, t, depth, patch=2, head_dim=64):
    """SAI's MMDiT: joint blocks over [context, image] tokens, adaLN (shift, scale, gate) modulation."""
    h = 64 * depth
    heads = h // head_dim
    B, _C, H, W = x.shape
    img = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    m = round(sd["pos_embed"].shape[1] ** 0.5)
    gh, gw = H // patch, W // patch
    top, left = (m - gh) // 2, (m - gw) // 2
    img = img + sd["pos_embed"].reshape(1, m, m, h)[:, top:top + gh, left:left + gw].reshape(1, gh * gw, h)
    c = _mlp2(sd, "t_embedder", _tembed(t), "mlp.0", "mlp.2") + _mlp2(sd, "y_embedder", pooled, "mlp.0", "mlp.2")
    ctx = _lin(sd, "context_embedder", context)

    def qkv(b, attn, xm):
        q, k, v = _lin(sd, f"{b}.{attn}.qkv", xm).chunk(3, dim=-1)
        if f"{b}.{attn}.ln_q.weight" in sd:
            q = _rms(q.unflatten(-1, (heads, head_dim)), sd[f"{b}.{attn}.ln_q.weight"]).flatten(-2)
            k = _rms(k.unflatten(-1, (heads, head_dim)), sd[f"{b}.{attn}.ln_k.weight"]).flatten(-2)
        return q, k, v

    for i in range(depth):
        xb, cb = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        last = i == depth - 1
        cm = _lin(sd, f"{cb}.adaLN_modulation.1", F.silu(c))[:, None].chunk(2 if last else 6, dim=-1)
        dual = f"{xb}.attn2.qkv.weight" in sd
        xm = _lin(sd, f"{xb}.adaLN_modulation.1", F.silu(c))[:, None].chunk(9 if dual else 6, dim=-1)
        cq, ck, cv = qkv(cb, "attn", _ln(ctx) * (1 + cm[1]) + cm[0])
        xn = _ln(img)
        xq, xk, xv = qkv(xb, "attn", xn * (1 + xm[1]) + xm[0])
        out = _attn(torch.cat([cq, xq], 1), torch.cat([ck, xk], 1), torch.cat([cv, xv], 1), heads)
        c_out, x_out = out[:, :ctx.shape[1]], out[:, ctx.shape[1]:]
        img = img + xm[2] * _lin(sd, f"{xb}.attn.proj", x_out)
        if dual:
            q2, k2, v2 = qkv(xb, "attn2", xn * (1 + xm[7]) + xm[6])
            img = img + xm[8] * _lin(sd, f"{xb}.attn2.proj", _attn(q2, k2, v2, heads))
        img = img + xm[5] * _lin(sd, f"{xb}.mlp.fc2", F.gelu(_lin(sd, f"{xb}.mlp.fc1", _ln(img) * (1 + xm[4]) + xm[3]),
                                                               approximate="tanh"))
        if not last:
            ctx = ctx + cm[2] * _lin(sd, f"{cb}.attn.proj", c_out)
            ctx = ctx + cm[5] * _lin(sd, f"{cb}.mlp.fc2", F.gelu(_lin(sd, f"{cb}.mlp.fc1", _ln(ctx) * (1 + cm[4]) + cm[3]),
                                                                   approximate="tanh"))
    shift, scale = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(c))[:, None].chunk(2, dim=-1)
    out = _lin(sd, "final_layer.linear", _ln(img) * (1 + scale) + shift)
    out = out.reshape(B, gh, gw, patch, patch, -1)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, -1, gh * patch, gw * patch)


def _rope(pos, dim, theta=10000):
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    out = pos[..., None].double() * omega
    return torch.stack([out.cos(), -out.sin(), out.sin(), out.cos()], -1).reshape(*out.shape, 2, 2).float()


def _apply_rope(x, freqs):  # x [B, H, L, D], freqs [1, 1, L, D/2, 2, 2]
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]).reshape(*x.shape)


def flux_reference(sd, img, txt, y, t, img_ids, txt_ids, guidance=None, axes=(16, 56, 56)):
    """Black Forest Labs' Flux: double-stream then single-stream blocks, 3-axis RoPE, RMS qk-norm."""
    hidden = sd["img_in.weight"].shape[0]
    heads = hidden // 128
    x = _lin(sd, "img_in", img)
    vec = _mlp2(sd, "time_in", _tembed(t * 1000), "in_layer", "out_layer")
    if guidance is not None:
        vec = vec + _mlp2(sd, "guidance_in", _tembed(guidance * 1000), "in_layer", "out_layer")
    vec = vec + _mlp2(sd, "vector_in", y, "in_layer", "out_layer")
    txt = _lin(sd, "txt_in", txt)
    ids = torch.cat([txt_ids, img_ids], 0)
    pe = torch.cat([_rope(ids[:, i], axes[i]) for i in range(3)], dim=-3)[None, None]

    def split(qkv):  # B L (3 H D) -> 3 x [B H L D]
        return qkv.unflatten(-1, (3, heads, 128)).permute(2, 0, 3, 1, 4)

    def attention(q, k, v):
        q, k = _apply_rope(q, pe), _apply_rope(k, pe)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    n = 0
    while f"double_blocks.{n}.img_mod.lin.weight" in sd:
        b = f"double_blocks.{n}."
        im = _lin(sd, b + "img_mod.lin", F.silu(vec))[:, None].chunk(6, -1)
        tm = _lin(sd, b + "txt_mod.lin", F.silu(vec))[:, None].chunk(6, -1)
        iq, ik, iv = split(_lin(sd, b + "img_attn.qkv", _ln(x) * (1 + im[1]) + im[0]))
        tq, tk, tv = split(_lin(sd, b + "txt_attn.qkv", _ln(txt) * (1 + tm[1]) + tm[0]))
        iq, ik = _rms(iq, sd[b + "img_attn.norm.query_norm.scale"]), _rms(ik, sd[b + "img_attn.norm.key_norm.scale"])
        tq, tk = _rms(tq, sd[b + "txt_attn.norm.query_norm.scale"]), _rms(tk, sd[b + "txt_attn.norm.key_norm.scale"])
        a = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2))
        ta, ia = a[:, :txt.shape[1]], a[:, txt.shape[1]:]
        x = x + im[2] * _lin(sd, b + "img_attn.proj", ia)
        x = x + im[5] * _lin(sd, b + "img_mlp.2", F.gelu(_lin(sd, b + "img_mlp.0", _ln(x) * (1 + im[4]) + im[3]),
                                                           approximate="tanh"))
        txt = txt + tm[2] * _lin(sd, b + "txt_attn.proj", ta)
        txt = txt + tm[5] * _lin(sd, b + "txt_mlp.2", F.gelu(_lin(sd, b + "txt_mlp.0", _ln(txt) * (1 + tm[4]) + tm[3]),
                                                               approximate="tanh"))
        n += 1
    h = torch.cat([txt, x], 1)
    n = 0
    while f"single_blocks.{n}.linear1.weight" in sd:
        b = f"single_blocks.{n}."
        shift, scale, gate = _lin(sd, b + "modulation.lin", F.silu(vec))[:, None].chunk(3, -1)
        qkv, mlp = _lin(sd, b + "linear1", _ln(h) * (1 + scale) + shift).split([3 * hidden, 4 * hidden], -1)
        q, k, v = split(qkv)
        q, k = _rms(q, sd[b + "norm.query_norm.scale"]), _rms(k, sd[b + "norm.key_norm.scale"])
        h = h + gate * _lin(sd, b + "linear2", torch.cat([attention(q, k, v), F.gelu(mlp, approximate="tanh")], -1))
        n += 1
    x = h[:, txt.shape[1]:]
    shift, scale = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(vec))[:, None].chunk(2, -1)
    return _lin(sd, "final_layer.linear", _ln(x) * (1 + scale) + shift)


# ---- small models and inputs ------------------------------------------------------------------------

def tiny_sd3(depth=2, **kw):
    clip_width = DF.CLIP_SIZES["clip_l"]["tiny"][0] + DF.CLIP_SIZES["clip_g"]["tiny"][0]
    shapes = DF.sd3_shapes(depth, pos_embed_max=8, context_dim=DF.T5_SIZES["tiny"]["d_model"], pooled_dim=clip_width,
                           prefix="", **kw)
    return DF.random_state(shapes, seed=depth)


def tiny_flux(guidance=True, seed=0):
    shapes = DF.flux_shapes(2, 2, hidden=256, context_dim=DF.T5_SIZES["tiny"]["d_model"],
                            pooled_dim=DF.CLIP_SIZES["clip_l"]["tiny"][0], guidance=guidance)
    return DF.random_state(shapes, seed=seed)


def sd3_inputs(state):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 16, 8, 12, generator=g), torch.randn(1, 5, state["context_embedder.weight"].shape[1], generator=g),
            torch.randn(1, state["y_embedder.mlp.0.weight"].shape[1], generator=g), torch.tensor([700.0]))


def run_sd3(model, inputs):
    x, ctx, pooled, t = inputs
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample


def flux_inputs(state):
    g = torch.Generator().manual_seed(2)
    gh, gw = 3, 4
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(gh)), torch.arange(float(gw)), indexing="ij"), -1)
    return {"img": torch.randn(1, gh * gw, 64, generator=g),
                "txt": torch.randn(1, 5, state["txt_in.weight"].shape[1], generator=g),
                "y": torch.randn(1, state["vector_in.in_layer.weight"].shape[1], generator=g), "t": torch.tensor([0.7]),
                "img_ids": img_ids.reshape(-1, 3).float(), "txt_ids": torch.zeros(5, 3),
                "guidance": torch.tensor([3.5]) if "guidance_in.in_layer.weight" in state else None}


def run_flux(model, a):
    with torch.no_grad():
        return model(hidden_states=a["img"], encoder_hidden_states=a["txt"], pooled_projections=a["y"], timestep=a["t"],
                     img_ids=a["img_ids"], txt_ids=a["txt_ids"], guidance=a["guidance"]).sample


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# ---- detection --------------------------------------------------------------------------------------

def test_detects_each_published_transformer_from_full_size_shapes():
    cases = {
        "SD 3 Medium": (DF.sd3_shapes(24), 24, 1536),
        "SD 3.5 Large": (DF.sd35_large_shapes(), 38, 2432),
        "SD 3.5 Medium": (DF.sd35_medium_shapes(), 24, 1536),
    }
    for name, (shapes, depth, width) in cases.items():
        spec = dit.detect_dit(shapes)
        assert spec.describe() == name and spec.family == "sd3" and spec.prefix == P
        t = spec.transformer
        assert (t["num_layers"], t["num_attention_heads"] * t["attention_head_dim"], t["caption_projection_dim"]) == \
            (depth, width, width)
        assert t["patch_size"] == 2 and t["in_channels"] == t["out_channels"] == 16 and t["joint_attention_dim"] == 4096
        assert spec.required_encoders == ("clip_l", "clip_g") and spec.optional_encoders == ("t5xxl",)
    assert dit.detect_dit(DF.sd35_medium_shapes()).transformer["dual_attention_layers"] == tuple(range(13))
    assert dit.detect_dit(DF.sd35_medium_shapes()).transformer["pos_embed_max_size"] == 384
    assert dit.detect_dit(DF.sd35_large_shapes()).transformer["qk_norm"] == "rms_norm"
    assert dit.detect_dit(DF.sd3_shapes(24)).transformer["qk_norm"] is None

    for shapes, layout, prefix in ((DF.flux_shapes(), "bfl", ""), (DF.flux_shapes(prefix=P), "bfl", P),
                                   (DF.flux_diffusers_shapes(), "diffusers", "")):
        spec = dit.detect_dit(shapes)
        assert (spec.describe(), spec.layout, spec.prefix, spec.guidance_distilled) == ("Flux.1 dev", layout, prefix, True)
        t = spec.transformer
        assert (t["num_layers"], t["num_single_layers"], t["num_attention_heads"], t["joint_attention_dim"],
                t["pooled_projection_dim"], t["in_channels"]) == (19, 38, 24, 4096, 768, 64)
        assert spec.required_encoders == ("clip_l", "t5xxl")
    for shapes in (DF.flux_shapes(guidance=False), DF.flux_shapes(guidance=False, prefix=P),
                   DF.flux_diffusers_shapes(guidance=False)):
        spec = dit.detect_dit(shapes)
        assert spec.describe() == "Flux.1 schnell" and not spec.transformer["guidance_embeds"]
    assert dit.detect_dit(DF.flux_shapes(in_channels=384)).describe() == "Flux.1 dev (fill)"


def test_not_a_dit_and_unsupported_variants():
    from sdstudio.testing.synthetic import make_checkpoint

    assert dit.detect_dit(shapes_of(make_checkpoint("sdxl", "full", meta=True))) is None
    assert dit.detect_dit(shapes_of(DF.dit_vae_state())) is None
    nf4 = DF.flux_shapes(1, 1) | {"double_blocks.0.img_attn.qkv.weight.absmax": (10,)}
    with pytest.raises(ModelFileError, match="NF4"):
        dit.detect_dit(nf4)
    chroma = {k: v for k, v in DF.flux_shapes(1, 1, guidance=False).items() if not k.startswith("vector_in")}
    with pytest.raises(ModelFileError, match="Chroma"):
        dit.detect_dit(chroma)
    broken = {k: v for k, v in DF.flux_shapes(3, 2).items() if not k.startswith("double_blocks.1.")}
    with pytest.raises(ModelFileError, match="not numbered"):
        dit.detect_dit(broken)


def test_detects_text_encoders_by_shape_in_each_layout():
    full = {kind: shapes_of(DF.encoder_state(kind, "full", meta=True)) for kind in ("clip_l", "clip_g", "t5xxl")}
    for kind, shapes in full.items():
        assert dit.detect_text_encoder(shapes).kind == kind
        prefixed = {"transformer." + k: v for k, v in shapes.items()}  # ComfyUI's text_encoders naming
        assert dit.detect_text_encoder(prefixed).kind == kind
    t5 = dit.detect_text_encoder(full["t5xxl"]).config
    assert (t5["d_model"], t5["num_layers"], t5["num_heads"], t5["d_ff"], t5["feed_forward_proj"]) == \
        (4096, 24, 64, 10240, "gated-gelu")
    g = dit.detect_text_encoder(full["clip_g"])
    assert (g.config["hidden_size"], g.config["num_hidden_layers"], g.config["hidden_act"]) == (1280, 32, "gelu")
    assert dit.detect_text_encoder(full["clip_l"]).config["hidden_act"] == "quick_gelu"
    openclip = dit.detect_text_encoder(shapes_of(DF.encoder_state("clip_g", "full", meta=True, layout="openclip")))
    assert (openclip.kind, openclip.layout, openclip.projection_transposed) == ("clip_g", "openclip", True)
    only_shared = {k: v for k, v in full["t5xxl"].items() if k != "encoder.embed_tokens.weight"}
    only_embed = {k: v for k, v in full["t5xxl"].items() if k != "shared.weight"}
    assert dit.detect_text_encoder(only_shared).config == dit.detect_text_encoder(only_embed).config == t5
    assert dit.detect_text_encoder(shapes_of(DF.dit_vae_state())) is None
    assert dit.detect_text_encoder(DF.flux_shapes(1, 1)) is None


def test_detects_bundled_vae_and_encoders_of_an_sd3_file():
    shapes = DF.sd3_shapes(24) | shapes_of(DF.dit_vae_state("full", prefix="first_stage_model."))
    for kind in ("clip_l", "clip_g", "t5xxl"):
        shapes |= {f"text_encoders.{kind}.transformer.{k}": v
                   for k, v in shapes_of(DF.encoder_state(kind, "full", meta=True)).items()}
    spec = dit.detect_dit(shapes)
    assert [e.kind for e in spec.text_encoders] == ["clip_g", "clip_l", "t5xxl"]
    assert spec.vae_prefix == "first_stage_model." and spec.vae["latent_channels"] == 16
    assert (spec.vae["scaling_factor"], spec.vae["shift_factor"]) == (1.5305, 0.0609)
    assert not spec.vae["use_quant_conv"] and not spec.vae["use_post_quant_conv"]
    flux = dit.detect_dit(DF.flux_shapes(prefix=P) | shapes_of(DF.dit_vae_state("full", prefix="vae.")))
    assert (flux.vae_prefix, flux.vae["scaling_factor"], flux.vae["shift_factor"]) == ("vae.", 0.3611, 0.1159)
    assert dit.detect_dit(DF.flux_shapes()).vae is None


def test_our_flux_conversion_matches_diffusers_own_converter_at_full_width():
    """diffusers' converter only handles the real 3072 width; on meta tensors (no memory) both agree on every
    name and shape, so our width-general table is the same mapping."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    shapes = DF.flux_shapes(1, 1)
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(meta))
    ours = dit.flux_bfl_to_diffusers(meta.__getitem__, meta, 3072)
    assert shapes_of(ours) == shapes_of(theirs)
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        module = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    assert shapes_of(module.state_dict()) == shapes_of(ours)


# ---- loading ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_file(tmp_path_factory):
    """A reduced SD3 "incl_clips_t5" single file: depth 2 MMDiT, tiny VAE and encoders, published key names."""
    root = tmp_path_factory.mktemp("sd3")
    state = DF.with_prefix(tiny_sd3(), P) | DF.dit_vae_state(prefix="first_stage_model.")
    for kind in ("clip_l", "clip_g", "t5xxl"):
        state |= DF.with_prefix(DF.encoder_state(kind, vocab=1000), f"text_encoders.{kind}.transformer.")
    return DF.save(state, root / "sd3_medium_incl_clips_t5xxlfp16.safetensors")


def test_sd3_single_file_loads_and_matches_the_reference(sd3_file):
    model = dit.load_dit(sd3_file)
    assert model.sources == {"transformer": "checkpoint", "vae": "checkpoint", "clip_l": "checkpoint",
                             "clip_g": "checkpoint", "t5xxl": "checkpoint"}
    raw = {k[len(P):]: v for k, v in dit.open_weights(sd3_file).items() if k.startswith(P)}
    inputs = sd3_inputs(raw)
    out = run_sd3(model.transformer, inputs)
    assert close(out, sd3_reference(raw, *inputs, depth=2))
    assert model.vae.config.latent_channels == 16 and model.vae.config.shift_factor == 0.0609
    ids = torch.tensor([[49406, 5, 7, 49407]])
    for kind in ("clip_l", "clip_g"):
        ref = DF.clip_module(kind, vocab=1000)
        with torch.no_grad():
            a, b = model.text_encoders[kind](ids % 1000, output_hidden_states=True), ref(ids % 1000, output_hidden_states=True)
        assert close(a.text_embeds, b.text_embeds, 1e-6) and close(a.hidden_states[-2], b.hidden_states[-2], 1e-6)
    with torch.no_grad():
        assert torch.equal(model.text_encoders["t5xxl"](ids % 1000).last_hidden_state,
                           DF.t5_module(vocab=1000)(ids % 1000).last_hidden_state)


def test_sd35_medium_dual_attention_and_qk_norm_match_the_reference(tmp_path):
    state = tiny_sd3(depth=3, qk_norm=True, dual=(0, 1))
    path = DF.save(DF.with_prefix(state, P), tmp_path / "sd3.5m.safetensors")
    source = dit.open_weights(path)
    spec = dit.detect_dit(source.shapes)
    assert spec.transformer["dual_attention_layers"] == (0, 1) and spec.transformer["qk_norm"] == "rms_norm"
    model = dit.build_dit(spec, source)
    inputs = sd3_inputs(state)
    assert close(run_sd3(model, inputs), sd3_reference(state, *inputs, depth=3))


@pytest.mark.parametrize("layout", ["bfl", "comfy"])
def test_flux_matches_the_reference(tmp_path, layout):
    for guidance in (True, False):
        state = tiny_flux(guidance)
        prefix = P if layout == "comfy" else ""
        path = DF.save(DF.with_prefix(state, prefix), tmp_path / f"flux-{guidance}.safetensors")
        source = dit.open_weights(path)
        spec = dit.detect_dit(source.shapes)
        assert spec.guidance_distilled is guidance and spec.prefix == prefix
        model = dit.build_dit(spec, source)
        a = flux_inputs(state)
        assert close(run_flux(model, a), flux_reference(state, **a))


def test_flux_in_diffusers_layout_loads_as_stored(tmp_path):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(num_layers=1, num_single_layers=1, num_attention_heads=2, joint_attention_dim=48,
                                 pooled_projection_dim=32, guidance_embeds=True).eval()
    path = DF.save(dict(ref.state_dict()), tmp_path / "diffusion_pytorch_model.safetensors")
    source = dit.open_weights(path)
    model = dit.build_dit(dit.detect_dit(source.shapes), source)
    a = flux_inputs({"txt_in.weight": torch.empty(1, 48), "vector_in.in_layer.weight": torch.empty(1, 32),
                     "guidance_in.in_layer.weight": None})
    assert close(run_flux(model, a), run_flux(ref, a), 1e-6)


def test_fp8_and_scaled_fp8_files_upcast_exactly(tmp_path):
    state = tiny_flux()
    a = flux_inputs(state)
    want = flux_reference(state, **a)
    for scaled in (False, True):
        path = DF.save(DF.to_fp8(state, scaled=scaled), tmp_path / f"flux-fp8-{scaled}.safetensors")
        source = dit.open_weights(path, torch.float32)
        assert source.precision() == ("F8_E4M3:scaled" if scaled else "F8_E4M3")
        assert "scaled_fp8" not in source and not any(k.endswith("scale_weight") for k in source)
        w = "double_blocks.0.img_attn.qkv.weight"
        if scaled:
            raw = dit.open_state_dict(path)
            expect = raw[w].float() * raw[w[:-6] + "scale_weight"].float()
        else:
            expect = state[w].to(torch.float8_e4m3fn).float()
        assert torch.equal(source[w], expect)
        out = run_flux(dit.build_dit(dit.detect_dit(source.shapes), source), a)
        err = (out - want).abs().mean() / want.abs().mean()
        assert err < 0.08, err  # fp8 e4m3 keeps 3 mantissa bits: a few percent


def test_gguf_q8_0_flux_loads(tmp_path):
    pytest.importorskip("gguf")
    state = tiny_flux(seed=3)
    path = DF.write_gguf(state, tmp_path / "flux1-dev-Q8_0.gguf", "Q8_0")
    source = dit.open_weights(path)
    assert source.shapes == shapes_of(state) and source.precision() == "Q8_0"
    w = "single_blocks.0.linear1.weight"
    assert (source[w] - state[w]).abs().max() < 0.01 * state[w].abs().max()
    a = flux_inputs(state)
    out = run_flux(dit.build_dit(dit.detect_dit(source.shapes), source), a)
    want = flux_reference(state, **a)
    assert (out - want).abs().mean() / want.abs().mean() < 0.02


# ---- companion files --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """Encoders under misleading names: only their keys tell what they are."""
    root = tmp_path_factory.mktemp("te")
    t5 = DF.encoder_state("t5xxl", vocab=1000)
    DF.save({k: v.half() for k, v in t5.items()}, root / "text_encoder" / "clip_g.safetensors")  # a T5, fp16
    DF.save(DF.to_fp8(t5), root / "text_encoder" / "t5xxl_fp16.safetensors")  # the same T5, fp8
    DF.save(DF.encoder_state("clip_l", vocab=1000), root / "clip" / "sub" / "model.safetensors")
    (root / "text_encoder" / "broken.safetensors").write_bytes(b"\x10\x00")
    return root


def test_find_text_encoders_by_keys_preferring_precision(encoder_dir):
    dirs = [encoder_dir / "text_encoder", encoder_dir / "clip"]
    found = dit.find_text_encoders(dirs, ["clip_l", "t5xxl"], ["clip_g"], "Flux")
    assert found == {"clip_l": encoder_dir / "clip" / "sub" / "model.safetensors",
                     "t5xxl": encoder_dir / "text_encoder" / "clip_g.safetensors"}
    with pytest.raises(ModelFileError) as err:
        dit.find_text_encoders([encoder_dir / "clip"], ["clip_l", "t5xxl"], family="Flux")
    assert str(err.value) == (f"Flux needs a T5-XXL text encoder: put t5xxl_fp16.safetensors (or "
                              f"t5xxl_fp8_e4m3fn.safetensors) in {encoder_dir / 'clip'}")
    model, _enc = dit.load_text_encoder(found["t5xxl"], "t5xxl", torch.float16)
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # T5 overflows in fp16
    assert model.shared.weight.dtype == torch.float16
    with pytest.raises(ModelFileError, match="is a T5-XXL encoder, not CLIP-L"):
        dit.load_text_encoder(found["t5xxl"], "clip_l")


def test_flux_without_t5_says_where_to_put_it(tmp_path, encoder_dir):
    path = DF.save(DF.with_prefix(tiny_flux(), "") | DF.dit_vae_state(prefix="vae."), tmp_path / "flux.safetensors")
    with pytest.raises(ModelFileError, match=r"^Flux needs a T5-XXL text encoder: put t5xxl_fp16\.safetensors"):
        dit.load_dit(path, text_encoder_dirs=[encoder_dir / "clip"])
    model = dit.load_dit(path, text_encoder_dirs=[encoder_dir / "text_encoder", encoder_dir / "clip"])
    assert set(model.text_encoders) == {"clip_l", "t5xxl"}
    assert type(model.text_encoders["clip_l"]).__name__ == "CLIPTextModel"  # Flux: pooler output, no projection
    assert model.vae.config.scaling_factor == 0.3611


def test_flux_vae_found_in_vae_folder(tmp_path, encoder_dir):
    path = DF.save(tiny_flux(), tmp_path / "flux1-schnell.safetensors")
    dirs = [encoder_dir / "text_encoder", encoder_dir / "clip"]
    with pytest.raises(ModelFileError, match=r"Flux needs its 16-channel VAE: put ae\.safetensors in"):
        dit.load_dit(path, text_encoder_dirs=dirs, vae_dirs=[tmp_path / "VAE"])
    DF.save(DF.dit_vae_state(seed=1), tmp_path / "VAE" / "sd3_vae.safetensors")
    DF.save(DF.dit_vae_state(seed=2), tmp_path / "VAE" / "ae.safetensors")
    model = dit.load_dit(path, text_encoder_dirs=dirs, vae_dirs=[tmp_path / "VAE"])
    assert model.sources["vae"] == str(tmp_path / "VAE" / "ae.safetensors")
    assert (model.vae.config.scaling_factor, model.vae.config.shift_factor) == (0.3611, 0.1159)


# ---- optional keys, broken and hostile files --------------------------------------------------------

def test_optional_keys_are_silent_and_unknown_ones_warned(tmp_path, caplog):
    ids = torch.tensor([[49406, 3, 49407]]) % 1000
    clip = DF.encoder_state("clip_l", vocab=1000)
    extra = {"text_model.embeddings.position_ids": torch.arange(77)[None], "logit_scale": torch.tensor(4.6),
             "vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)}
    with caplog.at_level(logging.WARNING, logger="sdstudio.models.dit"):
        model, _ = dit.load_text_encoder(DF.save(clip | extra, tmp_path / "a.safetensors"), projection=False)
        # ours only: transformers may warn about the tiny vocabulary's token ids, when its logging propagates
        assert not [r for r in caplog.records if r.name.startswith("sdstudio")]
        dit.load_text_encoder(DF.save(clip | {"text_model.mystery.weight": torch.zeros(2)}, tmp_path / "b.safetensors"))
        assert "not used (text_model.mystery.weight)" in caplog.text
        caplog.clear()
        no_proj = {k: v for k, v in clip.items() if not k.startswith("text_projection")}
        with_proj, _ = dit.load_text_encoder(DF.save(no_proj, tmp_path / "c.safetensors"), projection=True)
        assert "identity" in caplog.text
    with torch.no_grad():
        out = with_proj(ids)
        assert torch.equal(out.text_embeds, with_proj.text_model(ids).pooler_output)  # identity projection
        assert type(model).__name__ == "CLIPTextModel"
    t5 = DF.encoder_state("t5xxl", vocab=1000)
    ref = DF.t5_module(vocab=1000)
    for drop in ("encoder.embed_tokens.weight", "shared.weight"):
        path = DF.save({k: v for k, v in t5.items() if k != drop}, tmp_path / f"t5-{drop}.safetensors")
        model, _ = dit.load_text_encoder(path)
        with torch.no_grad():
            assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_openclip_layout_clip_g_loads_like_transformers_layout(tmp_path):
    hf = DF.encoder_state("clip_g", vocab=1000)
    oc = DF.encoder_state("clip_g", vocab=1000, layout="openclip")
    ids = torch.tensor([[49406, 3, 4, 49407]]) % 1000
    a, _ = dit.load_text_encoder(DF.save(hf, tmp_path / "hf.safetensors"), "clip_g")
    b, _ = dit.load_text_encoder(DF.save(oc, tmp_path / "oc.safetensors"), "clip_g")
    with torch.no_grad():
        assert torch.allclose(a(ids).text_embeds, b(ids).text_embeds, atol=1e-5)


def test_broken_files_give_one_line_errors(tmp_path):
    state = tiny_flux()
    missing = DF.save({k: v for k, v in state.items() if k != "single_blocks.1.linear2.weight"},
                      tmp_path / "flux-missing.safetensors")
    source = dit.open_weights(missing)
    with pytest.raises(ModelFileError) as err:
        dit.build_dit(dit.detect_dit(source.shapes), source)
    assert str(err.value) == ("flux-missing.safetensors: Flux.1 dev transformer: the file lacks 1 tensor(s) the model "
                              "uses (single_transformer_blocks.1.proj_out.weight)")
    wrong = dict(state)
    wrong["double_blocks.1.img_mlp.2.weight"] = torch.zeros(256, 10)
    source = dit.open_weights(DF.save(wrong, tmp_path / "flux-wrong.safetensors"))
    with pytest.raises(ModelFileError, match=r"ff\.net\.2\.weight has shape \(256, 10\), expected \(256, 1024\)"):
        dit.build_dit(dit.detect_dit(source.shapes), source)
    good = DF.save(state, tmp_path / "flux.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match="truncated") as err:
        dit.load_dit(tmp_path / "cut.safetensors")
    assert "\n" not in str(err.value)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ModelFileError, match="GGUF"):
        dit.open_weights(tmp_path / "bad.gguf")
    with pytest.raises(ModelFileError, match="not an SD 3 or Flux.1 model"):
        dit.load_dit(DF.save(DF.dit_vae_state(), tmp_path / "ae.safetensors"))


def test_hostile_pickle_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "t5xxl.pt"
    with open(path, "wb") as f:
        pickle.dump({"shared.weight": SystemCall(marker)}, f)
    with pytest.raises(ModelFileError, match="refused"):
        dit.load_text_encoder(path)
    assert not marker.exists()


def test_nan_weights_are_named(tmp_path):
    """As for checkpoints: a transformer weight holding NaN is refused naming the file and the tensor."""
    state = DF.with_prefix(tiny_sd3(), P) | DF.dit_vae_state(prefix="first_stage_model.")
    for kind in ("clip_l", "clip_g", "t5xxl"):
        state |= DF.with_prefix(DF.encoder_state(kind, vocab=1000), f"text_encoders.{kind}.transformer.")
    key = next(k for k in state if k.startswith(P) and k.endswith(".weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    path = DF.save(state, tmp_path / "sd3_nan.safetensors")
    with pytest.raises(ModelFileError, match=r"sd3_nan.safetensors.*holds NaN or infinite") as info:
        dit.load_dit(path)
    assert "\n" not in str(info.value)
