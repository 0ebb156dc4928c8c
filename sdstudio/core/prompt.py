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

import math
import re
from functools import lru_cache

import lark

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

# The language of prompt editing. Brackets that do not form a group, an edit or a cycle are kept as
# text (``root`` accepts stray brackets), which is how A1111 treats malformed prompts.
_GRAMMAR = r"""
!root: (body | /[][():]/+)*
body: (group | edit | cycle | words | SPACE)*
!group: "(" body ")"
      | "(" body ":" body ")"
      | "[" body "]"
edit: "[" [body ":"] body ":" [SPACE] NUMBER [SPACE] "]"
cycle: "[" body ("|" [body])+ "]"
SPACE: /\s+/
words: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(_GRAMMAR, start="root")


class _Steps(lark.Visitor):
    """Collects the steps at which the text changes; rewrites each ``when`` to a step number."""

    def __init__(self, steps: int, int_offset: int, float_offset: float):
        super().__init__()
        self.steps, self.int_offset, self.float_offset = steps, int_offset, float_offset
        self.found: set[int] = {steps}

    def edit(self, tree):
        raw = tree.children[-2]
        value = float(raw)
        if "." in raw:
            value = (value - self.float_offset) * self.steps
        else:
            value = value - self.int_offset
        # clamped before int(): "1e999" is a float's infinity (never switches), and any when below 1 acts alike
        tree.children[-2] = int(max(-1.0, min(float(self.steps), value)))
        if tree.children[-2] >= 1:
            self.found.add(tree.children[-2])

    def cycle(self, tree):
        self.found.update(range(1, self.steps + 1))


def _text_at(step: int, tree) -> str:
    class AtStep(lark.Transformer):
        def edit(self, args):
            before, after, _, when, _ = args
            yield before or () if step <= when else after

        def cycle(self, args):
            options = ["" if not a else a for a in args]
            yield options[(step - 1) % len(options)]

        def root(self, args):
            def flatten(x):
                if isinstance(x, str):
                    yield x
                else:
                    for part in x:
                        yield from flatten(part)

            return "".join(flatten(args))

        def words(self, args):
            yield args[0].value

        def __default__(self, data, children, meta):
            yield from children

    return AtStep().transform(tree)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """``[(end_step, text), ...]``: the text to use up to and including each end step.

    With ``hires_steps`` (the second pass of Hires. fix), integer ``when`` values count from the end of
    the first pass and fractions from 1.0, as A1111 does; the schedule covers the hires steps.
    """
    int_offset, float_offset, total = (0, 0.0, steps) if hires_steps is None else (steps, 1.0, hires_steps)
    try:
        tree = _parser().parse(prompt)
    except lark.exceptions.LarkError:
        return [(total, prompt)]  # malformed schedules are plain text
    collector = _Steps(total, int_offset, float_offset)
    collector.visit(tree)
    return [(t, _text_at(t, tree)) for t in sorted(collector.found)]


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
