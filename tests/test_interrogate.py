"""Interrogation backends on tiny random-weight BLIP / CLIP / ViT-tagger folders built here."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from sdstudio.core.interrogate_terms import CATEGORIES, FLAVORS, MEDIUMS, MOVEMENTS
from sdstudio.engine.interrogate import Interrogators
from sdstudio.models.errors import ModelFileError, ModelNotFoundError
from sdstudio.testing.synthetic import _CAPTION_WORDS, _TAGGER_TAGS, write_interrogators


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_interrogators(tmp_path_factory.mktemp("interrogate") / "models")


def picture(colour=(200, 20, 20)):
    im = Image.new("RGB", (80, 60), (20, 40, 160))
    ImageDraw.Draw(im).ellipse((20, 10, 60, 50), fill=colour)
    return im


def test_clip_interrogator_caption_then_ranked_terms(models):
    engine = Interrogators(models, torch.device("cpu"))
    text = engine.interrogate(picture(), "clip")
    parts = text.split(", ")
    caption, medium, movement, *flavors = parts
    assert set(caption.split()) <= set(_CAPTION_WORDS) and caption  # BLIP decoded words of its vocabulary
    assert medium in MEDIUMS and movement in MOVEMENTS and len(flavors) == 3 and set(flavors) <= set(FLAVORS)
    assert engine.interrogate(picture(), "clip") == text  # deterministic
    ranked = engine.get("clip").rank(picture())
    assert [name for name, _ in ranked] == [c[0] for c in CATEGORIES]
    scores = [s for _, matches in ranked for _, s in matches]
    other = [s for _, matches in engine.get("clip").rank(picture((20, 200, 20))) for _, s in matches]
    assert scores != other  # the ranking looks at the picture


def test_tagger_gives_tags_over_the_threshold_best_first(models):
    engine = Interrogators(models, torch.device("cpu"))
    tagger = engine.get("deepdanbooru")
    tags = tagger.tags(picture())
    assert tags and all(t in {x.replace("_", " ") for x in _TAGGER_TAGS} for t, _ in tags)
    assert [s for _, s in tags] == sorted((s for _, s in tags), reverse=True) and min(s for _, s in tags) >= 0.5
    assert engine.interrogate(picture(), "deepdanbooru") == ", ".join(t for t, _ in tags)
    tagger.threshold = 0.0
    assert len(tagger.tags(picture())) == len(_TAGGER_TAGS)


def test_missing_or_broken_models_say_what_to_do(tmp_path, models):
    engine = Interrogators(tmp_path / "models", torch.device("cpu"))
    with pytest.raises(ModelNotFoundError, match="BLIP.*models/BLIP"):
        engine.interrogate(picture(), "clip")
    with pytest.raises(ModelNotFoundError, match="deepbooru"):
        engine.interrogate(picture(), "deepdanbooru")
    with pytest.raises(ModelNotFoundError, match="use one of clip, deepdanbooru"):
        engine.interrogate(picture(), "wd14")
    broken = tmp_path / "broken"
    (broken / "deepbooru").mkdir(parents=True)
    (broken / "deepbooru" / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="could not be loaded"):
        Interrogators(broken, torch.device("cpu")).interrogate(picture(), "deepdanbooru")


def test_api_and_cli(models, data_dir, capsys):
    import base64
    import io
    import shutil

    from fastapi.testclient import TestClient

    from sdstudio.cli import build_parser, main
    from sdstudio.server import create_app

    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui"])
    app = create_app(args)
    buf = io.BytesIO()
    picture().save(buf, format="PNG")
    body = {"image": base64.b64encode(buf.getvalue()).decode()}
    with TestClient(app) as client:
        r = client.post("/sdapi/v1/interrogate", json=body)
        assert r.status_code == 404 and "models/BLIP" in r.json()["detail"]
        for name in ("BLIP", "CLIP", "deepbooru"):
            shutil.copytree(models / name, data_dir / "models" / name)
        r = client.post("/sdapi/v1/interrogate", json=body)
        assert r.status_code == 200 and r.json()["caption"].count(", ") == 5
        r = client.post("/sdapi/v1/interrogate", json={**body, "model": "deepdanbooru"})
        assert r.status_code == 200 and r.json()["caption"]
    app.state.service.stop()
    picture().save(data_dir / "p.png")
    assert main(["interrogate", str(data_dir / "p.png"), "--model", "deepdanbooru", "--data-dir", str(data_dir)]) == 0
    assert capsys.readouterr().out.strip() == r.json()["caption"]
