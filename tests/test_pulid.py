"""PuLID as the extension runs it: the file's layout (``ip-adapter_pulid_sdxl_fp16.safetensors``: the ID encoder
under ``image_proj.``, the key / value projections under ``ip_adapter.``) detected and loaded, the ID encoder
against its authors' formula written out here, the two attention settings (Fidelity, Extremely style) against
their definitions, and the unit's ``pulid_mode`` field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sdstudio.core import controlnet as cn
from sdstudio.engine import ip_adapter as ipa
from sdstudio.models import ip_adapter as files
from sdstudio.models.errors import ModelFileError

torch.set_num_threads(1)
CROSS, WIDTH, HIDDEN, MAPS, BODY_TOKENS = 64, 48, 32, 5, 5
LAYER_WIDTHS = (32, 64, 32)


def published_tensors(seed: int = 0, cross: int = CROSS, width: int = WIDTH, hidden: int = HIDDEN,
                      layers: tuple[int, ...] = LAYER_WIDTHS) -> dict[str, torch.Tensor]:
    """The extension's PuLID file in small: body MLP widths as PuLID's rule gives them (min(T·C/4, 1024),
    min(T·C/2, 1024)), five mapping pairs, a key and a value projection per cross-attention layer."""
    g = torch.Generator().manual_seed(seed)
    h1, h2 = min(BODY_TOKENS * cross // 4, 1024), min(BODY_TOKENS * cross // 2, 1024)

    def linear(prefix: str, cin: int, cout: int, out: dict) -> None:
        out[f"{prefix}.weight"] = torch.randn(cout, cin, generator=g) / cin ** 0.5
        out[f"{prefix}.bias"] = 0.1 * torch.randn(cout, generator=g)

    def norm(prefix: str, c: int, out: dict) -> None:
        out[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        out[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=g)

    t: dict[str, torch.Tensor] = {}
    p = "image_proj."
    linear(p + "body.0", width, h1, t)
    norm(p + "body.1", h1, t)
    linear(p + "body.3", h1, h2, t)
    norm(p + "body.4", h2, t)
    linear(p + "body.6", h2, BODY_TOKENS * cross, t)
    for i in range(MAPS):
        for name in (f"mapping_{i}", f"mapping_patch_{i}"):
            linear(f"{p}{name}.0", hidden, hidden, t)
            norm(f"{p}{name}.1", hidden, t)
            linear(f"{p}{name}.3", hidden, hidden, t)
            norm(f"{p}{name}.4", hidden, t)
            linear(f"{p}{name}.6", hidden, cross, t)
    for n, inner in enumerate(layers):
        for kv in "kv":
            t[f"ip_adapter.{2 * n + 1}.to_{kv}_ip.weight"] = torch.randn(inner, cross, generator=g) / cross ** 0.5
    return t


def write(path, tensors) -> str:
    save_file({k: v.half() for k, v in tensors.items()}, str(path))
    return str(path)


def reference_encoder(t: dict[str, torch.Tensor], id_cond: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
    """PuLID's IDEncoder: body (Linear, LayerNorm, LeakyReLU ×2, Linear) to 5 tokens; per hidden state,
    mapping_i(class token) + mean over patches of mapping_patch_i(patch tokens)."""
    def mlp(prefix: str, x: torch.Tensor) -> torch.Tensor:
        for a, b in ((0, 1), (3, 4)):
            x = F.linear(x, t[f"{prefix}.{a}.weight"].float(), t[f"{prefix}.{a}.bias"].float())
            x = F.leaky_relu(F.layer_norm(x, x.shape[-1:], t[f"{prefix}.{b}.weight"].float(),
                                          t[f"{prefix}.{b}.bias"].float()), 0.01)
        return F.linear(x, t[f"{prefix}.6.weight"].float(), t[f"{prefix}.6.bias"].float())

    p = "image_proj."
    out = [mlp(p + "body", id_cond).reshape(-1, BODY_TOKENS, CROSS)]
    for i, h in enumerate(hidden):
        out.append(mlp(f"{p}mapping_{i}", h[:, :1]) + mlp(f"{p}mapping_patch_{i}", h[:, 1:]).mean(1, keepdim=True))
    return torch.cat(out, dim=1)


def test_the_file_is_detected_and_the_id_encoder_is_pulids(tmp_path):
    tensors = {k: v.half().float() for k, v in published_tensors().items()}  # what the fp16 file holds
    model = files.load_ip_adapter(write(tmp_path / "ip-adapter_pulid_sdxl_fp16.safetensors", tensors))
    spec = model.spec
    assert (spec.kind, spec.cross_attention_dim, spec.clip_dim, spec.tokens, spec.widths) == (
        "pulid", CROSS, WIDTH, BODY_TOKENS + MAPS, LAYER_WIDTHS)
    assert spec.describe() == "64-wide context PuLID"
    g = torch.Generator().manual_seed(1)
    id_cond = torch.randn(2, WIDTH, generator=g)
    hidden = [torch.randn(2, 7, HIDDEN, generator=g) for _ in range(MAPS)]
    ours = model.project(id_cond, hidden)
    assert ours.shape == (2, BODY_TOKENS + MAPS, CROSS)
    torch.testing.assert_close(ours, reference_encoder(tensors, id_cond, hidden), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.to_k[1].weight, tensors["ip_adapter.3.to_k_ip.weight"])
    with pytest.raises(ValueError, match="takes 5 EVA-CLIP hidden states, got 4"):
        model.project(id_cond, hidden[:4])


def test_broken_pulid_files_are_named(tmp_path):
    tensors = published_tensors()
    del tensors["image_proj.mapping_patch_2.6.bias"]
    with pytest.raises(ModelFileError, match=r"^a\.safetensors: missing 1 tensor.*mapping_patch_2\.6\.bias"):
        files.load_ip_adapter(write(tmp_path / "a.safetensors", tensors))
    tensors = published_tensors()
    tensors["image_proj.body.6.weight"] = tensors["image_proj.body.6.weight"][:-3]
    with pytest.raises(ModelFileError, match=r"^b\.safetensors: PuLID: projection shapes"):
        files.load_ip_adapter(write(tmp_path / "b.safetensors", tensors))


# ---- the attention ---------------------------------------------------------------------------------------------
def _inputs(seed: int = 0, heads: int = 2, dim: int = 8, n: int = 12, t: int = 10):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, n, heads * dim, generator=g)
    query = torch.randn(2, heads, n, dim, generator=g)
    tokens = torch.randn(2, t, 16, generator=g)
    to_k = torch.nn.Linear(16, heads * dim, bias=False)
    to_v = torch.nn.Linear(16, heads * dim, bias=False)
    with torch.no_grad():
        to_k.weight.copy_(torch.randn(heads * dim, 16, generator=g) / 4)
        to_v.weight.copy_(torch.randn(heads * dim, 16, generator=g) / 4)
    return hidden, query, tokens, to_k, to_v


def _explicit(query, keys, values):
    """softmax(q k^T / sqrt(d)) v, heads merged: (B, N, heads*d)."""
    w = (query @ keys.transpose(-2, -1) / query.shape[-1] ** 0.5).softmax(-1)
    out = w @ values
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1), w


def test_the_two_settings_against_their_definitions():
    hidden, query, tokens, to_k, to_v = _inputs()
    b, heads, _, d = query.shape

    def kv(extra: int):
        padded = torch.cat([tokens, torch.zeros(b, extra, tokens.shape[2])], dim=1)
        split = (lambda x: x.view(b, -1, heads, d).transpose(1, 2))
        return split(to_k(padded)), split(to_v(padded))

    with torch.no_grad():
        # Fidelity: 8 zero tokens; the part along the input scaled by the first five tokens' attention share
        k, v = kv(8)
        o, _ = _explicit(query, k, v)
        share = (query @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, :, :5].sum(-1, keepdim=True)  # unscaled logits
        along = (hidden * o).sum(1, keepdim=True) / (hidden * hidden).sum(1, keepdim=True) * hidden
        expected = o - along + share * along
        ours = ipa.PULID_ATTENTION["Fidelity"](hidden, query, tokens, to_k, to_v)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        # Extremely style: 16 zero tokens, the part along the input removed: orthogonal to it per channel
        k, v = kv(16)
        o, _ = _explicit(query, k, v)
        along = (hidden * o).sum(1, keepdim=True) / (hidden * hidden).sum(1, keepdim=True) * hidden
        ours = ipa.PULID_ATTENTION["Extremely style"](hidden, query, tokens, to_k, to_v)
        torch.testing.assert_close(ours, o - along, rtol=1e-5, atol=1e-5)
        assert (ours * hidden).sum(1).abs().max() < 1e-4
        # zero tokens dilute: without them the plain attention differs
        plain = ipa.PuLIDAttention(0)(hidden, query, tokens, to_k, to_v)
        torch.testing.assert_close(plain, _explicit(query, *kv(0))[0], rtol=1e-5, atol=1e-5)
        assert (plain - ipa.PuLIDAttention(8)(hidden, query, tokens, to_k, to_v)).abs().max() > 1e-3


def test_a_pulid_prompt_in_the_processor():
    """The processor adds weight × PuLID's attention to the text attention, before the output projection."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=16, heads=2, dim_head=8).eval()
    hidden, _, _, to_k, to_v = _inputs(seed=3, heads=2, dim=8, n=12, t=10)
    cond = torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(5))
    prompt = ipa.ImagePrompt(cond, torch.zeros_like(cond))
    prompt.pulid = ipa.PULID_ATTENTION["Fidelity"]
    prompt.begin_call([False, True], True, (3, 4))
    proc = ipa.ImagePromptAttnProcessor(16, 16, [prompt], [0.7], [to_k], [to_v])
    context = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = proc(attn, hidden, context)
        q = attn.to_q(hidden).view(2, -1, 2, 8).transpose(1, 2)
        k, v = (f(context).view(2, -1, 2, 8).transpose(1, 2) for f in (attn.to_k, attn.to_v))
        text, _ = _explicit(q, k, v)
        rows = torch.cat([cond, torch.zeros_like(cond)])  # the negative row takes the uncond tokens
        image = ipa.PULID_ATTENTION["Fidelity"](hidden, q, rows, to_k, to_v)
        expected = attn.to_out[0](text + 0.7 * image)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    prompt.begin_call([False, True], False, (3, 4))  # outside its window: the text attention alone
    with torch.no_grad():
        torch.testing.assert_close(proc(attn, hidden, context), attn.to_out[0](text), rtol=1e-5, atol=1e-5)


