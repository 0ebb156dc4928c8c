"""The minimal txt2img page's handler (the page itself is served in test_server)."""

import datetime

import gradio as gr
import pytest

from sdstudio.core import infotext
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.ui.txt2img_page import build, generate


def test_generate_saves_images_and_returns_infotext(service):
    seen = []
    paths, text = generate(service, "ui:a", Txt2ImgRequest(prompt="a red circle", steps=2, width=64, height=64,
                                                           seed=9, batch_size=2),
                           progress=lambda fraction, desc: seen.append((round(fraction, 2), desc)))
    day = datetime.date.today().isoformat()
    assert [p.split("/")[-1] for p in paths] == ["00000-9.png", "00001-10.png"]
    assert all(f"txt2img-images/{day}" in p for p in paths)
    assert infotext.parse(text)["Seed"] == "9"
    assert any(desc.startswith("step ") for _, desc in seen)


def test_bad_input_is_a_page_message(service):
    with pytest.raises(gr.Error, match="width must be a multiple of 8"):
        generate(service, "ui:a", Txt2ImgRequest(prompt="x", width=65))


def test_page_builds(service):
    assert isinstance(build(service), gr.Blocks)
