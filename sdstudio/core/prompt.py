"""The A1111 prompt language, exactly: emphasis, prompt editing, alternation, AND, BREAK.

- :func:`parse_attention` — ``(x)`` x1.1, ``[x]`` /1.1, ``(x:1.5)``, nesting multiplies, unbalanced
  brackets are closed at the end, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literals, adjacent runs of
  equal weight merge, ``BREAK`` becomes ``("BREAK", -1.0)``. Optional NovelAI braces ``{x}`` x1.05.
- :func:`prompt_schedule` — ``[from:to:when]``, ``[to:when]``, ``[from::when]`` (``when`` a step
  number or a fraction of the steps), nested; ``[a|b|c]`` alternates every step. Text that does not
  parse as a schedule is kept as it is, as A1111 does.
- :func:`split_and` — ``a cat :1.2 AND a dog`` -> sub-prompts with weights (composable diffusion).

Pure Python; the engine turns the results into conditioning.
"""

from __future__ import annotations

import itertools
import math
import re

ROUND = 1.1
SQUARE = 1 / 1.1
BRACE = 1.05

# One token class per alternative, tried in this order (escapes first, then brackets, then text).
_ATTENTION = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\] | \\\\ | \\      # escapes (a lone backslash is dropped)
    | \( | \[                                 # openers
    | :\s*([+-]?[.\d]+)\s*\)                  # ":1.5)" closes a weighted round bracket
    | \) | ]                                  # closers
    | [^\\()\[\]:]+                           # plain text
    | :                                       # a colon that is not a weight
    """,
    re.VERBOSE,
)
_ATTENTION_BRACES = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\] | \\\{ | \\\} | \\\\ | \\
    | \( | \[ | \{
    | :\s*([+-]?[.\d]+)\s*\)
    | \) | ] | \}
    | [^\\()\[\]{}:]+
    | :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_attention(text: str, *, novelai_braces: bool = False) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; ``BREAK`` is ``("BREAK", -1.0)``."""
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []
    open_brace: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    pattern = _ATTENTION_BRACES if novelai_braces else _ATTENTION
    for m in pattern.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif token == "{" and novelai_braces:
            open_brace.append(len(runs))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
                if not math.isfinite(factor):  # hundreds of digits: no more a weight than "0.1.5"
                    raise ValueError(weight)
            except ValueError:  # "(a:0.1.5)": not a number, so it stays text and the bracket closes plainly
                runs.append([token[:token.rindex(")")], 1.0])
                factor = ROUND
            scale_from(open_round.pop(), factor)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        elif token == "}" and novelai_braces and open_brace:
            scale_from(open_brace.pop(), BRACE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    runs.append(["BREAK", -1.0])
                runs.append([part, 1.0])
    for start in open_round:  # unbalanced: closed at the end
        scale_from(start, ROUND)
    for start in open_square:
        scale_from(start, SQUARE)
    for start in open_brace:
        scale_from(start, BRACE)
    if not runs:
        runs = [["", 1.0]]
    merged: list[list] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, float(w)) for t, w in merged]


# ---- prompt editing and alternation ---------------------------------------------------------------
#
# One left-to-right pass over the prompt with a stack of open brackets (linear in its length). A1111
# parses this language with an Earley grammar (groups "(x)" "(x:y)" "[x]", edits "[a:b:when]" "[b:when]"
# "[a::when]", cycles "[a|b|...]", and brackets or colons that fit none of them kept at the top level as
# text); these are that grammar's rules read off directly:
# - an opening bracket has only one possible closing bracket, the first one at which its nesting closes,
#   and it forms a group only when everything between forms groups too, so the brackets that form groups
#   nest and are all found by the stack; a closing bracket of the wrong kind (or a "|" inside round
#   brackets) spoils every bracket still open, which then stay text;
# - "[...]" with top-level "|"s and no top-level ":" is a cycle; with one or two top-level ":" and a
#   number (an optional sign, digits with an optional ".", an optional exponent, spaces either side)
#   after the last, an edit; with neither, a plain group; anything else is text;
# - a "|" outside every cycle, a backslash at the very end or before a newline: the grammar has no
#   reading, so the whole prompt is text (A1111's fallback);
# - where brackets can form groups they do. A1111's parser picks that reading too, with one exception:
#   when an edit's closing "]" is followed by brackets or colons that form nothing, its choice among the
#   readings depends on how many there are ("[a:b:2]:" keeps the edit, "[a:b:2]::" is all text, "[a:b:2]:::"
#   keeps it again); here the edit is always kept.

