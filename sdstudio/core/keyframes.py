"""Deforum's schedule language: ``0:(1.0), 30:(1.02), 60:(0.5+0.1*sin(2*3.14*t/24))``, parsed and evaluated
without Python's ``eval``.

A schedule is a comma-separated list of ``key: (value)`` items. Keys are frame numbers or expressions of
``max_f`` (= max_frames - 1) and ``s`` (the run's seed), optionally quoted (``"max_f-1"``); an expression key
is truncated toward zero, as ``int()`` does. Values follow the extension (deforum-art/sd-webui-deforum,
``FrameInterpolater``) exactly, because users' settings files must give the frames they gave there:

- A value that is a plain decimal number once quotes and parentheses are removed (``(0.5)``, ``-.25``; the
  extension's test is the regex ``[+-]?[0-9]*(\\.[0-9]+)?``) is a *number key*: the frames after it, up to the
  next key, are linearly interpolated toward the next key's value (pandas ``interpolate(method="linear")``
  over the frame index).
- Any other value is an *expression* of ``t`` (the frame), ``max_f`` and ``s``, evaluated at every frame from
  its key up to the next key (so it is not interpolated). ``1e-3`` and ``( 0.5 )`` are expressions by that
  rule: they hold their value instead of interpolating, as in the extension.
- Before the first key the extension crashes; we refuse a schedule without a frame-0 key with a message
  (:class:`ScheduleError`). After the last number key the value is held to the end.
- Keys past the last frame or below 0 are ignored (a ``200:(100)`` key in a 120-frame run does not bend the
  earlier frames toward 100); a repeated key: the last one wins (the extension builds a dict).

Where the extension fails, we accept: commas inside parentheses or quotes (``where(t>5, 1, 2)``; the
extension splits on every comma), a trailing comma, ``:`` inside a string value (a Windows checkpoint path).

The expression language is the part of numexpr's that Deforum users write, with numexpr's (that is Python's)
precedence and semantics: ``+ - * / // % **``, unary ``- + ~``, comparisons, ``& | ^`` on comparisons or whole
numbers, ``<< >>``, and the functions in :data:`FUNCTIONS`. ``/`` is true division, ``%`` takes the sign of the
divisor (``-7 % 3 == 2``), ``**`` binds tighter than unary minus on its left (``-2**2 == -4``) and is right
associative. Like numexpr there are no ``pi``/``e`` constants, no ``and``/``or``/``not``/``if`` and no chained
comparisons (numexpr refuses them too; use ``&``/``|`` with parentheses). Arithmetic is IEEE (``1/0`` is
``inf`` inside ``where``), but a schedule value that comes out infinite or NaN is an error naming the frame.
Integer arithmetic is exact and unbounded where numexpr would wrap at 64 bits, and a whole number to a negative
whole power is the fraction (``2**-t`` is 0.5 at t=1; numexpr's integer power gives 0 there, and refuses
``t**-1``); integer ``%`` or ``//`` by zero is NaN (numexpr gives 0).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from .errors import RequestError

Number = int | float | bool

SCHEDULE_NAMES = ("t", "max_f", "s")  # the variables a value may use
KEY_NAMES = ("max_f", "s")  # the variables a key may use (the extension evaluates keys without t)


class ScheduleError(RequestError):
    """A schedule that cannot be used; the message names the schedule, the key and the column."""


class ExpressionError(ValueError):
    """An expression error at ``column`` (1-based, in the text given to :func:`compile_expression`)."""

    def __init__(self, message: str, column: int):
        super().__init__(message)
        self.message = message
        self.column = column


# ---- the expression language --------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<op>\*\*|//|<<|>>|<=|>=|==|!=|[-+*/%&|^~<>(),])
""", re.VERBOSE)

_INF = math.inf
_NAN = math.nan


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            ch = text[pos]
            hint = " (a string value belongs in a string schedule)" if ch in "\"'" else ""
            if ch == "=":
                hint = " (compare with ==)"
            raise ExpressionError(f"unexpected character {ch!r}{hint}", pos + 1)
        kind = m.lastgroup
        if kind != "space":
            out.append((kind, m.group(), pos + 1))
        pos = m.end()
    out.append(("end", "", len(text) + 1))
    return out


