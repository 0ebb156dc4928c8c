"""LoRA / LyCORIS networks on the tiny model: formats, multipliers, no drift, infotext."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdstudio.core import infotext
from sdstudio.core.extra_networks import extract, lora_uses
from sdstudio.core.params import RequestError, Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.engine.lora import _module_index
from sdstudio.models.files import addnet_hash

BASE = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 42}


def make_lora(engine, path, kind="lora", rank=4, te=True, ldm_names=False, scale=0.5, seed=0):
    """A network file in the requested format covering attention projections (and the text encoder)."""
    _, model = engine.load(None)
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, (where, module) in _module_index(model).items():
        if where == "te" and not te:
            continue
        kohya = name.startswith("lora_")
        if not kohya and kind != "peft":
            continue
        if kind == "peft" and kohya:
            continue
        if not any(p in name for p in ("to_q", "to_v", "q_proj", "ff_net_0_proj", "ff.net.0.proj")):
            continue
        ldm_style = "input_blocks" in name or "middle_block" in name or "output_blocks" in name
        if kohya and ldm_style != ldm_names:
            continue
        out_f, in_f = module.weight.shape[:2]
        r = lambda *s: torch.randn(*s, generator=g) * scale
        if kind in ("lora", "peft"):
            down, up = r(rank, in_f), r(out_f, rank)
            if kind == "peft":
                sd[name + ".lora_A.weight"], sd[name + ".lora_B.weight"] = down, up
            else:
                sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
                sd[name + ".alpha"] = torch.tensor(float(rank) / 2)
        elif kind == "loha":
            sd.update({name + ".hada_w1_a": r(out_f, rank), name + ".hada_w1_b": r(rank, in_f),
                       name + ".hada_w2_a": r(out_f, rank), name + ".hada_w2_b": r(rank, in_f),
                       name + ".alpha": torch.tensor(float(rank))})
        elif kind == "lokr":
            a = 2 if out_f % 2 == 0 and in_f % 2 == 0 else 1
            sd.update({name + ".lokr_w1": r(a, a), name + ".lokr_w2": r(out_f // a, in_f // a)})
        elif kind == "full":
            sd[name + ".diff"] = r(out_f, in_f) * 0.1
        elif kind == "ia3":
            sd[name + ".weight"] = r(out_f)
            sd[name + ".on_input"] = torch.tensor(False)
    save_file(sd, str(path), metadata={"ss_network_dim": str(rank)})
    return path


@pytest.fixture
def engine(data_dir):
    (data_dir / "models" / "Lora").mkdir(parents=True)
    return Engine(Paths(data_dir))


def px(engine, **kw):
    return np.asarray(engine.generate(Txt2ImgRequest(**{**BASE, **kw})).images[0].image)


def unet_state(engine):
    _, model = engine.load(None)
    return {k: v.cpu().clone() for k, v in {**model.unet.state_dict(),
                                      **model.text_encoders[0].state_dict()}.items()}


def test_tags_are_parsed_like_a1111():
    text, tags = extract("a <lora:style:0.8> cat <lora:other:0.5:1.0>, <hypernet:h:1> <lora:x:unet=0.3>")
    assert text == "a  cat ,  "
    uses = lora_uses(tags)
    assert [(u.name, u.te, u.unet) for u in uses] == [("style", 0.8, 0.8), ("other", 0.5, 1.0), ("x", 1.0, 0.3)]
    with pytest.raises(RequestError, match="must be a number"):
        lora_uses(extract("<lora:x:strong>")[1])


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "full", "ia3", "peft"])
def test_every_format_changes_the_image_and_leaves_no_trace(engine, kind):
    make_lora(engine, engine.paths.lora_dir / f"net-{kind}.safetensors", kind=kind)
    engine.registry.refresh()
    before = unet_state(engine)
    plain = px(engine)
    styled = px(engine, prompt=f"a red circle <lora:net-{kind}:1>")
    assert not np.array_equal(plain, styled)
    assert np.array_equal(px(engine, prompt=f"a red circle <lora:net-{kind}:0>"), plain)
    after = unet_state(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical: no drift
    assert np.array_equal(px(engine), plain)


def test_ldm_style_kohya_names_hit_the_same_modules(engine):
    a = make_lora(engine, engine.paths.lora_dir / "diffusers-names.safetensors", te=False, seed=3)
    b = make_lora(engine, engine.paths.lora_dir / "ldm-names.safetensors", te=False, ldm_names=True, seed=3)
    engine.registry.refresh()
    assert a.stat().st_size > 0 and b.stat().st_size > 0
    assert np.array_equal(px(engine, prompt="a red circle <lora:diffusers-names:1>"),
                          px(engine, prompt="a red circle <lora:ldm-names:1>"))


def test_te_and_unet_multipliers_are_separate(engine):
    make_lora(engine, engine.paths.lora_dir / "both.safetensors")
    engine.registry.refresh()
    plain = px(engine)
    te_only = px(engine, prompt="a red circle <lora:both:1:0>")
    unet_only = px(engine, prompt="a red circle <lora:both:0:1>")
    both = px(engine, prompt="a red circle <lora:both:1>")
    assert len({plain.tobytes(), te_only.tobytes(), unet_only.tobytes(), both.tobytes()}) == 4


def test_many_requests_no_drift_and_infotext_round_trip(engine):
    path = make_lora(engine, engine.paths.lora_dir / "style.safetensors")
    engine.registry.refresh()
    before = unet_state(engine)
    first = engine.generate(Txt2ImgRequest(**{**BASE, "prompt": "a red circle <lora:style:0.7>"}))
    for w in (0.1, 1.3, -0.5, 0.7, 2.0):
        px(engine, prompt=f"a red circle <lora:style:{w}>")
    assert all(torch.equal(before[k], v) for k, v in unet_state(engine).items())
    p = infotext.parse(first.images[0].infotext)
    assert p["Prompt"] == "a red circle <lora:style:0.7>"
    assert p["Lora hashes"] == f"style: {addnet_hash(path)}"
    again = engine.generate(from_infotext(first.images[0].infotext))
    assert np.array_equal(np.asarray(again.images[0].image), np.asarray(first.images[0].image))


def test_missing_and_wrong_networks_warn_and_generation_goes_on(engine):
    plain = px(engine)
    r = engine.generate(Txt2ImgRequest(**{**BASE, "prompt": "a red circle<lora:nothere:1>"}))
    assert np.array_equal(np.asarray(r.images[0].image), plain)
    expected = f"LoRA left out: no LoRA named 'nothere'; available: (none; put LoRA files in {engine.paths.lora_dir})"
    assert r.warnings == [expected]
    save_file({"lora_unet_nothing_like_this.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_nothing_like_this.lora_up.weight": torch.zeros(8, 2)},
              str(engine.paths.lora_dir / "alien.safetensors"))
    (engine.paths.lora_dir / "broken.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    path = make_lora(engine, engine.paths.lora_dir / "partial.safetensors", te=False)
    from safetensors.torch import load_file

    partial = load_file(str(path))
    partial["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(2, 8)
    partial["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(8, 2)
    save_file(partial, str(path))
    engine.registry.refresh()
    r = engine.generate(Txt2ImgRequest(**{**BASE, "prompt": "a red circle<lora:alien:1><lora:broken:1><lora:partial:1>"}))
    assert len(r.images) == 1 and len(r.warnings) == 3
    assert "alien.safetensors: none of its 1 modules fit this model" in r.warnings[0]
    assert "broken.safetensors" in r.warnings[1]
    assert r.warnings[2].startswith("partial.safetensors: 1 of ") and "lora_unet_not_a_module" in r.warnings[2]


def test_pasted_infotext_finds_a_renamed_lora_by_hash(engine):
    make_lora(engine, engine.paths.lora_dir / "detail_tweaker.safetensors")
    engine.registry.refresh()
    first = engine.generate(Txt2ImgRequest(**{**BASE, "prompt": "a red circle <lora:detail_tweaker:0.6>"}))
    (engine.paths.lora_dir / "detail_tweaker.safetensors").rename(engine.paths.lora_dir / "add_detail.safetensors")
    engine.registry.refresh()
    again = engine.generate(from_infotext(first.images[0].infotext))  # the tag still says detail_tweaker
    assert again.warnings == []
    assert np.array_equal(np.asarray(again.images[0].image), np.asarray(first.images[0].image))
    assert infotext.parse(again.images[0].infotext)["Lora hashes"] == infotext.parse(first.images[0].infotext)["Lora hashes"]


def test_stale_hashes_from_a_pasted_infotext_are_not_written_back(engine):
    make_lora(engine, engine.paths.lora_dir / "style.safetensors")
    engine.registry.refresh()
    text = engine.generate(Txt2ImgRequest(**{**BASE, "prompt": "a red circle <lora:style:1>"})).images[0].infotext
    edited = from_infotext(text).replace(prompt="a red circle")  # the user removed the LoRA tag
    assert "Lora hashes" not in engine.generate(edited).images[0].infotext
