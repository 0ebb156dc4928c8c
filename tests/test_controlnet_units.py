"""ControlNet units as the extension reads and writes them (sdstudio.core.controlnet, the script's declaration)."""

import pytest

from sdstudio.core import controlnet as cn
from sdstudio.core import infotext, scripts
from sdstudio.core.params import RequestError, Txt2ImgRequest


def test_defaults_are_the_extensions():
    u = cn.unit_from_dict({})
    assert (u.enabled, u.module, u.model, u.weight, u.resize_mode, u.low_vram) == \
        (False, "none", "None", 1.0, "Crop and Resize", False)
    assert (u.processor_res, u.threshold_a, u.threshold_b, u.guidance_start, u.guidance_end) == (-1, -1.0, -1.0, 0.0, 1.0)
    assert (u.pixel_perfect, u.control_mode, u.hr_option, u.save_detected_map, u.inpaint_crop_input_image) == \
        (False, "Balanced", "Both", True, True)


@pytest.mark.parametrize("given, expected", [
    ("Just Resize", "Just Resize"), ("Crop and Resize", "Crop and Resize"), ("Resize and Fill", "Resize and Fill"),
    ("Inner Fit (Scale to Fit)", "Crop and Resize"), ("Scale to Fit (Inner Fit)", "Crop and Resize"),
    ("Outer Fit (Shrink to Fit)", "Resize and Fill"), ("Envelope (Outer Fit)", "Resize and Fill"),
    (0, "Just Resize"), (1, "Crop and Resize"), (2, "Resize and Fill"), ("just resize", "Just Resize"),
])
def test_resize_mode_spellings(given, expected):
    assert cn.unit_from_dict({"resize_mode": given}).resize_mode == expected


@pytest.mark.parametrize("given, expected", [
    (0, "Balanced"), (1, "My prompt is more important"), (2, "ControlNet is more important"),
    ("ControlNet is more important", "ControlNet is more important"),
])
def test_control_mode_spellings(given, expected):
    u = cn.unit_from_dict({"control_mode": given})
    assert u.control_mode == expected
    assert u.soft_injection == (expected != "Balanced")
    assert u.cfg_injection == (expected == "ControlNet is more important")


def test_aliases():
    u = cn.unit_from_dict({"input_image": "aW1n", "mask_image": "bWFzaw==", "guidance": 0.4, "lowvram": True})
    assert (u.image, u.mask, u.guidance_end, u.low_vram) == ("aW1n", "bWFzaw==", 0.4, True)
    with pytest.raises(cn.ControlNetError, match="guidance_end"):
        cn.unit_from_dict({"guidance": 0.4, "guidance_end": 0.5})


def test_image_forms():
    assert cn.unit_from_dict({"image": {"image": "a", "mask": "b"}}).mask == "b"
    assert cn.unit_from_dict({"image": ["a", "b"]}).image == "a"
    assert cn.unit_from_dict({"image": [{"image": "a", "mask": "m"}]}).mask == "m"
    with pytest.raises(cn.ControlNetError, match=r"unit 0\.image"):
        cn.unit_from_dict({"image": 5})


@pytest.mark.parametrize("field, value, words", [
    ("weight", 2.5, "weight: must be from 0 to 2"), ("weight", "heavy", "weight: expected a number"),
    ("guidance_start", -0.1, "guidance_start: must be from 0 to 1"), ("processor_res", 1.5, "whole number"),
    ("control_mode", "Loud", "control_mode: must be one of"), ("resize_mode", 7, "index 7 is out of range"),
    ("hr_option", "Sometimes", "hr_option"), ("weight", float("nan"), "finite"), ("pixel_perfect", "maybe", "true or false"),
])
def test_bad_values_name_unit_and_field(field, value, words):
    with pytest.raises(cn.ControlNetError, match=words) as info:
        cn.units_from([{}, {field: value}])
    assert "unit 1" in str(info.value)


def test_start_after_end():
    with pytest.raises(cn.ControlNetError, match="guidance_start .* is after guidance_end"):
        cn.unit_from_dict({"guidance_start": 0.8, "guidance_end": 0.2})