_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?))\s*")
_SPECIAL = re.compile(r"[][()|:\\]")
_CLOSES = {"]": "[", ")": "("}


class _Pieces:
    """A run of text and edits/cycles; ``dynamic`` when it holds an edit or a cycle somewhere."""

    __slots__ = ("_text", "dynamic", "items")

    def __init__(self, items: list, dynamic: bool):
        self.items, self.dynamic, self._text = items, dynamic, None

    def text(self) -> str:
        """The text of a static run (no edits or cycles), joined once."""
        if self._text is None:
            out: list[str] = []
            stack = [self]
            while stack:
                x = stack.pop()
                if type(x) is str:
                    out.append(x)
                else:
                    stack.extend(reversed(x.items))
            self._text = "".join(out)
        return self._text


class _Edit:
    __slots__ = ("after", "before", "when")

    def __init__(self, before: _Pieces, after: _Pieces, when: int):
        self.before, self.after, self.when = before, after, when


class _Cycle:
    __slots__ = ("options",)

    def __init__(self, options: list[_Pieces]):
        self.options = options


class _Open:
    """A bracket still open while reading: what came after it, its top-level ":" and "|"."""

    __slots__ = ("bars", "char", "colons", "dynamic", "items")

    def __init__(self, char: str):
        self.char, self.items, self.dynamic, self.colons, self.bars = char, [], False, [], []


class _Schedule:
    """A parsed prompt: its pieces, the steps at which its text changes, and how much work reading took."""

    def __init__(self, pieces: _Pieces | None, changes: set[int], work: int):
        self.pieces, self.changes, self.work = pieces, changes, work

    def text_at(self, step: int) -> str:
        out: list[str] = []
        stack: list = [self.pieces]
        while stack:
            x = stack.pop()
            if type(x) is str:
                out.append(x)
            elif type(x) is _Pieces:
                if x.dynamic:
                    stack.extend(reversed(x.items))
                else:
                    out.append(x.text())
            elif type(x) is _Edit:
                stack.append(x.before if step <= x.when else x.after)
            else:
                stack.append(x.options[(step - 1) % len(x.options)])
        return "".join(out)


def _when(raw: str, steps: int, int_offset: int, float_offset: float) -> int:
    value = float(raw)
    value = (value - float_offset) * steps if "." in raw else value - int_offset
    # clamped before int(): "1e999" is a float's infinity (never switches), and any when below 1 acts alike
    return int(max(-1.0, min(float(steps), value)))