def _div(a: Number, b: Number) -> float:
    if b == 0:
        if a == 0 or math.isnan(a):
            return _NAN
        return math.copysign(_INF, a) * math.copysign(1.0, b)
    try:
        return a / b
    except OverflowError:  # huge int / int
        return float(a) / float(b)


def _floordiv(a: Number, b: Number) -> Number:
    if b == 0:
        return _NAN
    try:
        return a // b
    except OverflowError:
        return _NAN


def _mod(a: Number, b: Number) -> Number:
    if b == 0:
        return _NAN
    if isinstance(a, float) and not math.isfinite(a):
        return _NAN
    return a % b


def _pow(a: Number, b: Number) -> Number:
    if isinstance(a, int) and isinstance(b, int) and b >= 0:
        if a in (0, 1, -1) or b * math.log2(abs(a)) < 64:
            return a ** b
        return _INF if a > 0 or b % 2 == 0 else -_INF
    try:
        return math.pow(a, b)
    except ValueError:  # negative base to a fractional power, 0 to a negative power
        return _INF if a == 0 else _NAN
    except OverflowError:
        return _INF if a > 0 or (float(b).is_integer() and int(b) % 2 == 0) else -_INF


def _safe(fn: Callable[[float], float], below: float | None = None, at: float | None = None,
          at_value: float = 0.0) -> Callable[[Number], float]:
    """A math function with numpy's answers where ``math`` raises: NaN out of the domain, inf on overflow."""

    def call(x: Number) -> float:
        x = float(x)
        if math.isnan(x):
            return _NAN
        if at is not None and x == at:
            return at_value
        if below is not None and x < below:
            return _NAN
        try:
            return fn(x)
        except ValueError:
            return _NAN
        except OverflowError:
            return math.copysign(_INF, x) if fn in (math.exp, math.sinh, math.expm1) else _INF
    return call


def _atanh(x: Number) -> float:
    x = float(x)
    if x in (1.0, -1.0):
        return math.copysign(_INF, x)
    return _NAN if not -1 < x < 1 else math.atanh(x)


def _rounded(fn: Callable[[float], Number]) -> Callable[[Number], float]:
    def call(x: Number) -> float:
        x = float(x)
        return x if not math.isfinite(x) else float(fn(x))
    return call


def _sign(x: Number) -> float:
    x = float(x)
    return x if math.isnan(x) else float((x > 0) - (x < 0))


def _fmod(a: Number, b: Number) -> float:
    try:
        return math.fmod(float(a), float(b))
    except ValueError:
        return _NAN


def _minmax(pick: Callable[[float, float], float]) -> Callable[[Number, Number], float]:
    def call(a: Number, b: Number) -> float:
        a, b = float(a), float(b)
        return _NAN if math.isnan(a) or math.isnan(b) else pick(a, b)
    return call


def _where(c: Number, a: Number, b: Number) -> Number:
    out = a if c else b
    if isinstance(a, float) or isinstance(b, float):
        return float(out)
    return out


FUNCTIONS: dict[str, tuple[int, Callable[..., Number]]] = {
    "sin": (1, _safe(math.sin)), "cos": (1, _safe(math.cos)), "tan": (1, _safe(math.tan)),
    "arcsin": (1, _safe(math.asin)), "arccos": (1, _safe(math.acos)), "arctan": (1, _safe(math.atan)),
    "arctan2": (2, lambda y, x: math.atan2(float(y), float(x))),
    "sinh": (1, _safe(math.sinh)), "cosh": (1, _safe(math.cosh)), "tanh": (1, _safe(math.tanh)),
    "arcsinh": (1, _safe(math.asinh)), "arccosh": (1, _safe(math.acosh, below=1.0)), "arctanh": (1, _atanh),
    "log": (1, _safe(math.log, below=0.0, at=0.0, at_value=-_INF)),
    "log10": (1, _safe(math.log10, below=0.0, at=0.0, at_value=-_INF)),
    "log1p": (1, _safe(math.log1p, below=-1.0, at=-1.0, at_value=-_INF)),
    "exp": (1, _safe(math.exp)), "expm1": (1, _safe(math.expm1)),
    "sqrt": (1, _safe(math.sqrt, below=0.0)),
    "abs": (1, lambda x: abs(float(x))),
    "floor": (1, _rounded(math.floor)), "ceil": (1, _rounded(math.ceil)),
    "round": (1, _rounded(round)),  # half to even, as numpy's
    "trunc": (1, _rounded(math.trunc)), "sign": (1, _sign),
    "fmod": (2, _fmod), "minimum": (2, _minmax(min)), "maximum": (2, _minmax(max)),
    "where": (3, _where),
}

