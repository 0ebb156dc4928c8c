"""Deforum's schedule language: a parity table of the extension's own schedules (values computed with numpy,
not by our evaluator), the expression semantics numexpr has, edge cases, and error messages."""

import math

import numpy as np
import pytest

from sdstudio.core.keyframes import (
    FUNCTIONS,
    ExpressionError,
    ScheduleError,
    compile_expression,
    evaluate,
    frame_of_key,
    parse_schedule,
    parse_string_schedule,
)

T120 = np.arange(120)


def interp(frames, keys, values):
    """pandas' linear interpolate between key frames (np.interp), held before/after the first/last key."""
    return np.interp(frames, keys, values)


def _piecewise(n, parts):
    """Build expected values: parts = [(start, stop, array_or_scalar)]."""
    out = np.empty(n)
    for start, stop, v in parts:
        out[start:stop] = v if np.isscalar(v) else np.asarray(v)[: stop - start]
    return out


t90 = np.arange(90)
expr60 = 0.5 + 0.1 * np.sin(2 * 3.14 * t90 / 24)

PARITY = [
    # the extension's defaults
    ("0: (1.0025+0.002*sin(1.25*3.14*t/30))", 120, -1, 1.0025 + 0.002 * np.sin(1.25 * 3.14 * T120 / 30)),
    ("0:(1.0025+0.002*sin(1.25*3.14*t/30))", 120, -1, 1.0025 + 0.002 * np.sin(1.25 * 3.14 * T120 / 30)),
    ("0: (0)", 120, -1, np.zeros(120)),
    ("0: (1.75)", 120, -1, np.full(120, 1.75)),
    ("0: (0.065)", 10, -1, np.full(10, 0.065)),
    # its info-page example: alternating strength every 30 frames
    ("0:(0.25 * cos((72 / 60 * 3.141 * (t + 0) / 30))**13 + 0.7)", 120, -1,
     0.25 * np.cos(72 / 60 * 3.141 * T120 / 30) ** 13 + 0.7),
    ("0: (2*sin(t*0.1))", 120, -1, 2 * np.sin(T120 * 0.1)),
    # number keys interpolate toward the next key; the next key may be an expression (its value at its frame)
    ("0:(1.0), 30:(1.02), 60:(0.5+0.1*sin(2*3.14*t/24))", 90, -1,
     np.concatenate([interp(np.arange(61), [0, 30, 60], [1.0, 1.02, expr60[60]]), expr60[61:]])),
    ("0:(0), 10:(5)", 20, -1, interp(np.arange(20), [0, 10], [0, 5])),
    ("0:(-1.5), 4:(1.5)", 6, -1, np.array([-1.5, -0.75, 0.0, 0.75, 1.5, 1.5])),
    ("0:(-.5), 2:(+.5)", 3, -1, np.array([-0.5, 0.0, 0.5])),
    ("0:(10), 3:(0)", 8, -1, np.array([10, 20 / 3, 10 / 3, 0, 0, 0, 0, 0])),
    # keys with spaces around them; quoted expression keys of max_f
    (" 0 : (0) ,  10 : (5) ", 11, -1, interp(np.arange(11), [0, 10], [0, 5])),
    ('0:(0), "max_f-1":(9)', 11, -1, np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9.0])),  # max_f = 10
    ("0:(0), 'max_f':(10)", 11, -1, np.arange(11.0)),
    ("0:(0), max_f/2:(1)", 11, -1, interp(np.arange(11), [0, 5], [0, 1])),
    ("0:(0), max_f/2:(1)", 12, -1, interp(np.arange(12), [0, 5], [0, 1])),  # 5.5 -> 5, as int()
    # the extension's number test: '( 5 )' (spaces) and 1e-3 (exponent) are expressions, so they hold
    ("0:( 0 ), 10:(5)", 12, -1, _piecewise(12, [(0, 10, 0.0), (10, 12, 5.0)])),
    ("0:(1e-3), 4:(1)", 6, -1, np.array([1e-3] * 4 + [1.0, 1.0])),
    ("0:(5.), 2:(1)", 4, -1, np.array([5.0, 5.0, 1.0, 1.0])),
    # an expression key runs until the next key; then a number key interpolates onward
    ("0:(t), 5:(0)", 10, -1, np.array([0, 1, 2, 3, 4, 0, 0, 0, 0, 0.0])),
    ("0:(0), 4:(t*2)", 8, -1, np.array([0, 2, 4, 6, 8, 10, 12, 14.0])),
    # s is the run's seed
    ("0:(s*2)", 3, 21, np.full(3, 42.0)),
    ('0:(s), 1:(-1), "max_f-2":(-1), "max_f-1":(s)', 6, 7, np.array([7, -1, -1, -1, 7, 7.0])),
    # one key; a key past the end is ignored (no bending toward it); the last repeated key wins
    ("0:(3)", 4, -1, np.full(4, 3.0)),
    ("0:(0), 200:(100)", 120, -1, np.zeros(120)),
    ("0:(1), 5:(2), 5:(4)", 7, -1, interp(np.arange(7), [0, 5], [1, 4])),
    ("0:(1), -3:(9)", 3, -1, np.ones(3)),
    # accepted where the extension fails: a trailing comma, commas inside a function call, a value without ()
    ("0:(1),", 3, -1, np.ones(3)),
    ("0:(where(t>2, 1, 0))", 6, -1, np.where(np.arange(6) > 2, 1.0, 0.0)),
    ("0:(arctan2(t, 2))", 5, -1, np.arctan2(np.arange(5), 2)),
    ("0: 0.5, 2: 1.5", 4, -1, np.array([0.5, 1.0, 1.5, 1.5])),
    # numexpr's % follows Python (the sign of the divisor)
    ("0:(t % 3)", 7, -1, np.arange(7) % 3.0),
    ("0:(-t % 3)", 7, -1, np.mod(-np.arange(7), 3.0)),
    ("0:((t - 3.5) % 2)", 7, -1, np.mod(np.arange(7) - 3.5, 2)),
    ("0:(t % -4)", 7, -1, np.mod(np.arange(7), -4.0)),
    ("0:(t/2)", 4, -1, np.arange(4) / 2),  # true division
    ("0:(t//2)", 5, -1, np.arange(5) // 2.0),
    ("0:(-t**2)", 4, -1, -(np.arange(4.0) ** 2)),
    ("0:(2**-t)", 4, -1, 2.0 ** -np.arange(4.0)),
    ("0:(t**0.5)", 5, -1, np.sqrt(np.arange(5))),
    ("0:(abs(sin(t/4)))", 20, -1, np.abs(np.sin(np.arange(20) / 4))),
    ("0:((t>2) & (t<5))", 8, -1, ((np.arange(8) > 2) & (np.arange(8) < 5)).astype(float)),
    ("0:((t<2) | (t>5))", 8, -1, ((np.arange(8) < 2) | (np.arange(8) > 5)).astype(float)),
    ("0:(~(t>2) * 3)", 5, -1, (~(np.arange(5) > 2)) * 3.0),
    ("0:(t*(t>3) + 1)", 6, -1, np.arange(6) * (np.arange(6) > 3) + 1.0),
    ("0:(max_f - t)", 5, -1, 4.0 - np.arange(5)),
    ("0:(floor(t/3) + ceil(t/3))", 7, -1, np.floor(np.arange(7) / 3) + np.ceil(np.arange(7) / 3)),
    ("0:(exp(-t) + log(t+1) + log10(t+1) + sqrt(t))", 5, -1,
     np.exp(-np.arange(5)) + np.log(np.arange(5) + 1) + np.log10(np.arange(5) + 1) + np.sqrt(np.arange(5))),
]


