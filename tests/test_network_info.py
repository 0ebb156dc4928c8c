import json

import torch
from safetensors.torch import save_file

from sdstudio.models.network_info import network_info, top_tags


def test_kohya_metadata_gives_alias_and_trigger_words(tmp_path):
    freq = {"10_stripes": {"stripes": 40, "red circle": 12, "blue": 30}, "5_other": {"stripes": 5, "zigzag": 1}}
    save_file({"w": torch.zeros(1)}, str(tmp_path / "s.safetensors"),
              metadata={"ss_output_name": "StripesStyle", "ss_tag_frequency": json.dumps(freq)})
    info = network_info(tmp_path / "s.safetensors")
    assert info.alias == "StripesStyle" and info.trigger_words[:3] == ["stripes", "blue", "red circle"]
    assert info.preview is None


def test_user_json_and_civitai_take_precedence(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "a.safetensors"), metadata={"ss_tag_frequency": "{}"})
    (tmp_path / "a.civitai.info").write_text(json.dumps({"trainedWords": ["zzz style"]}))
    assert network_info(tmp_path / "a.safetensors").trigger_words == ["zzz style"]
    (tmp_path / "a.json").write_text(json.dumps({"activation text": "stripes, bold", "preferred weight": "0.7",
                                                 "notes": "mine"}))
    (tmp_path / "a.preview.png").write_bytes(b"png")
    info = network_info(tmp_path / "a.safetensors")
    assert info.trigger_words == ["stripes", "bold"] and info.preferred_weight == 0.7 and info.notes == "mine"
    assert info.preview == tmp_path / "a.preview.png"


def test_bad_metadata_is_ignored(tmp_path):
    assert top_tags("not json") == []
    (tmp_path / "b.json").write_text("{broken")
    (tmp_path / "b.safetensors").write_bytes(b"junk")
    info = network_info(tmp_path / "b.safetensors")
    assert info.trigger_words == [] and info.alias == "b"
