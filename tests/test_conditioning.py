"""Token chunking as A1111 does it (75 per chunk, comma back-off within the last 20 tokens)."""

from sdstudio.engine.conditioning import CHUNK, COMMA, chunk_tokens


def test_short_and_empty():
    assert chunk_tokens([]) == [([], [])]
    assert chunk_tokens([5, 6]) == [([5, 6], [1.0, 1.0])]


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
