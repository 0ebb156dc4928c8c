"""Build the T5 tokenizer file (tokenizer.json, the `tokenizers` library's format) that sdstudio ships.

Run once by a developer; the output is committed under sdstudio/models/configs/t5_tokenizer/ so
nothing is fetched at run time and no ``sentencepiece`` package is needed. Source: the T5 v1.1
SentencePiece vocabulary (32000 pieces + 100 sentinels, Apache-2.0, Google) as a ``tokenizer.json``
(Unigram model, precompiled NFKC charsmap, Metaspace pre-tokenizer, ``</s>`` appended), which the
stable-diffusion.cpp sources embed as a byte array in ``src/tokenizers/vocab/clip_t5.hpp``. The
PyPI sdist of stable-diffusion-cpp-python carries them. Usage:

    pip download stable-diffusion-cpp-python==0.4.7 --no-deps --no-binary :all: -d /tmp/pkgs
    python tools/build_t5_tokenizer.py /tmp/pkgs/stable_diffusion_cpp_python-0.4.7.tar.gz
"""

from __future__ import annotations

import json
import re
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "sdstudio" / "models" / "configs" / "t5_tokenizer"
HEADER = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
ARRAY = "t5_tokenizer_json_str"
# The published ids of "a photo of a cat" (google/t5-v1_1-xxl's tokenizer): a check that the file is T5's.
KNOWN = ("a photo of a cat", [3, 9, 1202, 13, 3, 9, 1712, 1])


def extract(header_text: str, name: str = ARRAY) -> bytes:
    """The bytes of the C array ``static const unsigned char <name>[] = {0x.., ...};``."""
    start = header_text.index(f"{name}[]")
    body = header_text[header_text.index("{", start) + 1:header_text.index("};", start)]
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{1,2})", body))


def read_header(sdist: str) -> str:
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(HEADER))
        return tar.extractfile(member).read().decode("utf-8")


def main(sdist: str) -> None:
    data = json.loads(extract(read_header(sdist)).decode("utf-8"))
    model = data["model"]
    if model["type"] != "Unigram" or len(model["vocab"]) != 32100 or data["pre_tokenizer"]["type"] != "Metaspace":
        raise SystemExit("unexpected tokenizer.json: not the T5 v1.1 Unigram vocabulary")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "tokenizer.json"
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(path)).encode(KNOWN[0]).ids
    if ids != KNOWN[1]:
        raise SystemExit(f"{KNOWN[0]!r} tokenizes to {ids}, expected {KNOWN[1]}")
    print(f"wrote {len(model['vocab'])} pieces to {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