_CONSTANTS = {"True": True, "False": False}


def _whole(v: Number) -> bool:
    return isinstance(v, (int, bool))


def _bitwise(op: str, a: Number, b: Number) -> Number:
    if isinstance(a, bool) and isinstance(b, bool):
        return {"&": a and b, "|": a or b, "^": a != b}[op]
    if _whole(a) and _whole(b):
        a, b = int(a), int(b)
        return {"&": a & b, "|": a | b, "^": a ^ b}[op]
    raise TypeError(f"'{op}' needs comparisons or whole numbers on both sides (write (t>2) & (t<5))")


def _shift(op: str, a: Number, b: Number) -> Number:
    if not (_whole(a) and _whole(b)) or b < 0 or b > 1024:
        raise TypeError(f"'{op}' needs whole numbers, and a shift between 0 and 1024")
    return int(a) << int(b) if op == "<<" else int(a) >> int(b)


def _invert(a: Number) -> Number:
    if isinstance(a, bool):
        return not a
    if isinstance(a, int):
        return ~a
    raise TypeError("'~' needs a comparison or a whole number")


_BINARY: dict[str, Callable[[Number, Number], Number]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": _div, "//": _floordiv, "%": _mod, "**": _pow,
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
    "&": lambda a, b: _bitwise("&", a, b), "|": lambda a, b: _bitwise("|", a, b),
    "^": lambda a, b: _bitwise("^", a, b),
    "<<": lambda a, b: _shift("<<", a, b), ">>": lambda a, b: _shift(">>", a, b),
}
_COMPARE = ("<", "<=", ">", ">=", "==", "!=")
_LEVELS = (("|",), ("^",), ("&",), ("<<", ">>"), ("+", "-"), ("*", "/", "//", "%"))

Node = Callable[[Mapping[str, Number]], Number]


