"""Prompt text -> the tensors that condition the UNet, as A1111 builds them.

Tokens are cut into chunks of 75 (each wrapped in BOS/EOS to 77); when a chunk fills, it is cut
back to its last comma if that comma lies within the last 20 tokens. Chunks are encoded separately
and concatenated along the sequence axis. Per-token weights multiply the hidden states, after which
the tensor is rescaled to its original mean (A1111's "Original" emphasis). Clip skip N takes the
N-th last hidden layer and applies the final layer norm (SD 1.x); SD 2.x uses its penultimate layer;
SDXL concatenates the penultimate layers of both encoders and adds the pooled, projected output of
the second.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..core.prompt import parse_attention
from ..models.embeddings import Embedding
from ..models.loader import LoadedModel

CHUNK = 75
BREAK_TOKEN = -1  # stands for BREAK in a token list: the current chunk ends there
COMMA_BACKTRACK = 20
BOS, EOS = 49406, 49407
COMMA = 267  # ",</w>"


@dataclass
class Conditioning:
    crossattn: torch.Tensor  # [1, 77 * chunks, width]
    pooled: torch.Tensor | None = None  # [1, projection] for SDXL


@dataclass(frozen=True)
class EmbeddingRef:
    """An embedding's place in a token stream: it occupies ``embedding.count`` token slots."""

    embedding: Embedding


class Chunk(NamedTuple):
    tokens: list[int]  # at most 75 ids; embedding slots hold 0
    weights: list[float]
    fixes: list[tuple[int, Embedding]]  # (position in chunk, embedding) to write over the placeholder slots


def chunk_tokens(tokens: list, weights: list[float] | None = None) -> list[Chunk]:
    """Split a token stream into chunks of at most 75 with A1111's comma back-off. :data:`BREAK_TOKEN`
    closes the current chunk (even an empty one, which becomes all padding); an :class:`EmbeddingRef`
    that does not fit in the current chunk starts the next one."""
    weights = weights or [1.0] * len(tokens)
    chunks: list[Chunk] = []
    cur = Chunk([], [], [])
    last_comma = -1

    def close(chunk: Chunk) -> Chunk:
        chunks.append(chunk)
        return Chunk([], [], [])

    for tok, w in zip(tokens, weights):
        if tok == BREAK_TOKEN:
            cur, last_comma = close(cur), -1
            continue
        if tok == COMMA:
            last_comma = len(cur.tokens)
        elif len(cur.tokens) == CHUNK and last_comma != -1 and len(cur.tokens) - last_comma <= COMMA_BACKTRACK:
            cut = last_comma + 1  # move the words after the last comma to the next chunk
            close(Chunk(cur.tokens[:cut], cur.weights[:cut], [f for f in cur.fixes if f[0] < cut]))
            cur = Chunk(cur.tokens[cut:], cur.weights[cut:], [(p - cut, e) for p, e in cur.fixes if p >= cut])
            last_comma = -1
        if len(cur.tokens) == CHUNK:
            cur, last_comma = close(cur), -1
        if isinstance(tok, EmbeddingRef):
            n = tok.embedding.count
            if len(cur.tokens) + n > CHUNK:
                cur, last_comma = close(cur), -1
            cur.fixes.append((len(cur.tokens), tok.embedding))
            cur.tokens.extend([0] * n)
            cur.weights.extend([w] * n)
            continue
        cur.tokens.append(tok)
        cur.weights.append(w)
    if cur.tokens or not chunks:
        chunks.append(cur)
    return chunks


EmbeddingLookup = dict[int, list[tuple[list[int], Embedding]]]


def embedding_lookup(tokenizer, embeddings: dict[str, Embedding]) -> EmbeddingLookup:
    """First token id of each embedding's name -> [(name ids, embedding)], longest names first."""
    lookup: EmbeddingLookup = {}
    for name, emb in embeddings.items():
        ids = tokenizer(name, add_special_tokens=False, truncation=False).input_ids
        if ids:
            lookup.setdefault(ids[0], []).append((ids, emb))
    for entries in lookup.values():
        entries.sort(key=lambda e: -len(e[0]))
    return lookup


def weighted_tokens(tokenizer, text: str, embeddings: EmbeddingLookup | None = None, *,
                    novelai_braces: bool = False) -> tuple[list, list[float]]:
    """Token ids and per-token weights of a prompt in the A1111 language (emphasis, BREAK, embeddings by
    name). Only an unweighted BREAK (-1) breaks; inside brackets A1111 reads it as the word "BREAK"."""
    tokens: list = []
    weights: list[float] = []
    for run, weight in parse_attention(text, novelai_braces=novelai_braces):
        if run == "BREAK" and weight == -1:
            tokens.append(BREAK_TOKEN)
            weights.append(1.0)
            continue
        ids = tokenizer(run, add_special_tokens=False, truncation=False).input_ids
        pos = 0
        while pos < len(ids):
            match = next(((n, e) for n, e in (embeddings or {}).get(ids[pos], []) if ids[pos:pos + len(n)] == n), None)
            if match:
                tokens.append(EmbeddingRef(match[1]))
                pos += len(match[0])
            else:
                tokens.append(ids[pos])
                pos += 1
            weights.append(weight)
    return tokens, weights


