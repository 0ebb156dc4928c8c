"""Build the CLIP BPE tokenizer files (vocab.json, merges.txt) that sdstudio ships.

Run once by a developer; the outputs are committed under sdstudio/models/configs/clip_tokenizer/
so nothing is fetched at run time. Source: the BPE merge list that open-clip-torch ships
(bpe_simple_vocab_16e6.txt.gz, MIT licensed, originally from OpenAI CLIP). Usage:

    pip download open-clip-torch --no-deps -d /tmp/oc
    python tools/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "sdstudio" / "models" / "configs" / "clip_tokenizer"
N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges (vocab size 49408 with specials)


def byte_alphabet() -> list[str]:
    """The reversible byte -> printable-unicode alphabet used by GPT-2 style byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    # CLIP's vocabulary lists the alphabet in this order (printable bytes first), not by byte value.
    return [chr(c) for c in codes]


def build(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    merges = bpe_text.split("\n")[1 : N_MERGES + 1]
    alphabet = byte_alphabet()
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        bpe = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    vocab, merges = build(bpe)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
