"""A1111 "infotext": the generation parameters stored in a PNG's ``parameters`` text chunk.

Layout: the prompt (one or more lines), then ``Negative prompt: ...`` (may span lines), then one
last line of ``Key: value`` pairs joined by ``", "``. A value holding ``,``, ``:`` or a newline is
written as a JSON string. :func:`parse` returns exactly the strings A1111's reader sees (quotes
removed), in order; :func:`format` is its inverse.
"""

from __future__ import annotations

import json
import re

PROMPT = "Prompt"
NEGATIVE = "Negative prompt"

# A key starts with a word character and may hold spaces, dashes and slashes; a value is either a
# JSON string or everything up to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: object) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse(text: str) -> dict[str, str]:
    """Parse infotext into ``{"Prompt", "Negative prompt", key: value, ...}`` (values are strings)."""
    *lines, last = text.strip().split("\n")
    # Like A1111: the last line is the parameter line only if it holds at least three pairs.
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {PROMPT: "\n".join(prompt), NEGATIVE: "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        result[key] = unquote(value)
    return result


def format(params: dict[str, object]) -> str:
    """Inverse of :func:`parse`. ``None`` values are left out; other values are written with ``str``."""
    prompt = str(params.get(PROMPT) or "")
    negative = str(params.get(NEGATIVE) or "")
    pairs = []
    for key, value in params.items():
        if key in (PROMPT, NEGATIVE) or value is None:
            continue
        pairs.append(key if key == value else f"{key}: {quote(value)}")
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{', '.join(pairs)}".strip()
