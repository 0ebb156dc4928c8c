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

from dataclasses import dataclass

import torch

from ..core.prompt import parse_attention
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


def chunk_tokens(tokens: list[int], weights: list[float] | None = None) -> list[tuple[list[int], list[float]]]:
    """Split token ids (and their weights) into chunks of at most 75 with A1111's comma back-off;
    :data:`BREAK_TOKEN` closes the current chunk (even an empty one, which becomes all padding)."""
    weights = weights or [1.0] * len(tokens)
    chunks: list[tuple[list[int], list[float]]] = []
    cur_t: list[int] = []
    cur_w: list[float] = []
    last_comma = -1
    for tok, w in zip(tokens, weights):
        if tok == BREAK_TOKEN:
            chunks.append((cur_t, cur_w))
            cur_t, cur_w, last_comma = [], [], -1
            continue
        if tok == COMMA:
            last_comma = len(cur_t)
        elif len(cur_t) == CHUNK and last_comma != -1 and len(cur_t) - last_comma <= COMMA_BACKTRACK:
            cut = last_comma + 1  # move the words after the last comma to the next chunk
            chunks.append((cur_t[:cut], cur_w[:cut]))
            cur_t, cur_w, last_comma = cur_t[cut:], cur_w[cut:], -1
        if len(cur_t) == CHUNK:
            chunks.append((cur_t, cur_w))
            cur_t, cur_w, last_comma = [], [], -1
        cur_t.append(tok)
        cur_w.append(w)
    if cur_t or not chunks:
        chunks.append((cur_t, cur_w))
    return chunks


def weighted_tokens(tokenizer, text: str) -> tuple[list[int], list[float]]:
    """Token ids and per-token weights of a prompt in the A1111 language (emphasis and BREAK).
    Only an unweighted BREAK (-1) breaks; inside brackets A1111 reads it as the word "BREAK"."""
    tokens: list[int] = []
    weights: list[float] = []
    for run, weight in parse_attention(text):
        if run == "BREAK" and weight == -1:
            tokens.append(BREAK_TOKEN)
            weights.append(1.0)
            continue
        ids = tokenizer(run, add_special_tokens=False, truncation=False).input_ids
        tokens += ids
        weights += [weight] * len(ids)
    return tokens, weights


def token_count(tokenizer, text: str) -> tuple[int, int]:
    """(tokens used, token limit) as A1111's counter shows them: ``12/75``, ``80/150``."""
    chunks = chunk_tokens(*weighted_tokens(tokenizer, text))
    used = CHUNK * (len(chunks) - 1) + len(chunks[-1][0])
    return used, max(CHUNK, -(-max(used, 1) // CHUNK) * CHUNK)


class TextConditioner:
    """Encodes prompts with one loaded model's text encoders."""

    def __init__(self, model: LoadedModel, device: torch.device):
        self.model = model
        self.device = device


    def _hidden(self, encoder_index: int, ids: torch.Tensor, clip_skip: int):
        spec = self.model.spec.text_encoders[encoder_index]
        encoder = self.model.text_encoders[encoder_index]
        out = encoder(input_ids=ids, output_hidden_states=True)
        layer = -clip_skip if self.model.spec.family == "sd1" else spec.hidden_layer
        z = out.hidden_states[layer]
        if spec.final_norm:
            final_norm = encoder.final_layer_norm if hasattr(encoder, "final_layer_norm") else \
                encoder.text_model.final_layer_norm
            z = final_norm(z)
        pooled = getattr(out, "text_embeds", None)
        return z, pooled

    @torch.no_grad()
    def encode(self, text: str, clip_skip: int = 1) -> Conditioning:
        """Encode one prompt (no AND, no scheduling: those are resolved before)."""
        tokens, weights = weighted_tokens(self.model.tokenizers[0], text)
        zs, pooled = [], None
        for i, (chunk_t, chunk_w) in enumerate(chunk_tokens(tokens, weights)):
            pad = CHUNK - len(chunk_t)
            parts = []
            for e, spec in enumerate(self.model.spec.text_encoders):
                pad_id = EOS if spec.pad_token == "<|endoftext|>" else 0
                ids = torch.tensor([[BOS] + chunk_t + [EOS] + [pad_id] * pad], device=self.device)
                z, pool = self._hidden(e, ids, clip_skip)
                parts.append(z)
                if i == 0 and pool is not None:
                    pooled = pool
            z = torch.cat(parts, dim=-1)
            w = torch.tensor([1.0] + chunk_w + [1.0] * (pad + 1), device=z.device, dtype=z.dtype)
            if not torch.all(w == 1):
                original_mean = z.mean()
                z = z * w[None, :, None]
                z = z * (original_mean / z.mean())
            zs.append(z)
        return Conditioning(torch.cat(zs, dim=1), pooled)