def token_count(tokenizer, text: str, embeddings: EmbeddingLookup | None = None) -> tuple[int, int]:
    """(tokens used, token limit) as A1111's counter shows them: ``12/75``, ``80/150``."""
    chunks = chunk_tokens(*weighted_tokens(tokenizer, text, embeddings))
    used = CHUNK * (len(chunks) - 1) + len(chunks[-1].tokens)
    return used, max(CHUNK, -(-max(used, 1) // CHUNK) * CHUNK)


def _token_embedding(encoder) -> torch.nn.Module:
    inner = encoder.text_model if hasattr(encoder, "text_model") else encoder
    return inner.embeddings.token_embedding


class TextConditioner:
    """Encodes prompts with one loaded model's text encoders (and the embeddings that fit it)."""

    def __init__(self, model: LoadedModel, device: torch.device, embeddings: dict[str, Embedding] | None = None):
        self.model = model
        self.device = device
        self.embeddings = embedding_lookup(model.tokenizers[0], embeddings or {})
        self.used_embeddings: dict[str, Embedding] = {}  # filled while encoding: for ``TI hashes``

    def _hidden(self, encoder_index: int, ids: torch.Tensor, clip_skip: int, fixes):
        spec = self.model.spec.text_encoders[encoder_index]
        encoder = self.model.text_encoders[encoder_index]
        with self._write_embeddings(encoder, fixes):
            out = encoder(input_ids=ids, output_hidden_states=True)
        layer = -clip_skip if self.model.spec.family == "sd1" else spec.hidden_layer
        z = out.hidden_states[layer]
        if spec.final_norm:
            final_norm = encoder.final_layer_norm if hasattr(encoder, "final_layer_norm") else \
                encoder.text_model.final_layer_norm
            z = final_norm(z)
        pooled = getattr(out, "text_embeds", None)
        return z, pooled

    @contextlib.contextmanager
    def _write_embeddings(self, encoder, fixes):
        """Put the embeddings' vectors in place of their placeholder tokens for one forward pass."""
        if not fixes:
            yield
            return
        layer = _token_embedding(encoder)
        width = layer.weight.shape[1]

        def hook(module, args, output):
            output = output.clone()
            for pos, emb in fixes:
                vectors = emb.for_width(width).to(output.device, output.dtype)
                output[:, 1 + pos:1 + pos + vectors.shape[0]] = vectors  # +1: after the BOS token
            return output

        handle = layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def encode(self, text: str, clip_skip: int = 1, *, emphasis: str = "Original",
               novelai_braces: bool = False) -> Conditioning:
        """Encode one prompt (no AND, no scheduling: those are resolved before)."""
        tokens, weights = weighted_tokens(self.model.tokenizers[0], text, self.embeddings,
                                          novelai_braces=novelai_braces)
        zs, pooled = [], None
        for i, chunk in enumerate(chunk_tokens(tokens, weights)):
            for _, emb in chunk.fixes:
                self.used_embeddings[emb.name] = emb
            pad = CHUNK - len(chunk.tokens)
            parts = []
            for e, spec in enumerate(self.model.spec.text_encoders):
                pad_id = EOS if spec.pad_token == "<|endoftext|>" else 0
                ids = torch.tensor([[BOS] + chunk.tokens + [EOS] + [pad_id] * pad], device=self.device)
                z, pool = self._hidden(e, ids, clip_skip, chunk.fixes)
                parts.append(z)
                if i == 0 and pool is not None:
                    pooled = pool
            z = torch.cat(parts, dim=-1)
            w = torch.tensor([1.0] + chunk.weights + [1.0] * (pad + 1), device=z.device, dtype=z.dtype)
            if emphasis != "None" and not torch.all(w == 1):
                original_mean = z.mean()
                z = z * w[None, :, None]
                if emphasis == "Original":
                    z = z * (original_mean / z.mean())
            zs.append(z)
        return Conditioning(torch.cat(zs, dim=1), pooled)


def empty_prompt(model: LoadedModel, device: torch.device, clip_skip: int = 1) -> Conditioning:
    """The empty prompt's encoding, the filler of A1111's "Pad prompt/negative prompt" (its
    ``cond_stage_model_empty_prompt``). A1111 encodes it once, when the model loads; it is kept with the
    loaded model here too (per clip skip), so a LoRA active in a later job does not change it. The text
    encoders must be where ``device`` says."""
    cache = model.extras.setdefault("empty_prompt", {})
    if clip_skip not in cache:
        cache[clip_skip] = TextConditioner(model, device).encode("", clip_skip)
    return cache[clip_skip]