def test_the_units_pulid_mode():
    assert cn.ControlUnit().pulid_mode == "Fidelity"
    assert cn.unit_from_dict({"pulid_mode": "extremely style"}).pulid_mode == "Extremely style"
    assert cn.unit_from_dict({"pulid_mode": 1}).pulid_mode == "Extremely style"  # the enum's position
    with pytest.raises(cn.ControlNetError, match=r"unit 2\.pulid_mode: must be one of Fidelity, Extremely style"):
        cn.unit_from_dict({"pulid_mode": "Balanced"}, 2)
    assert set(ipa.PULID_ATTENTION) == set(cn.PULID_MODES)


# ---- a whole job -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pulid_studio(make_data_root):
    """A tiny SDXL model, a PuLID file fitting it, InsightFace's antelopev2 pack (stand-ins), facexlib's detector
    and parsing network and a tiny EVA02-CLIP (published layouts), all in the places users put them."""
    from conftest import planted_detector

    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine
    from sdstudio.scripts import Studio
    from sdstudio.testing.ip_adapter_files import cross_attention_widths
    from sdstudio.testing.synthetic import unet_config
    from tests.test_annotators_eva_clip import eva_layout
    from tests.test_annotators_eva_clip import random_weights as eva_weights
    from tests.test_annotators_face_parsing import write_bisenet
    from tests.test_faceid import write_antelope

    root = make_data_root("pulid", {"tiny-sdxl": "sdxl"})
    config = unet_config("sdxl", "tiny")
    tensors = published_tensors(2, cross=config["cross_attention_dim"], width=512 + 32, hidden=128,
                                layers=tuple(cross_attention_widths(config)))
    for folder in ("ControlNet", "clip_vision"):
        (root / "models" / folder).mkdir(parents=True, exist_ok=True)
    write(root / "models" / "ControlNet" / "ip-adapter_pulid_sdxl_fp16.safetensors", tensors)
    write_antelope(root / "models")
    annotators = root / "models" / "ControlNet" / "annotators"
    write_bisenet(annotators / "facexlib" / "parsing_bisenet.pth", seed=2)
    torch.save({f"module.{k}": v for k, v in planted_detector().eval().state_dict().items()},
               str(annotators / "facexlib" / "detection_Resnet50_Final.pth"))
    torch.save({"state_dict": eva_weights(eva_layout(width=128, depth=22, out=32), seed=1)},
               str(root / "models" / "clip_vision" / "EVA02_CLIP_L_336_psz14_s6B.pt"))
    return Studio(Engine(Paths(root)))


def test_a_pulid_unit_in_a_job(pulid_studio):
    from tests.test_faceid import FACE_PICTURE, _b64, _generate

    studio = pulid_studio
    unit = {"enabled": True, "module": "ip-adapter_pulid", "model": "ip-adapter_pulid_sdxl_fp16",
            "image": _b64(FACE_PICTURE)}
    plain, fidelity = _generate(studio), _generate(studio, unit)
    style = _generate(studio, {**unit, "pulid_mode": "Extremely style"})
    assert np.abs(fidelity - plain).mean() > 0.5 and np.abs(style - fidelity).mean() > 0.5
    assert np.array_equal(_generate(studio, unit), fidelity)  # repeatable
    assert np.array_equal(_generate(studio, {**unit, "weight": 0.0}), plain)
    with pytest.raises(cn.ControlNetError, match="is a PuLID adapter: .* pick the ip-adapter_pulid preprocessor"):
        _generate(studio, {**unit, "module": "ip-adapter_face_id"})
