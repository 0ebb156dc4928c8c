"""Token chunking as A1111 does it (75 per chunk, comma back-off within the last 20 tokens)."""

import pytest
import torch

from sdstudio.engine.conditioning import (
    BREAK_TOKEN,
    CHUNK,
    COMMA,
    TextConditioner,
    chunk_tokens,
    token_count,
    weighted_tokens,
)
from sdstudio.models.loader import clip_tokenizer, load_checkpoint


def test_short_and_empty():
    assert chunk_tokens([]) == [([], [], [])]
    assert chunk_tokens([5, 6]) == [([5, 6], [1.0, 1.0], [])]


def test_exact_fill_then_overflow():
    chunks = chunk_tokens(list(range(1000, 1000 + CHUNK)))
    assert len(chunks) == 1
    chunks = chunk_tokens(list(range(1000, 1000 + CHUNK + 1)))
    assert [len(c[0]) for c in chunks] == [75, 1]


def test_comma_backoff_within_last_20():
    tokens = [1] * 60 + [COMMA] + [2] * 20  # comma at index 60: 15 tokens after it when the chunk fills
    chunks = chunk_tokens(tokens)
    assert chunks[0][0] == [1] * 60 + [COMMA]
    assert chunks[1][0] == [2] * 20


def test_no_backoff_when_comma_is_too_early():
    tokens = [1] * 40 + [COMMA] + [2] * 50
    chunks = chunk_tokens(tokens)
    assert len(chunks[0][0]) == 75 and len(chunks[1][0]) == 16


def test_comma_arriving_at_a_full_chunk_starts_the_next():
    tokens = [1] * 75 + [COMMA] + [2] * 3
    chunks = chunk_tokens(tokens)
    assert chunks[0][0] == [1] * 75 and chunks[1][0] == [COMMA, 2, 2, 2]


def test_weights_follow_their_tokens():
    tokens = [1] * 60 + [COMMA] + [2] * 20
    weights = [1.0] * 61 + [1.5] * 20
    chunks = chunk_tokens(tokens, weights)
    assert chunks[1][1] == [1.5] * 20


# ---- with a real tokenizer and the tiny model ------------------------------------------------------


@pytest.fixture(scope="module")
def conditioner(tiny_sd1):
    return TextConditioner(load_checkpoint(tiny_sd1), torch.device("cpu"))


def test_weighted_tokens():
    tok = clip_tokenizer()
    tokens, weights = weighted_tokens(tok, "a (red:1.5) circle BREAK blue")
    assert tokens == [320, 736, 7117, BREAK_TOKEN, 1746]
    assert weights == [1.0, 1.5, 1.0, 1.0, 1.0]
    tokens, _ = weighted_tokens(tok, "(a BREAK b)")  # a weighted BREAK is just a word
    assert BREAK_TOKEN not in tokens and len(tokens) == 3


def test_break_starts_a_new_chunk():
    tok = clip_tokenizer()
    chunks = chunk_tokens(*weighted_tokens(tok, "a red circle BREAK blue background"))
    assert [len(c[0]) for c in chunks] == [3, 2]
    assert [len(c[0]) for c in chunk_tokens(*weighted_tokens(tok, "BREAK a"))] == [0, 1]


def test_token_counter():
    tok = clip_tokenizer()
    assert token_count(tok, "") == (0, 75)
    assert token_count(tok, "a photo of a cat") == (5, 75)
    assert token_count(tok, "red " * 80) == (80, 150)
    assert token_count(tok, "a BREAK b") == (76, 150)


def test_emphasis_scales_tokens_and_keeps_the_mean(conditioner):
    plain = conditioner.encode("a red circle").crossattn
    weighted = conditioner.encode("a (red:1.5) circle").crossattn
    assert weighted.shape == plain.shape == (1, 77, 64)
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)
    ratio = plain.mean() / (plain * torch.tensor([1, 1, 1.5] + [1] * 74)[None, :, None]).mean()
    assert torch.allclose(weighted[0, 2], plain[0, 2] * 1.5 * ratio, atol=1e-5)  # token 2 is "red"
    assert torch.allclose(weighted[0, 1], plain[0, 1] * ratio, atol=1e-5)
    assert torch.equal(conditioner.encode("(a red circle:1)").crossattn, plain)


def test_break_and_long_prompts_make_more_chunks(conditioner):
    assert conditioner.encode("a BREAK b").crossattn.shape[1] == 154
    assert conditioner.encode("red, " * 50).crossattn.shape[1] == 154


def test_clip_skip_changes_hidden_states(conditioner):
    assert not torch.allclose(conditioner.encode("a red circle", 1).crossattn,
                              conditioner.encode("a red circle", 2).crossattn)


def test_clip_skip_takes_that_hidden_layer_then_the_final_norm(conditioner):
    """A1111 (SD 1.x): clip skip N is the N-th last hidden state with the text model's final layer norm
    applied (1: CLIP's own last_hidden_state). Reference: transformers' hidden states and final_layer_norm,
    on the tokenizer's own padding to 77 (BOS, tokens, EOS, EOS...)."""
    encoder = conditioner.model.text_encoders[0]
    ids = clip_tokenizer()("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(input_ids=ids, output_hidden_states=True)
        norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 5 has no text_model level
        assert torch.allclose(conditioner.encode("a red circle", 1).crossattn, out.last_hidden_state, atol=1e-5)
        for skip in (2, 3):
            want = norm(out.hidden_states[-skip])
            assert torch.allclose(conditioner.encode("a red circle", skip).crossattn, want, atol=1e-5), skip
    # the norm and the layer both matter: neither the bare penultimate state nor the next layer's is it
    assert not torch.allclose(norm(out.hidden_states[-2]), out.hidden_states[-2], atol=1e-2)
    assert not torch.allclose(norm(out.hidden_states[-2]), norm(out.hidden_states[-3]), atol=1e-2)
