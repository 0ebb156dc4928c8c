"""EVA02-CLIP-L-14-336's image tower for PuLID: a tiny tower in the published checkpoint's layout (EVA-CLIP's
``visual.*`` names with the text tower and the rotary tables beside it, written here from EVA-CLIP's module tree)
built from its shapes and loaded strictly; the 2D rotary embedding against complex rotations, the attention and
the SwiGLU with its sub-norm against their formulas, the hidden states' blocks, and the preprocessor's resize,
normalization and output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine.annotators import eva_clip
from sdstudio.models.errors import ModelFileError
from tests.test_annotators import fresh_annotator_cache, picture  # noqa: F401 (autouse)

torch.set_num_threads(1)
V = "visual."


def eva_layout(width=128, depth=22, patch=14, grid=4, hidden=96, out=32) -> dict:
    """EVA02-CLIP-L-14-336's checkpoint names (published: width 1024, depth 24, patch 14, grid 24, MLP 2730,
    output 768), with the rotary buffers EVA-CLIP saves on the tower and on every block, and a text tower."""
    s = {V + "cls_token": (1, 1, width), V + "pos_embed": (1, grid * grid + 1, width),
         V + "patch_embed.proj.weight": (width, 3, patch, patch), V + "patch_embed.proj.bias": (width,),
         V + "rope.freqs_cos": (grid * grid, 64), V + "rope.freqs_sin": (grid * grid, 64),
         V + "norm.weight": (width,), V + "norm.bias": (width,), V + "head.weight": (out, width), V + "head.bias": (out,)}
    for i in range(depth):
        b = f"{V}blocks.{i}."
        s |= {b + n: (width,) for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.q_bias",
                                       "attn.v_bias", "attn.inner_attn_ln.weight", "attn.inner_attn_ln.bias",
                                       "attn.proj.bias", "mlp.w3.bias")}
        s |= {b + f"attn.{n}_proj.weight": (width, width) for n in "qkv"}
        s |= {b + "attn.proj.weight": (width, width), b + "attn.rope.freqs_cos": (grid * grid, 64),
              b + "attn.rope.freqs_sin": (grid * grid, 64), b + "mlp.w1.weight": (hidden, width),
              b + "mlp.w1.bias": (hidden,), b + "mlp.w2.weight": (hidden, width), b + "mlp.w2.bias": (hidden,),
              b + "mlp.ffn_ln.weight": (hidden,), b + "mlp.ffn_ln.bias": (hidden,), b + "mlp.w3.weight": (width, hidden)}
    s |= {"text.token_embedding.weight": (50, 24), "text.positional_embedding": (8, 24),
          "text.transformer.resblocks.0.attn.in_proj_weight": (72, 24), "text.ln_final.weight": (24,),
          "text.text_projection": (24, out), "logit_scale": ()}
    return s


def random_weights(layout: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in layout.items():
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ln.weight")):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) * (0.02 if "pos_embed" in name or "cls" in name else 0.08)
    return out


def tower_keys(layout: dict) -> set[str]:
    return {k[len(V):] for k in layout if k.startswith(V) and "rope" not in k}


def tiny(seed: int = 0, **sizes) -> tuple[dict, eva_clip.EVAVisionTransformer]:
    weights = random_weights(eva_layout(**sizes), seed)
    model = eva_clip.EVAVisionTransformer.from_shapes({k: tuple(v.shape) for k, v in eva_clip.visual_weights(weights).items()})
    model.load_state_dict(eva_clip.visual_weights(weights))
    return weights, model.eval()


def test_the_published_layout_loads_strictly_built_from_its_shapes(tmp_path):
    weights = random_weights(eva_layout())
    path = tmp_path / eva_clip.FILE.name
    torch.save({k: v.half() for k, v in weights.items()}, str(path))  # published in float16
    model = eva_clip.load(path)
    assert set(model.state_dict()) == tower_keys(eva_layout())
    assert (len(model.blocks), model.blocks[0].attn.heads, model.grid, model.image_size) == (22, 2, 4, 56)
    assert model.head.out_features == 32 and model.blocks[0].mlp.w1.out_features == 96
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    assert torch.equal(model.blocks[3].attn.v_bias.cpu(), weights[V + "blocks.3.attn.v_bias"].half().float())
    torch.save({"state_dict": weights}, str(tmp_path / "nested.pt"))
    nested = eva_clip.load(tmp_path / "nested.pt")
    assert torch.equal(nested.head.weight.cpu(), weights[V + "head.weight"])
    # the published sizes give ViT-L/14 at 336: 16 heads of 64, 24 × 24 patches
    big = {k[len(V):]: s for k, s in eva_layout(1024, 24, 14, 24, 2730, 768).items() if k.startswith(V)}
    with torch.device("meta"):
        vit_l = eva_clip.EVAVisionTransformer.from_shapes(big)
    assert (vit_l.blocks[0].attn.heads, vit_l.image_size, len(vit_l.blocks)) == (16, 336, 24)
    assert eva_clip.hidden_indices(24) == [4, 8, 12, 16, 20]


def test_wrong_files_are_model_file_errors_naming_the_file(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, str(tmp_path / "other.pt"))
    with pytest.raises(ModelFileError, match=r"other\.pt: not an EVA02-CLIP image tower \(no visual\.cls_token"):
        eva_clip.load(tmp_path / "other.pt")
    weights = random_weights(eva_layout(depth=3))
    del weights[V + "blocks.1.mlp.ffn_ln.weight"]
    torch.save(weights, str(tmp_path / "cut.pt"))
    with pytest.raises(ModelFileError, match=r"cut\.pt: not the expected network \(missing: blocks\.1\.mlp\.ffn_ln"):
        eva_clip.load(tmp_path / "cut.pt")
    weights = random_weights(eva_layout(depth=2))
    weights[V + "pos_embed"] = torch.zeros(1, 15, 128)  # 14 positions: no square grid
    torch.save(weights, str(tmp_path / "odd.pt"))
    with pytest.raises(ModelFileError, match=r"odd\.pt: not an EVA02 vision tower \(14 positions"):
        eva_clip.load(tmp_path / "odd.pt")


def test_the_2d_rotary_embedding_is_a_complex_rotation_by_row_then_column():
    grid, head_dim = 3, 16
    cos, sin = eva_clip.rotary_tables(grid, head_dim)
    x = torch.randn(2, 5, grid * grid, head_dim, dtype=torch.float64)
    ours = eva_clip.rotate(x, cos.double(), sin.double())
    z = torch.complex(x[..., 0::2], x[..., 1::2])  # channel pairs (0, 1), (2, 3) ... as complex numbers
    quarter = head_dim // 4  # frequencies per axis
    freqs = torch.tensor([10000.0 ** (-2 * k / (head_dim // 2)) for k in range(quarter)], dtype=torch.float64)
    angles = torch.zeros(grid * grid, head_dim // 2, dtype=torch.float64)
    for token in range(grid * grid):
        row, col = divmod(token, grid)  # patches row-major
        angles[token, :quarter] = row * 16 / grid * freqs  # positions on EVA's 16-cell grid, stretched
        angles[token, quarter:] = col * 16 / grid * freqs
    turned = z * torch.polar(torch.ones_like(angles), angles)
    expect = torch.stack([turned.real, turned.imag], dim=-1).flatten(-2)
    assert torch.allclose(ours, expect, atol=1e-6)
    assert torch.allclose(ours.norm(dim=-1), x.norm(dim=-1))  # a rotation
    # the attention logits of turned queries and keys depend on the offset between patches only
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    one = torch.ones(grid * grid, 1, dtype=torch.float64)
    rq, rk = eva_clip.rotate(q * one, cos.double(), sin.double()), eva_clip.rotate(k * one, cos.double(), sin.double())
    assert torch.allclose(rq[4] @ rk[5], rq[0] @ rk[1]) and torch.allclose(rq[3] @ rk[6], rq[1] @ rk[4])


def _layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def test_the_swiglu_with_its_sub_norm_and_the_attention_follow_their_formulas():
    weights, model = tiny(depth=2)
    b = {k[len(V + "blocks.1."):]: v for k, v in weights.items() if k.startswith(V + "blocks.1.")}
    x = torch.randn(2, 17, 128)
    with torch.no_grad():
        gate = x @ b["mlp.w1.weight"].T + b["mlp.w1.bias"]
        value = x @ b["mlp.w2.weight"].T + b["mlp.w2.bias"]
        mixed = _layer_norm(gate * torch.sigmoid(gate) * value, b["mlp.ffn_ln.weight"], b["mlp.ffn_ln.bias"])
        assert torch.allclose(model.blocks[1].mlp(x), mixed @ b["mlp.w3.weight"].T + b["mlp.w3.bias"], atol=1e-5)

        cos, sin = eva_clip.rotary_tables(4, 64)
        q = x @ b["attn.q_proj.weight"].T + b["attn.q_bias"]
        k = x @ b["attn.k_proj.weight"].T  # no key bias
        v = x @ b["attn.v_proj.weight"].T + b["attn.v_bias"]
        q, k, v = (t.view(2, 17, 2, 64).transpose(1, 2) for t in (q, k, v))
        q = torch.cat([q[:, :, :1], eva_clip.rotate(q[:, :, 1:], cos, sin)], 2)  # not the class token
        k = torch.cat([k[:, :, :1], eva_clip.rotate(k[:, :, 1:], cos, sin)], 2)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(64), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(2, 17, 128)
        out = _layer_norm(out, b["attn.inner_attn_ln.weight"], b["attn.inner_attn_ln.bias"])
        expect = out @ b["attn.proj.weight"].T + b["attn.proj.bias"]
        assert torch.allclose(model.blocks[1].attn(x, cos, sin), expect, atol=1e-5)

        n1 = _layer_norm(x, b["norm1.weight"], b["norm1.bias"])
        mid = x + model.blocks[1].attn(n1, cos, sin)
        full = mid + model.blocks[1].mlp(_layer_norm(mid, b["norm2.weight"], b["norm2.bias"]))
        assert torch.allclose(model.blocks[1](x, cos, sin), full, atol=1e-5)  # pre-norm, no layer scale


def test_the_tokens_the_hidden_states_and_the_pooled_output():
    weights, model = tiny()
    assert eva_clip.hidden_indices(22) == [4, 8, 12, 16, 20] and eva_clip.hidden_indices(6) == [4]
    inputs, last = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].clone()))
    model.blocks[-1].register_forward_hook(lambda m, args, out: last.__setitem__("x", out.clone()))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        pooled, hidden = model(x)
    patches = F.conv2d(x, weights[V + "patch_embed.proj.weight"], weights[V + "patch_embed.proj.bias"], stride=14)
    tokens = torch.cat([weights[V + "cls_token"], patches.flatten(2).transpose(1, 2)], 1) + weights[V + "pos_embed"]
    assert torch.allclose(inputs[0], tokens, atol=1e-5)
    assert len(hidden) == 5 and all(h.shape == (1, 17, 128) for h in hidden)
    for h, i in zip(hidden, (4, 8, 12, 16, 20)):  # the inputs of these blocks (outputs of 3, 7, ... 19)
        assert torch.equal(h, inputs[i])
    cls = _layer_norm(last["x"][:, 0], weights[V + "norm.weight"], weights[V + "norm.bias"])
    assert torch.allclose(pooled, cls @ weights[V + "head.weight"].T + weights[V + "head.bias"], atol=1e-5)
    with pytest.raises(ValueError, match="takes 56×56"):
        model(torch.zeros(1, 3, 42, 42))


def test_the_preprocessor_resizes_normalizes_and_returns_unit_embeddings(tmp_path):
    weights = random_weights(eva_layout())
    folder = tmp_path / "annotators"
    with pytest.raises(ControlNetError, match=rf"needs EVA02_CLIP_L_336_psz14_s6B\.pt: put .* in {folder / 'evaclip'}"):
        eva_clip.find_file(folder)
    snapshot = tmp_path / "ext_models" / "models--QuanSun--EVA-CLIP" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    torch.save(weights, str(snapshot / eva_clip.FILE.name))
    assert eva_clip.find_file(folder, tmp_path / "ext_models") == snapshot / eva_clip.FILE.name
    (folder / "evaclip").mkdir(parents=True)
    torch.save(weights, str(folder / "evaclip" / eva_clip.FILE.name))
    assert eva_clip.find_file(folder) == folder / "evaclip" / eva_clip.FILE.name

    features = torch.rand(1, 3, 512, 512)
    result = eva_clip.run(folder, features)
    model = eva_clip.load(folder / "evaclip" / eva_clip.FILE.name)
    assert result.id_cond_vit.shape == (1, 32) and len(result.id_vit_hidden) == 5
    assert torch.allclose(result.id_cond_vit.norm(dim=1), torch.ones(1), atol=1e-6)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    resized = F.interpolate(features, (56, 56), mode="bicubic", align_corners=False)
    assert torch.allclose(eva_clip.prepare(model, features).cpu(), (resized - mean) / std, atol=1e-6)
    smooth = F.interpolate(features, (56, 56), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(resized, smooth, atol=1e-2)  # the choice matters: torchvision 0.15-0.16 did not smooth
    with torch.no_grad():
        pooled, hidden = model(((resized - mean) / std).to(model.pos_embed.device))
    assert torch.allclose(result.id_cond_vit, pooled / pooled.norm(dim=1, keepdim=True), atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(result.id_vit_hidden, hidden))
    uint8 = (features[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    from_array = eva_clip.encode(model, uint8)
    from_tensor = eva_clip.encode(model, torch.from_numpy(uint8).permute(2, 0, 1)[None].float() / 255)
    assert torch.allclose(from_array.id_cond_vit, from_tensor.id_cond_vit, atol=1e-6)