class _Parser:
    def __init__(self, text: str, names: tuple[str, ...]):
        self.tokens = _tokens(text)
        self.pos = 0
        self.names = names
        self.used: set[str] = set()

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.pos]

    def take(self) -> tuple[str, str, int]:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def expect(self, value: str) -> None:
        kind, text, col = self.take()
        if text != value or kind == "end":
            got = "the end" if kind == "end" else repr(text)
            raise ExpressionError(f"expected {value!r}, got {got}{_hint(text)}", col)

    def parse(self) -> Node:
        if self.peek()[0] == "end":
            raise ExpressionError("empty expression", self.peek()[2])
        node = self.comparison()
        kind, text, col = self.peek()
        if kind != "end":
            raise ExpressionError(f"unexpected {text!r}{_hint(text)}", col)
        return node

    def comparison(self) -> Node:
        left = self.level(0)
        kind, op, col = self.peek()
        if op in _COMPARE and kind == "op":
            self.take()
            right = self.level(0)
            if self.peek()[1] in _COMPARE:
                raise ExpressionError("chained comparisons are not supported (numexpr refuses them); "
                                      "write (a < b) & (b < c)", self.peek()[2])
            return _binary(op, left, right, col)
        return left

    def level(self, depth: int) -> Node:
        if depth == len(_LEVELS):
            return self.unary()
        node = self.level(depth + 1)
        while self.peek()[0] == "op" and self.peek()[1] in _LEVELS[depth]:
            _, op, col = self.take()
            node = _binary(op, node, self.level(depth + 1), col)
        return node

    def unary(self) -> Node:
        kind, op, col = self.peek()
        if kind == "op" and op in ("-", "+", "~"):
            self.take()
            inner = self.unary()
            if op == "-":
                return lambda env: -inner(env)
            if op == "+":
                return lambda env: +inner(env)
            return _guarded(lambda env: _invert(inner(env)), col)
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        if self.peek()[1] == "**" and self.peek()[0] == "op":
            _, op, col = self.take()
            return _binary(op, base, self.unary(), col)  # right side may be -x, and is right associative
        return base

    def atom(self) -> Node:
        kind, text, col = self.take()
        if kind == "number":
            try:
                value: Number = float(text) if any(c in text for c in ".eE") else int(text)
            except ValueError:  # Python reads at most 4300 digits into an int
                raise ExpressionError(f"a number of {len(text)} digits is too long", col) from None
            return lambda env: value
        if kind == "op" and text == "(":
            node = self.comparison()
            self.expect(")")
            return node
        if kind == "name":
            if self.peek()[1] == "(" and self.peek()[0] == "op":
                return self.call(text, col)
            if text in _CONSTANTS:
                const = _CONSTANTS[text]
                return lambda env: const
            if text in self.names:
                self.used.add(text)
                return lambda env: env[text]
            if text in FUNCTIONS:
                raise ExpressionError(f"{text} is a function: write {text}(...)", col)
            hint = _hint(text)
            raise ExpressionError(f"unknown name {text!r}{hint}; names here: {', '.join(self.names)}", col)
        if kind == "end":
            raise ExpressionError("the expression ends too early", col)
        raise ExpressionError(f"unexpected {text!r}", col)

    def call(self, name: str, col: int) -> Node:
        if name not in FUNCTIONS:
            raise ExpressionError(f"unknown function {name!r}; known: {', '.join(sorted(FUNCTIONS))}", col)
        arity, fn = FUNCTIONS[name]
        self.expect("(")
        args: list[Node] = []
        if self.peek()[1] != ")":
            args.append(self.comparison())
            while self.peek()[1] == "," and self.peek()[0] == "op":
                self.take()
                args.append(self.comparison())
        self.expect(")")
        if len(args) != arity:
            raise ExpressionError(f"{name} takes {arity} argument{'s' if arity > 1 else ''}, got {len(args)}", col)
        if arity == 1:
            a0 = args[0]
            return _guarded(lambda env: fn(a0(env)), col)
        if arity == 2:
            a0, a1 = args
            return _guarded(lambda env: fn(a0(env), a1(env)), col)
        return _guarded(lambda env: fn(*(a(env) for a in args)), col)


def _hint(word: str) -> str:
    if word in ("pi", "e"):
        return " (numexpr has no constants: write 3.14159 or exp(1))"
    if word in ("and", "or", "not", "if", "else"):
        return f" ({word!r} is not numexpr's: use & | ~ with parentheses, or where(cond, a, b))"
    return ""


def _guarded(node: Node, col: int) -> Node:
    def run(env: Mapping[str, Number]) -> Number:
        try:
            return node(env)
        except ExpressionError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise ExpressionError(str(exc), col) from None
    return run


def _to_float(v: Number) -> float:
    try:
        return float(v)
    except OverflowError:
        return _INF if v > 0 else -_INF


def _binary(op: str, left: Node, right: Node, col: int) -> Node:
    fn = _BINARY[op]
    if op in ("+", "-", "*"):
        def arith(env: Mapping[str, Number]) -> Number:
            a, b = left(env), right(env)
            try:
                return fn(a, b)
            except OverflowError:  # a whole number beyond any float, with a float
                return fn(_to_float(a), _to_float(b))
        return arith
    return _guarded(lambda env: fn(left(env), right(env)), col)


@dataclass(frozen=True)
class Expression:
    """A compiled expression; ``names`` are the variables it reads."""

    text: str
    names: frozenset[str]
    _node: Node = field(repr=False, compare=False)

    def evaluate(self, **variables: Number) -> Number:
        missing = self.names - variables.keys()
        if missing:
            raise ExpressionError(f"no value for {', '.join(sorted(missing))}", 1)
        try:
            return self._node(variables)
        except RecursionError:  # a chain of thousands of operators is evaluated by as many nested calls
            raise ExpressionError("the expression is too long or nested too deeply to evaluate", 1) from None


