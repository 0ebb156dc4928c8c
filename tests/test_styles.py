import numpy as np
import pytest

from sdstudio.core import infotext, styles
from sdstudio.core.params import RequestError, Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine


def test_merge_rule():
    assert styles.merge("{prompt}, masterpiece", "a cat") == "a cat, masterpiece"
    assert styles.merge("oil painting", "a cat") == "a cat, oil painting"
    assert styles.merge("oil painting", "") == "oil painting"
    assert styles.merge("", "a cat") == "a cat"


def test_csv_round_trip_and_apply(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text('name,prompt,negative_prompt\n"Cinema","{prompt}, film grain, ""35mm""","blurry"\nPlain,,\n',
                    encoding="utf-8")
    loaded = styles.load(path)
    assert list(loaded) == ["Cinema", "Plain"] and loaded["Cinema"].prompt == '{prompt}, film grain, "35mm"'
    styles.save(path, {**loaded, "New": styles.Style("New", "neon", "dark")})
    again = styles.load(path)
    assert again["Cinema"] == loaded["Cinema"] and again["New"].negative_prompt == "dark"
    p, n = styles.apply("a cat", "ugly", ["Cinema", "New"], again)
    assert p == 'a cat, film grain, "35mm", neon' and n == "ugly, blurry, dark"
    with pytest.raises(RequestError, match="no style named 'Nope'; available: Cinema"):
        styles.apply("x", "", ["Nope"], again)
    assert styles.load(tmp_path / "missing.csv") == {}


def test_engine_applies_styles_and_infotext_recreates_without_them(data_dir):
    (data_dir / "styles.csv").write_text("name,prompt,negative_prompt\nBlue,{prompt} on a blue background,red\n")
    engine = Engine(Paths(data_dir))
    base = {"prompt": "a circle", "steps": 2, "width": 64, "height": 64, "seed": 3}
    styled = engine.generate(Txt2ImgRequest(**base, styles=["Blue"]))
    p = infotext.parse(styled.images[0].infotext)
    assert p["Prompt"] == "a circle on a blue background" and p["Negative prompt"] == "red"
    direct = engine.generate(Txt2ImgRequest(**{**base, "prompt": "a circle on a blue background"}, negative_prompt="red"))
    assert np.array_equal(np.asarray(styled.images[0].image), np.asarray(direct.images[0].image))
    (data_dir / "styles.csv").unlink()
    again = engine.generate(from_infotext(styled.images[0].infotext))
    assert np.array_equal(np.asarray(again.images[0].image), np.asarray(styled.images[0].image))


def test_style_is_applied_once():
    style = styles.Style("S", "{prompt}, masterpiece", "lowres")
    p, n = styles.apply("a cat", "", ["S"], {"S": style})
    assert (p, n) == ("a cat, masterpiece", "lowres")
    assert styles.apply(p, n, ["S"], {"S": style}) == (p, n)  # re-applying to a pasted, styled prompt
    plain = styles.Style("P", "oil painting")
    once = styles.apply("a cat", "", ["P"], {"P": plain})[0]
    assert styles.apply(once, "", ["P"], {"P": plain})[0] == "a cat, oil painting"


def test_cli_and_api_edit_styles(data_dir, capsys):
    from fastapi.testclient import TestClient

    from sdstudio.cli import build_parser, main
    from sdstudio.server import create_app

    assert main(["styles", "save", "Neon", "--prompt", "{prompt}, neon", "--negative", "dull",
                 "--data-dir", str(data_dir)]) == 0
    assert main(["styles", "--data-dir", str(data_dir)]) == 0
    assert "Neon\tprompt: {prompt}, neon\tnegative: dull" in capsys.readouterr().out
    api = TestClient(create_app(build_parser().parse_args(["serve", "--api", "--nowebui", "--data-dir", str(data_dir)])))
    assert api.post("/sdstudio/v1/styles", json={"name": "Ink", "prompt": "ink drawing"}).status_code == 200
    assert [s["name"] for s in api.get("/sdapi/v1/prompt-styles").json()] == ["Neon", "Ink"]
    assert api.delete("/sdstudio/v1/styles/Neon").status_code == 200
    assert api.delete("/sdstudio/v1/styles/Neon").status_code == 404
    assert main(["styles", "delete", "Ghost", "--data-dir", str(data_dir)]) == 2
    assert [s.name for s in styles.load(data_dir / "styles.csv").values()] == ["Ink"]
