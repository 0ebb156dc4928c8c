"""The request object: validation messages and the infotext round trip."""

import re

import pytest

from sdstudio.core import infotext
from sdstudio.core.params import RequestError, Txt2ImgRequest, from_infotext, to_infotext_params


def test_defaults_validate():
    assert Txt2ImgRequest(prompt="x").validate().steps == 20


@pytest.mark.parametrize("change, needle", [
    ({"width": 500}, "width must be a multiple of 8"),
    ({"height": 0}, "height must be a multiple of 8"),
    ({"steps": 0}, "steps must be an integer"),
    ({"batch_size": 0}, "batch_size"),
    ({"sampler_name": "Bogus"}, "valid samplers: DPM++ 2M"),
    ({"scheduler": "Wobbly"}, "valid schedule types: Automatic"),
    ({"rng": "TPU"}, "rng must be one of GPU, CPU, NV"),
    ({"subseed_strength": 2.0}, "subseed_strength"),
    ({"clip_skip": 0}, "clip_skip"),
])
def test_validation_names_the_problem(change, needle):
    with pytest.raises(RequestError, match=re.escape(needle)):
        Txt2ImgRequest(**change).validate()


def test_a1111_infotext_to_request():
    req = from_infotext("a cat\nNegative prompt: dog\nSteps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, "
                        "Seed: 123, Size: 640x384, Model hash: abc, Model: foo, Clip skip: 2, "
                        "Variation seed: 9, Variation seed strength: 0.25, Seed resize from: 512x512, RNG: NV, "
                        "Tiling: True, Lora hashes: \"x: 1\", Version: v1.10.1")
    assert (req.prompt, req.negative_prompt, req.steps) == ("a cat", "dog", 28)
    assert (req.sampler_name, req.scheduler) == ("DPM++ 2M", "Karras")  # legacy name split
    assert (req.cfg_scale, req.seed, req.width, req.height) == (6.5, 123, 640, 384)
    assert (req.model, req.clip_skip, req.rng, req.tiling) == ("foo", 2, "NV", True)
    assert (req.subseed, req.subseed_strength) == (9, 0.25)
    assert (req.seed_resize_from_w, req.seed_resize_from_h) == (512, 512)
    assert req.extra == {"Lora hashes": "x: 1"}  # kept, not dropped; result keys (hash, version) not kept


def test_absent_keys_mean_a1111_defaults():
    req = from_infotext("p\nSteps: 5, Sampler: Euler, Seed: 1, Size: 64x64", Txt2ImgRequest(clip_skip=3, rng="CPU"))
    assert req.clip_skip == 1 and req.rng == "GPU" and req.scheduler == "Automatic"


def test_request_to_infotext_and_back():
    req = Txt2ImgRequest(prompt="a, b", negative_prompt="c", steps=7, sampler_name="Euler a", cfg_scale=5.5,
                         seed=42, width=320, height=192, clip_skip=2, rng="CPU", subseed=3, subseed_strength=0.5,
                         tiling=True, extra={"Lora hashes": "a: 1, b: 2"})
    params = to_infotext_params(req, **{"Model hash": "0123456789", "Model": "m", "Version": "sdstudio-x"})
    text = infotext.format(params)
    assert list(infotext.parse(text))[-1] == "Version"
    back = from_infotext(text)
    assert back.replace(model=None, model_hash=None) == req
    assert (back.model, back.model_hash) == ("m", "0123456789")


def test_unipc_settings_in_the_infotext():
    """UniPC's settings, which A1111 reads back from these keys: written when UniPC samples a pass and the value
    is not the default, read back into the request."""
    req = Txt2ImgRequest(prompt="p", sampler_name="UniPC", uni_pc_variant="bh2", uni_pc_skip_type="logSNR",
                         uni_pc_order=2, uni_pc_lower_order_final=False)
    text = infotext.format(to_infotext_params(req))
    assert "UniPC variant: bh2, UniPC skip type: logSNR, UniPC order: 2, UniPC lower order final: False" in text
    assert from_infotext(text) == req
    keys = ("UniPC variant", "UniPC skip type", "UniPC order", "UniPC lower order final")
    for other in (req.replace(sampler_name="Euler"), Txt2ImgRequest(prompt="p", sampler_name="UniPC")):
        assert not [k for k in keys if k in infotext.format(to_infotext_params(other))]
    hires = req.replace(sampler_name="Euler", enable_hr=True, hr_sampler_name="UniPC")
    assert "UniPC order: 2" in infotext.format(to_infotext_params(hires))


@pytest.mark.parametrize("sampler, eta, written", [
    ("DDIM", 0.5, "Eta DDIM: 0.5"), ("DDIM", 0.0, None), ("UniPC", 0.3, "Eta DDIM: 0.3"),
    ("Euler a", 0.5, "Eta: 0.5"), ("Euler a", 1.0, None), ("DPM++ 2M SDE", 0.0, "Eta: 0"), ("Euler a", None, None)])
def test_eta_keys_as_a1111(sampler, eta, written):
    """A1111 writes "Eta DDIM" for its DDIM-family samplers (unless 0) and "Eta" for the rest (unless 1), and
    reads each back as its setting: a default is left out and reads back as the sampler's own default."""
    text = infotext.format(to_infotext_params(Txt2ImgRequest(prompt="p", sampler_name=sampler, eta=eta)))
    keys = [k for k in infotext.parse(text) if k.startswith("Eta")]
    assert keys == ([written.split(":")[0]] if written else [])
    if written:
        assert written in text and from_infotext(text).eta == eta
    else:
        assert from_infotext(text).eta is None


def test_eta_from_a1111_settings():
    """Without an eta in the request, A1111's settings give it by the sampler's kind: "Eta for DDIM"
    (eta_ddim) or "Eta for k-diffusion samplers" (eta_ancestral); the request's own wins."""
    from fastapi import HTTPException

    from sdstudio.api.a1111 import Txt2ImgBody, to_request

    options = {"eta_ddim": 0.0, "eta_ancestral": 1.0}
    def eta(sampler, override=None, **body):
        return to_request(Txt2ImgBody(prompt="x", sampler_name=sampler, override_settings=override or {}, **body),
                          options).eta

    assert eta("DDIM") is None and eta("Euler a") is None  # the defaults: each sampler's own
    assert eta("DDIM", {"eta_ddim": 0.4}) == 0.4 and eta("Euler a", {"eta_ddim": 0.4}) is None
    assert eta("Euler a", {"eta_ancestral": 0.6}) == 0.6 and eta("UniPC", {"eta_ancestral": 0.6}) is None
    assert eta("DDIM", {"eta_ddim": 0.4}, eta=0.2) == 0.2
    with pytest.raises(HTTPException, match="eta_ddim"):
        eta("DDIM", {"eta_ddim": "much"})
    from_paste = from_infotext("p\nSteps: 5, Sampler: DDIM, Eta DDIM: 0.3, Seed: 1, Size: 64x64")
    assert from_paste.eta == 0.3


def test_unreadable_value_is_a_clear_error():
    with pytest.raises(RequestError, match="Size"):
        from_infotext("p\nSteps: 5, Sampler: Euler, Size: big")