def compile_expression(text: str, names: tuple[str, ...] = SCHEDULE_NAMES) -> Expression:
    """Parse ``text`` once; :class:`ExpressionError` (with a 1-based column) when it is not valid."""
    parser = _Parser(text, names)
    try:
        node = parser.parse()
    except RecursionError:  # thousands of nested brackets, signs or calls
        raise ExpressionError("the expression is nested too deeply", 1) from None
    return Expression(text, frozenset(parser.used), node)


def evaluate(text: str, **variables: Number) -> Number:
    """Evaluate one expression of the given variables (``evaluate("t*0.1", t=3)``)."""
    return compile_expression(text, tuple(variables)).evaluate(**variables)


def format_number(value: Number) -> str:
    """How numexpr's result prints (``str`` of a 0-d numpy array): ``7``, ``3.5``, ``2.0``, ``True``."""
    return repr(value) if isinstance(value, float) else str(value)


# ---- schedules ---------------------------------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]*(\.[0-9]+)?")  # the extension's check_is_number


def _plain_number(text: str) -> float | None:
    """The extension's number test: quotes and parentheses removed, then a bare decimal (no exponent, no
    spaces)."""
    bare = re.sub(r"[()'\"]", "", text)
    if bare and _PLAIN_NUMBER.fullmatch(bare) and any(c.isdigit() for c in bare):
        return float(bare)
    return None