@pytest.mark.parametrize(("text", "max_frames", "seed", "expected"), PARITY, ids=[p[0] for p in PARITY])
def test_parity_table(text, max_frames, seed, expected):
    values = parse_schedule(text, max_frames, "test").values(seed=seed)
    assert len(values) == max_frames
    assert all(isinstance(v, float) for v in values)
    np.testing.assert_allclose(values, expected, rtol=1e-13, atol=1e-15)


def test_at_and_ints():
    sched = parse_schedule("0:(-1.5), 4:(2.5)", 5, "steps")
    assert sched.at(2) == 0.5
    assert sched.ints() == [-1, 0, 0, 1, 2]  # truncated toward zero, as int()
    with pytest.raises(IndexError):
        sched.at(5)


@pytest.mark.parametrize(("expr", "expected"), [
    ("-2**2", -4), ("2**3**2", 512), ("2**-1", 0.5), ("(-2)**2", 4), ("-2**-2", -0.25),
    ("10 - 2 - 3", 5), ("2 * 3 % 4", 2), ("7 % 3 ** 2", 7), ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9),
    ("-7 % 3", 2), ("7 % -3", -2), ("-7.5 % 2", 0.5), ("-7.5 % -2", -1.5), ("7 / 2", 3.5), ("-7 // 2", -4),
    ("7 / 2 * 2", 7.0), ("3 - - 2", 5), ("+3", 3), ("1e3", 1000.0), ("1.5E-3", 0.0015), (".5", 0.5), ("5.", 5.0),
    ("1 < 2", True), ("2 <= 2", True), ("1 == 1.0", True), ("1 != 1", False), ("True + 1", 2),
    ("6 & 3", 2), ("6 | 3", 7), ("6 ^ 3", 5), ("~5", -6), ("1 << 4", 16), ("256 >> 4", 16),
    ("where(1 > 2, 10, 20)", 20), ("where(1, 2.0, 3)", 2.0),
    ("round(2.5)", 2.0), ("round(3.5)", 4.0), ("round(-2.5)", -2.0), ("floor(-2.5)", -3.0), ("ceil(-2.5)", -2.0),
    ("trunc(-2.7)", -2.0), ("sign(-3)", -1.0), ("fmod(-7, 3)", -1.0), ("minimum(2, 3)", 2.0), ("maximum(2, 3)", 3.0),
    ("abs(-3)", 3.0), ("arctan2(1, 1)", math.pi / 4), ("1/0", math.inf), ("-1/0", -math.inf), ("log(0)", -math.inf),
    ("arctanh(1)", math.inf), ("log1p(-1)", -math.inf), ("exp(1000)", math.inf), ("2.0**2000", math.inf),
])
def test_expression_semantics(expr, expected):
    """numexpr's values (which are Python's precedence and floored %; numpy's IEEE answers)."""
    got = evaluate(expr)
    assert got == expected and type(got) is type(expected), (expr, got)


