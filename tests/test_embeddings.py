"""Textual-inversion embeddings: file formats, placement in chunks, use by name, TI hashes."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdstudio.core import infotext
from sdstudio.core.params import Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine.conditioning import (
    EmbeddingRef,
    TextConditioner,
    chunk_tokens,
    embedding_lookup,
    weighted_tokens,
)
from sdstudio.engine.generate import Engine
from sdstudio.models.embeddings import EmbeddingLibrary, load_embedding
from sdstudio.models.errors import ModelFileError
from sdstudio.models.loader import clip_tokenizer, load_checkpoint

BASE = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64, "seed": 42}


def a1111_pt(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
                "name": path.stem, "step": 3000, "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, path)
    return path


def test_formats(tmp_path):
    v = torch.randn(3, 64)
    assert torch.equal(load_embedding(a1111_pt(tmp_path / "a.pt", v)).vectors[0], v)
    save_file({"emb_params": v}, str(tmp_path / "b.safetensors"))
    assert torch.equal(load_embedding(tmp_path / "b.safetensors").vectors[0], v)
    torch.save({"<c>": v[0]}, tmp_path / "c.bin")
    assert load_embedding(tmp_path / "c.bin").vectors[0].shape == (1, 64)
    save_file({"clip_l": torch.randn(2, 64), "clip_g": torch.randn(2, 128)}, str(tmp_path / "d.safetensors"))
    emb = load_embedding(tmp_path / "d.safetensors")
    assert emb.for_width(64).shape == (2, 64) and emb.for_width(128).shape == (2, 128) and emb.for_width(768) is None
    save_file({"x": torch.zeros(1), "y": torch.zeros(1)}, str(tmp_path / "e.safetensors"))
    with pytest.raises(ModelFileError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "e.safetensors")


def test_embedding_found_by_name_and_placed_whole(tmp_path):
    tok = clip_tokenizer()
    emb = load_embedding(a1111_pt(tmp_path / "my-style.pt", torch.randn(70, 64)))
    lookup = embedding_lookup(tok, {"my-style": emb})
    tokens, weights = weighted_tokens(tok, "a red circle (my-style:1.2)", lookup)
    assert tokens[:3] == [320, 736, 7117] and tokens[3] == EmbeddingRef(emb) and weights[3] == 1.2
    chunks = chunk_tokens(*weighted_tokens(tok, "word " * 10 + "my-style", lookup))
    assert [len(c.tokens) for c in chunks] == [10, 70]  # 10 + 70 > 75: the embedding starts a new chunk
    assert chunks[1].fixes == [(0, emb)]


def test_vectors_reach_the_encoder(tmp_path, tiny_sd1):
    model = load_checkpoint(tiny_sd1)
    emb = load_embedding(a1111_pt(tmp_path / "thing.pt", torch.randn(2, 64)))
    with_emb = TextConditioner(model, torch.device("cpu"), {"thing": emb})
    without = TextConditioner(model, torch.device("cpu"))
    a = with_emb.encode("a thing").crossattn
    b = without.encode("a thing").crossattn
    assert not torch.allclose(a, b)
    assert with_emb.used_embeddings == {"thing": emb}
    # the hook is gone afterwards: encoding without the embedding is unaffected
    assert torch.equal(without.encode("a thing").crossattn, b)


def test_engine_uses_embeddings_in_negative_prompt_and_records_hashes(data_dir, caplog):
    emb_dir = data_dir / "embeddings"
    emb_dir.mkdir()
    a1111_pt(emb_dir / "EasyNegative.pt", torch.randn(4, 64) * 3)
    save_file({"emb_params": torch.randn(1, 768)}, str(emb_dir / "sd15-only.safetensors"))  # wrong width
    engine = Engine(Paths(data_dir))
    plain = engine.generate(Txt2ImgRequest(**{**BASE, "negative_prompt": "EasyNegative"}))
    os.rename(emb_dir / "EasyNegative.pt", emb_dir / "Other.pt")  # now "EasyNegative" is plain text again
    as_text = engine.generate(Txt2ImgRequest(**{**BASE, "negative_prompt": "EasyNegative"}))
    assert not np.array_equal(np.asarray(plain.images[0].image), np.asarray(as_text.images[0].image))
    os.rename(emb_dir / "Other.pt", emb_dir / "EasyNegative.pt")
    p = infotext.parse(plain.images[0].infotext)
    assert p["TI hashes"].startswith("EasyNegative: ") and len(p["TI hashes"].split(": ")[1]) == 12
    again = engine.generate(from_infotext(plain.images[0].infotext))
    assert np.array_equal(np.asarray(again.images[0].image), np.asarray(plain.images[0].image))
    with caplog.at_level(logging.WARNING):
        r = engine.generate(Txt2ImgRequest(**{**BASE, "prompt": "sd15-only circle"}))
    assert "TI hashes" not in r.images[0].infotext
    assert "sd15-only does not fit this model" in caplog.text


def test_library_lists_and_refreshes(tmp_path):
    lib = EmbeddingLibrary(tmp_path)
    assert lib.names() == []
    save_file({"emb_params": torch.randn(1, 64)}, str(tmp_path / "new.safetensors"))
    assert lib.names() == ["new"]


def test_pasted_infotext_finds_a_renamed_embedding_by_hash(data_dir):
    emb_dir = data_dir / "embeddings"
    emb_dir.mkdir()
    a1111_pt(emb_dir / "badhands.pt", torch.randn(3, 64) * 2)
    engine = Engine(Paths(data_dir))
    first = engine.generate(Txt2ImgRequest(**{**BASE, "negative_prompt": "badhands"}))
    os.rename(emb_dir / "badhands.pt", emb_dir / "bad-hands-v2.pt")
    again = engine.generate(from_infotext(first.images[0].infotext))
    assert np.array_equal(np.asarray(again.images[0].image), np.asarray(first.images[0].image))
    assert infotext.parse(again.images[0].infotext)["TI hashes"] == infotext.parse(first.images[0].infotext)["TI hashes"]