def _unquote(text: str) -> tuple[str, int]:
    """``"max_f-1"`` -> ``max_f-1``, with the offset of the first kept character."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1], 1
    return text, 0


def _top_level(text: str) -> Iterator[tuple[int, str]]:
    """The characters outside parentheses and quotes, with their offsets (a schedule's separators are only
    those: ``where(t>5, 1, 2)`` and ``"a:b"`` hold theirs). A stray ``)`` is an error here; what is left
    open at the end is for the caller to say (a key's ``:`` search stops before the end)."""
    depth, quote = 0, ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ExpressionError("')' without its '('", i + 1)
        elif depth == 0:
            yield i, ch
    if quote:
        raise ExpressionError(f"unclosed quote {quote}", len(text) + 1)
    if depth > 0:
        raise ExpressionError("'(' without its ')'", len(text) + 1)


def _split_items(text: str) -> list[tuple[str, int]]:
    """Split on the commas outside parentheses and quotes; each item with its 0-based start offset."""
    items, start = [], 0
    for i, ch in _top_level(text):
        if ch == ",":
            items.append((text[start:i], start))
            start = i + 1
    items.append((text[start:], start))
    return items


def _stripped(text: str, offset: int) -> tuple[str, int]:
    lead = len(text) - len(text.lstrip())
    return text.strip(), offset + lead


@dataclass(frozen=True)
class Key:
    """One ``key: (value)`` item: its frame, the value as written, and its number or compiled expression."""

    frame: int
    key_text: str
    value_text: str
    column: int  # 1-based column of the value in the schedule text
    number: float | None = None
    expression: Expression | None = None


@dataclass(frozen=True)
class _Item:
    key_text: str
    key_column: int
    value_text: str
    value_column: int


def _items(name: str, text: str) -> list[_Item]:
    if not isinstance(text, str):
        raise ScheduleError(f"schedule {name!r}: expected a string like '0: (1.0)', got {type(text).__name__}")
    try:
        raw = _split_items(text)
    except ExpressionError as exc:
        raise ScheduleError(f"schedule {name!r}, column {exc.column}: {exc.message}") from None
    out = []
    for item, offset in raw:
        item, offset = _stripped(item, offset)
        if not item:
            continue  # "0:(1)," and ",,": the extension crashes there, nothing is lost by skipping them
        colon = _top_colon(item)
        if colon < 0:
            raise ScheduleError(f"schedule {name!r}, column {offset + 1}: {item!r} has no ':' "
                                f"(write frame: (value), e.g. 0: (1.0))")
        key, key_col = _stripped(item[:colon], offset)
        value, value_col = _stripped(item[colon + 1:], offset + colon + 1)
        if not key:
            raise ScheduleError(f"schedule {name!r}, column {offset + 1}: a value without its frame")
        if not value:
            raise ScheduleError(f"schedule {name!r}, key {key}, column {offset + colon + 2}: no value after ':'")
        out.append(_Item(key, key_col + 1, value, value_col + 1))
    if not out:
        raise ScheduleError(f"schedule {name!r} is empty: give at least a frame-0 key, e.g. 0: (1.0)")
    return out


def _top_colon(item: str) -> int:
    """The first ':' outside parentheses and quotes (a key may be ``(max_f-1)``; a value may hold ':'). The
    item comes from :func:`_split_items`, so its brackets and quotes are balanced."""
    return next((i for i, ch in _top_level(item) if ch == ":"), -1)


def _key_frame(label: str, item: _Item, max_frames: int, seed: int) -> int:
    text, shift = _unquote(item.key_text)
    plain = _plain_number(text) if not re.search(r"[()]", text) else None
    if plain is not None:
        if not math.isfinite(plain):  # hundreds of digits
            raise ScheduleError(f"{label}, key {item.key_text}, column {item.key_column}: the key's frame is {plain}")
        return int(plain)
    try:
        value = compile_expression(text, KEY_NAMES).evaluate(max_f=max_frames - 1, s=seed)
    except ExpressionError as exc:
        col = item.key_column + shift + exc.column - 1
        raise ScheduleError(f"{label}, key {item.key_text}, column {col}: {exc.message}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ScheduleError(f"{label}, key {item.key_text}, column {item.key_column}: the key's frame is {value}")
    return int(value)


def _check_max_frames(name: str, max_frames: int) -> None:
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ScheduleError(f"schedule {name!r}: max_frames must be a whole number of at least 1, got {max_frames!r}")


def _frame_zero(name: str, frames: list[int], text: str) -> None:
    if 0 not in frames:
        first = min((f for f in frames if f >= 0), default=None)
        where = f"its first key is frame {first}" if first is not None else "it has no key inside the run"
        raise ScheduleError(f"schedule {name!r} has no key at frame 0 ({where}): start it with 0: (value), "
                            f"e.g. '0: (1.0), {text.strip()}'")


@dataclass(frozen=True)
class Schedule:
    """A parsed numeric schedule for a run of ``max_frames`` frames; keys sorted, inside the run, unique."""

    name: str
    text: str
    max_frames: int
    keys: tuple[Key, ...]
    key_seed: int = -1  # the seed the keys were evaluated with (keys may use s)

    def values(self, seed: int = -1) -> list[float]:
        """The value of every frame; ``seed`` is ``s`` in the expressions."""
        n = self.max_frames
        out: list[float | None] = [None] * n
        by_frame = {k.frame: k for k in self.keys}
        current: Key | None = None
        max_f = n - 1
        for i in range(n):
            if i in by_frame:
                current = by_frame[i]
                if current.number is not None:
                    out[i] = current.number
            if current is not None and current.expression is not None:
                out[i] = self._evaluate(current, i, max_f, seed)
        if out[n - 1] is None:  # held after the last key (the extension copies the last value to the end)
            out[n - 1] = next(v for v in reversed(out) if v is not None)
        known = [i for i, v in enumerate(out) if v is not None]
        for a, b in itertools.pairwise(known):
            if b - a > 1:
                va, vb = out[a], out[b]
                slope = (vb - va) / (b - a)  # numpy.interp's form, which pandas' linear interpolate calls
                for i in range(a + 1, b):
                    out[i] = slope * (i - a) + va
        for i, v in enumerate(out):
            if not math.isfinite(v):  # between two huge number keys, the slope overflows
                raise ScheduleError(f"schedule {self.name!r}: the value at frame {i} is {v} (interpolating "
                                    "between keys too large for a number)")
        return [float(v) for v in out]

    def _evaluate(self, key: Key, frame: int, max_f: int, seed: int) -> float:
        assert key.expression is not None
        try:
            value = key.expression.evaluate(t=frame, max_f=max_f, s=seed)
        except ExpressionError as exc:
            raise ScheduleError(f"schedule {self.name!r}, key {key.key_text}, column {key.column + exc.column - 1}:"
                                f" {exc.message} (at frame {frame})") from None
        try:
            value = float(value)
        except OverflowError:  # a whole number beyond any float
            value = math.inf if value > 0 else -math.inf
        if not math.isfinite(value):
            raise ScheduleError(f"schedule {self.name!r}, key {key.key_text}, column {key.column}: "
                                f"{key.value_text} is {value} at frame {frame}")
        return value

    def at(self, frame: int, seed: int = -1) -> float:
        if not 0 <= frame < self.max_frames:
            raise IndexError(f"schedule {self.name!r}: frame {frame} is outside 0..{self.max_frames - 1}")
        return self.values(seed)[frame]

    def ints(self, seed: int = -1) -> list[int]:
        """Whole-number schedules (steps, seed, clip skip): truncated toward zero, as the extension's int()."""
        return [int(v) for v in self.values(seed)]


def parse_schedule(text: str, max_frames: int, name: str = "schedule", seed: int = -1) -> Schedule:
    """Parse a numeric schedule; :class:`ScheduleError` names the key and column of what is wrong.

    ``seed`` is ``s`` for the keys (values take theirs in :meth:`Schedule.values`)."""
    _check_max_frames(name, max_frames)
    keys: dict[int, Key] = {}
    for item in _items(name, text):
        frame = _key_frame(f"schedule {name!r}", item, max_frames, seed)
        number = _plain_number(item.value_text)
        expression = None
        if number is not None and not math.isfinite(number):  # hundreds of digits
            raise ScheduleError(f"schedule {name!r}, key {item.key_text}, column {item.value_column}: "
                                f"{item.value_text} is {number}")
        if number is None:
            try:
                expression = compile_expression(item.value_text)
            except ExpressionError as exc:
                col = item.value_column + exc.column - 1
                raise ScheduleError(f"schedule {name!r}, key {item.key_text}, column {col}: {exc.message}") from None
        if 0 <= frame < max_frames:
            keys.pop(frame, None)
            keys[frame] = Key(frame, item.key_text, item.value_text, item.value_column, number, expression)
    _frame_zero(name, list(keys), text)
    return Schedule(name, text, max_frames, tuple(sorted(keys.values(), key=lambda k: k.frame)), seed)


@dataclass(frozen=True)
class StringSchedule:
    """A schedule of strings (sampler, checkpoint, mask): each key's string held until the next key."""

    name: str
    text: str
    max_frames: int
    keys: tuple[tuple[int, str], ...]

    def values(self) -> list[str]:
        out, by_frame, current = [], dict(self.keys), ""
        for i in range(self.max_frames):
            current = by_frame.get(i, current)
            out.append(current)
        return out

    def at(self, frame: int) -> str:
        if not 0 <= frame < self.max_frames:
            raise IndexError(f"schedule {self.name!r}: frame {frame} is outside 0..{self.max_frames - 1}")
        return self.values()[frame]


def _string_value(text: str) -> str:
    """``("Euler a")`` -> ``Euler a``: one pair of outer parentheses, then one pair of quotes. (The extension
    removes every quote and parenthesis, which breaks names that contain them.)"""
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    return _unquote(text)[0]


def parse_string_schedule(text: str, max_frames: int, name: str = "schedule", seed: int = -1) -> StringSchedule:
    """``0: ("Euler a"), 30: ("DPM++ 2M")`` -> a :class:`StringSchedule`; frame 0 must have a key."""
    _check_max_frames(name, max_frames)
    keys: dict[int, str] = {}
    for item in _items(name, text):
        frame = _key_frame(f"schedule {name!r}", item, max_frames, seed)
        if 0 <= frame < max_frames:
            keys.pop(frame, None)
            keys[frame] = _string_value(item.value_text)
    _frame_zero(name, list(keys), text)
    return StringSchedule(name, text, max_frames, tuple(sorted(keys.items())))


def frame_of_key(text: str, max_frames: int, seed: int = -1, label: str = "prompts") -> int:
    """A frame key written as a number or an expression of ``max_f``/``s`` (prompt keys: ``"max_f/2"``);
    errors start with ``label``."""
    item = _Item(str(text).strip(), 1, "", 1)
    return _key_frame(label, item, max_frames, seed)