@pytest.mark.parametrize("expr", ["0/0", "sqrt(-1)", "arccosh(0.5)", "log(-1)", "arcsin(2)", "(-8)**(1/3)", "5 % 0"])
def test_expression_nan(expr):
    assert math.isnan(evaluate(expr))


def _numpy_name(name):
    return {"arctan2": np.arctan2, "fmod": np.fmod, "minimum": np.minimum, "maximum": np.maximum,
            "round": np.round, "where": np.where}.get(name, getattr(np, name, None))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_function_against_numpy(name):
    arity = FUNCTIONS[name][0]
    points = {1: [(0.5,), (1.5,), (-0.25,), (3.0,)], 2: [(0.5, 1.5), (-3.0, 2.0), (2.0, -0.5)],
              3: [(1, 2.0, 3.0), (0, 2.0, 3.0)]}[arity]
    ref = _numpy_name(name)
    assert ref is not None
    for args in points:
        with np.errstate(all="ignore"):
            want = float(ref(*args))
        got = float(evaluate(f"{name}({', '.join(map(repr, args))})"))
        if math.isnan(want):
            assert math.isnan(got), (name, args)
        else:
            assert got == pytest.approx(want, rel=1e-14, abs=1e-15), (name, args, got, want)


def test_values_are_numexpr_types_for_printing():
    assert evaluate("t", t=7) == 7 and isinstance(evaluate("t", t=7), int)
    assert isinstance(evaluate("t/1", t=7), float)
    assert isinstance(evaluate("abs(t)", t=-7), float)  # numexpr's abs returns a float


def test_no_python_eval():
    for text in ["__import__('os').system('true')", "t.__class__", "open('x')", "[1]", "{}", "lambda: 1",
                 "t; 1", "t = 1", "getattr(t, 'real')", "0x10"]:
        with pytest.raises(ExpressionError):
            compile_expression(text)


def test_schedule_error_points_at_key_and_column():
    text = "0: (1), 30: (1+foo)"
    with pytest.raises(ScheduleError) as err:
        parse_schedule(text, 60, "zoom")
    assert str(err.value).startswith(f"schedule 'zoom', key 30, column {text.index('foo') + 1}: unknown name 'foo'")

    text = '0:(1), "max_f-bar":(2)'
    with pytest.raises(ScheduleError, match=rf"key \"max_f-bar\", column {text.index('bar') + 1}: unknown name"):
        parse_schedule(text, 60, "angle")


@pytest.mark.parametrize(("text", "message"), [
    ("5:(1), 20:(2)", "no key at frame 0 (its first key is frame 5)"),
    ("10:(1), 20:(2)", "no key at frame 0 (it has no key inside the run)"),
    ("", "is empty"),
    ("  ,  ", "is empty"),
    ("0:(1+)", "column 6: unexpected ')'"),
    ("0:((1)", "'(' without its ')'"),
    ("0:(1))", "')' without its '('"),
    ("0:(sin(1, 2))", "sin takes 1 argument, got 2"),
    ("0:(foo(1))", "unknown function 'foo'"),
    ("0:(sin)", "sin is a function"),
    ("0:(1 < t < 3)", "chained comparisons"),
    ("0:(t>2 & t<5)", "chained comparisons"),
    ("0:(pi*t)", "numexpr has no constants"),
    ("0:((t>1) and (t<3))", "'and' is not numexpr's"),
    ("0:(not t)", "'not' is not numexpr's"),
    ("0:(1/t)", "is inf at frame 0"),
    ("0:(sqrt(t-2))", "is nan at frame 0"),
    ("0:(1.5 & 1)", "'&' needs comparisons or whole numbers"),
    ("0:(1), 5 (2)", "has no ':'"),
    ("0:", "no value after ':'"),
    (":(1)", "a value without its frame"),
    ("0:(t), t:(1)", "unknown name 't'"),  # keys know max_f and s, not t
    ('0:("Euler a")', "a string value belongs in a string schedule"),
    ("0:(t = 1)", "compare with =="),
])
def test_schedule_errors(text, message):
    with pytest.raises(ScheduleError) as err:
        parse_schedule(text, 10, "zoom").values()
    assert message in str(err.value)
    assert str(err.value).startswith("schedule 'zoom'")