def _read_schedule(prompt: str, steps: int, int_offset: int = 0, float_offset: float = 0.0) -> _Schedule:
    """Read ``prompt`` once; ``pieces`` is None when it has no reading (it is then plain text)."""
    root = _Open("")
    stack: list[_Open] = []
    valid_from = 0  # the open brackets below this depth can no longer form groups
    changes = {steps}
    work = 0
    pos, end = 0, len(prompt)
    while pos < end:
        work += 1
        top = stack[-1] if stack else root
        m = _SPECIAL.search(prompt, pos)
        if m is None or m.start() > pos:  # plain text up to the next special character
            stop = end if m is None else m.start()
            top.items.append(prompt[pos:stop])
            pos = stop
            continue
        c = prompt[pos]
        if c == "\\":
            if pos + 1 >= end or prompt[pos + 1] == "\n":
                return _Schedule(None, {steps}, work)
            top.items.append(prompt[pos:pos + 2])
            pos += 2
            continue
        pos += 1
        if c in "[(":
            stack.append(_Open(c))
        elif c == ":":
            if stack:
                top.colons.append((len(top.items), pos))
            top.items.append(":")
        elif c == "|":
            if not stack or top.char != "[":
                return _Schedule(None, {steps}, work)  # a "|" outside every cycle: no reading
            top.bars.append(len(top.items))
            top.items.append("|")
        elif not stack or _CLOSES[c] != top.char:  # a closing bracket that closes nothing here
            top.items.append(c)
            valid_from = len(stack)
        else:
            group = stack.pop()
            parent = stack[-1] if stack else root
            node = None
            if len(stack) >= valid_from:
                node = _group(group, prompt, pos, steps, int_offset, float_offset, changes)
            valid_from = min(valid_from, len(stack))
            if node is None:
                if group.bars:
                    return _Schedule(None, {steps}, work)
                node = _Pieces([group.char, _Pieces(group.items, group.dynamic), c], group.dynamic)
                valid_from = len(stack)
            parent.items.append(node)
            parent.dynamic = parent.dynamic or type(node) is not _Pieces or node.dynamic
    for group in stack:  # never closed: text
        if group.bars:
            return _Schedule(None, {steps}, work)
        root.items.append(group.char)
        root.items.append(_Pieces(group.items, group.dynamic))
        root.dynamic = root.dynamic or group.dynamic
        work += 1
    return _Schedule(_Pieces(root.items, root.dynamic), changes, work)


def _slice(items: list, start: int, stop: int, dynamic: bool) -> _Pieces:
    """``items[start:stop]`` as a run, static unless it holds an edit or a cycle itself."""
    part = items[start:stop]
    if dynamic:
        dynamic = any(type(x) is _Edit or type(x) is _Cycle or (type(x) is _Pieces and x.dynamic) for x in part)
    return _Pieces(part, dynamic)


def _group(group: _Open, prompt: str, close: int, steps: int, int_offset: int, float_offset: float,
           changes: set[int]):
    """The node for a bracket closed at ``close`` (just past it) whose contents all formed groups; None
    when these contents make no group (then the brackets are text)."""
    items, colons = group.items, group.colons
    if group.char == "(":
        return _Pieces(["(", _Pieces(items, group.dynamic), ")"], group.dynamic) if len(colons) <= 1 else None
    if group.bars:
        if colons:
            return None
        cuts = [-1, *group.bars, len(items)]
        changes.update(range(1, steps + 1))
        return _Cycle([_slice(items, a + 1, b, group.dynamic) for a, b in itertools.pairwise(cuts)])
    if not colons:
        return _Pieces(["[", _Pieces(items, group.dynamic), "]"], group.dynamic)
    if len(colons) > 2:
        return None
    m = _WHEN.fullmatch(prompt, colons[-1][1], close - 1)
    if m is None:
        return None
    when = _when(m.group(1), steps, int_offset, float_offset)
    if when >= 1:
        changes.add(when)
    cut = colons[0][0]
    if len(colons) == 2:
        before, after = _slice(items, 0, cut, group.dynamic), _slice(items, cut + 1, colons[1][0], group.dynamic)
    else:
        before, after = _Pieces([], False), _slice(items, 0, cut, group.dynamic)
    return _Edit(before, after, when)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """``[(end_step, text), ...]``: the text to use up to and including each end step.

    With ``hires_steps`` (the second pass of Hires. fix), integer ``when`` values count from the end of
    the first pass and fractions from 1.0, as A1111 does; the schedule covers the hires steps.
    """
    int_offset, float_offset, total = (0, 0.0, steps) if hires_steps is None else (steps, 1.0, hires_steps)
    parsed = _read_schedule(prompt, total, int_offset, float_offset)
    if parsed.pieces is None or not parsed.pieces.dynamic:
        return [(total, prompt)]  # no edits or cycles (or no reading): the prompt as it is
    return [(t, parsed.text_at(t)) for t in sorted(parsed.changes)]


# ---- AND -------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable diffusion: ``"a cat :1.2 AND a dog"`` -> ``[("a cat", 1.2), (" a dog", 1.0)]``."""
    parts = []
    for sub in _AND.split(prompt):
        m = _WEIGHT.search(sub)
        text, weight = m.groups() if m else (sub, None)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts
