"""Infotext: A1111's reader behaviour on real-world shapes of text, and format() as its inverse."""

import json

from hypothesis import given
from hypothesis import strategies as st

from sdstudio.core import infotext

A1111_SAMPLE = """masterpiece, (best quality:1.2), 1girl
standing in a field
Negative prompt: lowres, bad anatomy
blurry
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3781092331, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.5, Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "detail: 0ab1c2d3e4f5, style: 123456789abc", TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1"""


def test_a1111_sample_parses_like_a1111():
    p = infotext.parse(A1111_SAMPLE)
    assert p["Prompt"] == "masterpiece, (best quality:1.2), 1girl\nstanding in a field"
    assert p["Negative prompt"] == "lowres, bad anatomy\nblurry"
    assert p["Steps"] == "28" and p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    assert p["Size"] == "512x768" and p["Model"] == "v1-5-pruned-emaonly"
    assert p["Lora hashes"] == "detail: 0ab1c2d3e4f5, style: 123456789abc"  # quoted value, quotes removed
    assert p["TI hashes"] == "EasyNegative: c74b4e810b03"
    assert p["Version"] == "v1.10.1"
    keys = list(p)
    assert keys[:4] == ["Prompt", "Negative prompt", "Steps", "Sampler"]
    assert keys[-1] == "Version"


def test_unknown_keys_are_kept_in_order():
    text = "a cat\nSteps: 20, Sampler: Euler a, ADetailer model: face_yolov8n.pt, CFG scale: 7, Seed: 1, Size: 512x512"
    p = infotext.parse(text)
    assert list(p)[2:] == ["Steps", "Sampler", "ADetailer model", "CFG scale", "Seed", "Size"]
    assert p["ADetailer model"] == "face_yolov8n.pt"


def test_last_line_with_fewer_than_three_pairs_is_prompt():
    p = infotext.parse("a photo\nstyle: painting, mood: calm")
    assert p["Prompt"] == "a photo\nstyle: painting, mood: calm"
    assert list(p) == ["Prompt", "Negative prompt"]


def test_no_negative_prompt_and_empty_text():
    p = infotext.parse("hello\nSteps: 1, Sampler: Euler, Seed: 2")
    assert p["Negative prompt"] == "" and p["Prompt"] == "hello"
    assert infotext.parse("") == {"Prompt": "", "Negative prompt": ""}


def test_json_escapes_in_quoted_values():
    p = infotext.parse('x\nSteps: 1, Hires prompt: "say \\"hi\\", then: go\\nnow", Seed: 3, Size: 64x64')
    assert p["Hires prompt"] == 'say "hi", then: go\nnow'


def test_format_quotes_only_when_needed_and_skips_none():
    text = infotext.format({"Prompt": "p", "Negative prompt": "", "Steps": 20, "Hires prompt": "a, b",
                            "Note": "x: y", "Model": None, "Seed": 5})
    assert text == 'p\nSteps: 20, Hires prompt: "a, b", Note: "x: y", Seed: 5'


def test_format_writes_flag_keys_bare_like_a1111():
    assert infotext.format({"Prompt": "p", "Steps": 1, "Sampler": "Euler", "Tiling": "Tiling"}).endswith(", Tiling")


def test_round_trip_of_a1111_sample():
    assert infotext.parse(infotext.format(infotext.parse(A1111_SAMPLE))) == infotext.parse(A1111_SAMPLE)


_value = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30).filter(
    lambda v: v.strip() == v and not v.startswith('"'))
_key = st.from_regex(r"[A-Za-z][A-Za-z0-9 ]{0,14}[A-Za-z0-9]", fullmatch=True).filter(lambda k: "  " not in k)


@given(prompt=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\n"), max_size=40)
       .map(str.strip).filter(lambda s: not s.startswith("Negative prompt:")),
       negative=st.text(alphabet="abc ,()[]:", max_size=20).map(str.strip),
       pairs=st.dictionaries(_key, _value, min_size=3, max_size=6))
def test_format_then_parse_is_identity(prompt, negative, pairs):
    pairs = {k: v for k, v in pairs.items() if k not in ("Prompt", "Negative prompt")}
    if len(pairs) < 3:
        return
    params = {"Prompt": prompt, "Negative prompt": negative, **pairs}
    assert infotext.parse(infotext.format(params)) == params


def test_quote_uses_json():
    assert infotext.quote("a, b") == json.dumps("a, b")
    assert infotext.quote("plain") == "plain"
    assert infotext.unquote('"a\\"b"') == 'a"b'