def test_unknown_keys_ignored_and_unit_limit():
    assert cn.unit_from_dict({"animatediff_batch": True, "whatever": 1}).module == "none"
    with pytest.raises(cn.ControlNetError, match="at most"):
        cn.units_from([{}] * (cn.MAX_UNIT_COUNT + 1))


def test_infotext_value_is_the_extensions_serialization():
    u = cn.unit_from_dict({"enabled": True, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]",
                           "processor_res": 512, "threshold_a": 100, "threshold_b": 200})
    assert u.infotext() == ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, "
                            "Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, "
                            "Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced")


def test_infotext_numbers_enabled_units_and_round_trips():
    catalog = scripts.builtin()
    units = [{"enabled": False, "module": "depth"}, {"enabled": True, "module": "canny", "model": "a [12345678]",
                                                     "weight": 0.5, "control_mode": 2, "guidance_end": 0.75},
             {"enabled": True, "module": "invert", "model": "b", "pixel_perfect": True}]
    args = catalog.parse("ControlNet", {"units": units})
    pairs = catalog.infotext_pairs("ControlNet", args)
    assert list(pairs) == ["ControlNet 0", "ControlNet 1"]  # numbered over the enabled units
    assert pairs["ControlNet 0"].startswith("Module: canny, Model: a [12345678], Weight: 0.5")
    text = infotext.format({"Prompt": "a cat", "Steps": 20, **pairs})
    assert 'ControlNet 0: "Module: canny' in text  # quoted: the value holds commas
    _, alwayson, used = catalog.from_infotext_pairs(infotext.parse(text))
    assert used == {"ControlNet 0", "ControlNet 1"}
    back = alwayson["ControlNet"]["units"]
    assert [u["module"] for u in back] == ["canny", "invert"]
    assert back[0]["control_mode"] == "ControlNet is more important" and back[0]["guidance_end"] == 0.75
    assert back[1]["pixel_perfect"] is True and all(u["enabled"] for u in back)


def test_script_parses_the_a1111_list_and_our_dict():
    catalog = scripts.builtin()
    listed = catalog.from_a1111_list("controlnet", [{"enabled": True, "module": "canny", "model": "m"}, {}])
    assert [u["enabled"] for u in listed["units"]] == [True, False]
    assert catalog.get("controlnet").name == "ControlNet"
    with pytest.raises(scripts.ScriptError, match="unit 0.weight"):
        catalog.parse("ControlNet", {"units": [{"weight": 3}]})


def test_request_validation_names_the_unit():
    req = Txt2ImgRequest(prompt="x", alwayson_scripts={"ControlNet": {"units": [{"enabled": True, "weight": -1}]}})
    with pytest.raises(RequestError, match="ControlNet unit 0.weight"):
        req.validate()


def test_xyz_axes_set_the_first_unit():
    axes = scripts.builtin().axes()
    req = Txt2ImgRequest(prompt="x", alwayson_scripts={"ControlNet": {"units": [
        {"enabled": False, "module": "canny", "weight": 1.0}, {"enabled": True, "module": "invert"}]}})
    out = axes["[ControlNet] Weight"].apply(req, 0.25, [0.25])
    first, second = out.alwayson_scripts["ControlNet"]["units"]
    assert (first["weight"], first["enabled"], first["module"]) == (0.25, True, "canny")
    assert second["module"] == "invert"
    empty = axes["[ControlNet] Guidance End"].apply(Txt2ImgRequest(prompt="x"), 0.5, [0.5])
    assert empty.alwayson_scripts["ControlNet"]["units"][0]["guidance_end"] == 0.5


def test_preprocessor_resolves_out_of_range_values_to_defaults():
    p = cn.Preprocessor("canny", resolution=cn.Slider("Resolution", 512, 64, 2048),
                        threshold_a=cn.Slider("Low", 100, 1, 255), threshold_b=cn.Slider("High", 200, 1, 255))
    assert p.resolved(-1, -1, -1) == (512, 100.0, 200.0)
    assert p.resolved(768, 50, 300) == (768, 50.0, 200.0)
    assert p.detail()["sliders"][1] == {"name": "Low", "value": 100, "min": 1, "max": 255, "step": 1.0}