def test_schedule_error_is_a_request_error():
    from sdstudio.core.errors import RequestError, http_status

    with pytest.raises(RequestError) as err:
        parse_schedule("5:(1)", 10, "zoom")
    assert http_status(err.value) == 422


def test_bad_max_frames():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ScheduleError, match="max_frames"):
            parse_schedule("0:(1)", bad, "zoom")


def test_one_frame_run():
    assert parse_schedule("0:(0), max_f:(5)", 1, "x").values() == [5.0]  # max_f = 0: the later key wins


def test_string_schedules():
    sampler = parse_string_schedule('0: ("Euler a"), 10: ("DPM++ 2M Karras")', 12, "sampler_schedule")
    assert sampler.values() == ["Euler a"] * 10 + ["DPM++ 2M Karras"] * 2
    assert sampler.at(9) == "Euler a"
    ckpt = parse_string_schedule('0: ("model1.ckpt"), 100: ("model2.safetensors")', 120, "checkpoint_schedule")
    assert ckpt.at(99) == "model1.ckpt" and ckpt.at(100) == "model2.safetensors"
    # parentheses, commas and ':' inside the quotes stay (the extension strips every quote and parenthesis)
    path = parse_string_schedule('0: ("C:/models/a (v2), b.safetensors")', 2, "checkpoint_schedule")
    assert path.values() == ["C:/models/a (v2), b.safetensors"] * 2
    assert parse_string_schedule("0: (Euler a), \"max_f\": ('LMS')", 3).values() == ["Euler a", "Euler a", "LMS"]
    assert parse_string_schedule('0: ("{video_mask}")', 2).values() == ["{video_mask}"] * 2
    with pytest.raises(ScheduleError, match="no key at frame 0"):
        parse_string_schedule('3: ("Euler")', 5, "sampler_schedule")


def test_clip_skip_schedule_as_ints():
    assert parse_schedule("0: (2), 3: (1)", 5, "clipskip_schedule").ints() == [2, 1, 1, 1, 1]


def test_frame_of_key():
    assert frame_of_key("30", 120) == 30
    assert frame_of_key("max_f/2", 120) == 59  # 59.5 truncated
    assert frame_of_key('"max_f-1"', 120) == 118
    assert frame_of_key("max_f", 120) == 119
    assert frame_of_key("10.7", 120) == 10
    with pytest.raises(ScheduleError, match="prompts, key nope"):
        frame_of_key("nope", 120)


def test_evaluation_is_quick():
    """All of a 1000-frame run's schedules (about 60) must take well under a second."""
    import time

    sched = parse_schedule("0: (1.0025+0.002*sin(1.25*3.14*t/30)), 500: (1), 700: (where(t%2, 1, 0))", 1000, "z")
    start = time.perf_counter()
    for _ in range(60):
        sched.values()
    assert time.perf_counter() - start < 1.0


# numexpr itself, where it is installed (not a dependency): our evaluator gives its numbers
CROSS = ["1.0025+0.002*sin(1.25*3.14*t/30)", "0.25 * cos((72 / 60 * 3.141 * (t + 0) / 30))**13 + 0.7",
         "2*sin(t*0.1)", "t % 3", "-t % 4", "(t - 3.5) % 2", "t // 3", "-t**2 + 3*t", "t**0.5",
         "where(t > 5, t/2, -t)", "abs(sin(t)) * (t < 10)", "exp(-t/10) * cos(t)", "log1p(t) + log10(t+1)",
         "arctan2(t, 3) + arctanh(t/100)", "(t > 3) & (t < 8)", "~(t > 3)", "floor(t/4) + ceil(t/4)",
         "sinh(t/20) + cosh(t/20) + tanh(t/20)", "arcsinh(t) + arccosh(t+1) + arcsin(t/50) + arccos(t/50)",
         "max_f - t + s", "t * 1e-3 + 5.", "sqrt(t) / (1 + t)", "expm1(t/30) + tan(t/30)"]


@pytest.mark.parametrize("expr", CROSS)
def test_against_numexpr(expr):
    import numexpr  # a test dependency (pyproject [test]): missing, this fails rather than skips
    for t in range(20):
        want = float(numexpr.evaluate(expr, local_dict={"t": np.int64(t), "max_f": np.int64(119), "s": np.int64(5)}))
        got = float(evaluate(expr, t=t, max_f=119, s=5))
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (expr, t)
