"""Property-based fuzzing of every text parser a user or a file feeds: the prompt language (attention, schedules,
AND, extra-network tags, prompts-from-file lines), infotext, X/Y/Z axis values, styles.csv, Deforum's schedules,
expressions and settings files.

Each parser may refuse its input only with its own documented error (a :class:`RequestError` kind that names
the problem); anything else (OverflowError, RecursionError, csv.Error, TypeError...) is a bug. The normal run
tries the same 150 examples per parser every time (``SDSTUDIO_FUZZ_PARSER_EXAMPLES=N`` tries N random ones);
``./test.sh --full`` runs 10^6 random ones per parser, as 20 shards of 50,000, each with its own fixed seed, so
the run (about 4.6 CPU-hours here) spreads over test workers and can be done a few shards at a time
(``-k "fuzz_parsers and 1e6-07"``) with the same examples as in one go. The explicit examples at the end are
what the fuzzing found, kept as plain tests.
"""

from __future__ import annotations

import json
import math
import os
import string

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from sdstudio.core import deforum, extra_networks, infotext, keyframes, prompt, prompts_file, styles, xyz
from sdstudio.core.errors import RequestError
from sdstudio.core.params import INFOTEXT_FIELDS, Txt2ImgRequest, from_infotext

QUICK = int(os.environ.get("SDSTUDIO_FUZZ_PARSER_EXAMPLES", "150"))
FIXED = "SDSTUDIO_FUZZ_PARSER_EXAMPLES" not in os.environ  # the normal run tries the same examples every time
FULL, SHARDS = 1_000_000, 20
SIZES = [pytest.param((QUICK, None), id="quick"),
         *(pytest.param((FULL // SHARDS, shard), id=f"1e6-{shard:02d}", marks=pytest.mark.full)
           for shard in range(SHARDS))]


def run(size: tuple[int, int | None], test) -> None:
    """Run a ``@given`` test with ``size`` = (examples, shard): no deadline and no example database on disk; the
    quick run derandomized, a shard of the full run seeded with its number."""
    examples, shard = size
    test = settings(max_examples=examples, deadline=None, database=None, derandomize=FIXED and shard is None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(test)
    (test if shard is None else seed(20261202 + shard)(test))()


def syntax(pieces: list[str], size: int = 40) -> st.SearchStrategy[str]:
    """Texts made of a language's pieces mixed with arbitrary text, or arbitrary text alone."""
    piece = st.one_of(st.sampled_from(pieces), st.text(max_size=3))
    return st.one_of(st.text(max_size=size), st.lists(piece, max_size=size).map("".join))


HUGE = "9" * 400  # a float's infinity once read
LONG = "9" * 4400  # more digits than Python turns into an int

PROMPT_PIECES = ["(", ")", "[", "]", "{", "}", ":", "|", "\\", "a", "cat", " ", ",", "\n", "0.1.5", "1.", ".", "..",
                 "-1", "0.5", "1.5", "3", "20", "1e999", HUGE, ":1.2", "AND", "BREAK", "<lora:x:0.5>", "<lora:",
                 "<hypernet:h:", ">", "=", "te=", "unet=", "猫", "🐱"]


@pytest.mark.parametrize("examples", SIZES)
def test_prompt_language(examples):
    """Attention weights are finite floats, a schedule covers its steps in order, AND splits, tags extract; only
    an extra-network tag's non-number weight is refused (RequestError)."""

    @given(syntax(PROMPT_PIECES), st.integers(0, 40), st.one_of(st.none(), st.integers(1, 40)), st.booleans())
    def check(text, steps, hires_steps, braces):
        runs = prompt.parse_attention(text, novelai_braces=braces)
        assert runs and all(isinstance(t, str) and isinstance(w, float) and math.isfinite(w) for t, w in runs)
        schedule = prompt.prompt_schedule(text, steps, hires_steps)
        total = steps if hires_steps is None else hires_steps
        ends = [end for end, _ in schedule]
        assert ends[-1] == total and ends == sorted(set(ends)) and all(isinstance(t, str) for _, t in schedule)
        assert prompt.split_and(text)
        stripped, tags = extra_networks.extract(text)
        assert isinstance(stripped, str)
        try:
            extra_networks.lora_uses(tags)
            extra_networks.hypernetwork_uses(tags)
        except RequestError as exc:
            assert "must be a number" in str(exc)

    run(examples, check)


PROMPTS_FILE_PIECES = ["--prompt", "--negative_prompt", "--steps", "--seed", "--width", "--sampler_name", "--cfg_scale",
                       "--styles", "--outpath_samples", " ", "\n", '"', "'", "\\", "1", "-1", "x", "1.5", LONG, "=", "-"]


@pytest.mark.parametrize("examples", SIZES)
def test_prompts_from_file_lines(examples):
    @given(syntax(PROMPTS_FILE_PIECES))
    def check(text):
        try:
            jobs = prompts_file.parse_lines(text)
        except prompts_file.PromptsFileError as exc:
            assert str(exc)
        else:
            assert jobs and all(isinstance(job, dict) for job in jobs)

    run(examples, check)


INFOTEXT_KEYS = [f.key for f in INFOTEXT_FIELDS]
INFOTEXT_VALUES = ["20", "-1", "1.5", "nan", "inf", "1e999", HUGE, LONG, "512x512", "0x0", "x", "", "Euler a", "True",
                   "Only masked", '"a, b"', '"unclosed', "\\", '{"a": 1}']
INFOTEXT_PIECES = ["\n", ", ", ": ", ",", ":", '"', "Negative prompt: ", "Negative prompt:", "Template: ", "a cat",
                   *INFOTEXT_VALUES, *(f"{k}: " for k in INFOTEXT_KEYS)]


def _infotexts() -> st.SearchStrategy[str]:
    pair = st.tuples(st.sampled_from(INFOTEXT_KEYS), st.sampled_from(INFOTEXT_VALUES)).map(lambda kv: f"{kv[0]}: {kv[1]}")
    last_line = st.lists(pair, min_size=3, max_size=8).map(", ".join)
    written = st.tuples(st.text(max_size=20), st.text(max_size=10), last_line).map(
        lambda p: f"{p[0]}\nNegative prompt: {p[1]}\n{p[2]}")
    return st.one_of(syntax(INFOTEXT_PIECES, 60), written)


@pytest.mark.parametrize("examples", SIZES)
def test_infotext(examples):
    """parse() reads any text (strings out); a request made from it is refused only with RequestError, and what
    it makes validates or is refused with RequestError."""

    @given(_infotexts())
    def check(text):
        parsed = infotext.parse(text)
        assert isinstance(parsed[infotext.PROMPT], str) and isinstance(parsed[infotext.NEGATIVE], str)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items())
        assert isinstance(infotext.format(parsed), str)
        try:
            req = from_infotext(text)
        except RequestError as exc:
            assert str(exc)
            return
        try:
            req.validate()
        except RequestError as exc:
            assert str(exc)

    run(examples, check)


XYZ_PIECES = ["1", "0", "-", "+", "(", ")", "[", "]", ",", " ", '"', ".", "e", "5", "-3", "+2", "0.5", "0.0000001",
              "1000000000", "nan", "inf", HUGE, LONG, "512x512", "\r", "\n", "Euler a", "true", "<lora:x:1>"]


@pytest.mark.parametrize("examples", SIZES)
def test_xyz_values(examples):
    """Every axis type reads any values field into at most MAX_VALUES typed values or refuses it with AxisError;
    applying a value to a request raises nothing but AxisError/RequestError."""
    base = Txt2ImgRequest(prompt="a cat <lora:x:1>", negative_prompt="dog")

    @given(syntax(XYZ_PIECES, 30), st.sampled_from(list(xyz.AXES)))
    def check(text, label):
        ax = xyz.axis(label)
        for kind in (int, float, str):
            try:
                values = xyz.expand_values(text, kind)
            except xyz.AxisError as exc:
                assert str(exc)
                continue
            assert len(values) <= xyz.MAX_VALUES
            assert all(isinstance(v, kind) for v in values)
            assert kind is not float or all(math.isfinite(v) for v in values)
        try:
            values = xyz.axis_values(ax, text)
        except xyz.AxisError as exc:
            assert str(exc)
            return
        assert 1 <= len(values) <= xyz.MAX_VALUES
        for value in values[:3]:
            try:
                ax.apply(base, value, values)
                xyz.label(ax, value)
            except (xyz.AxisError, RequestError) as exc:
                assert str(exc)

    run(examples, check)


STYLE_PIECES = ["name", "prompt", "negative_prompt", "description", ",", '"', '""', "\n", "\r", "\r\n", "\x00",
                "\ufeff", "{prompt}", "a", " ", "\t"]


def _style_files() -> st.SearchStrategy[bytes]:
    header = st.sampled_from(["name,prompt,negative_prompt\n", "name,prompt,negative_prompt,description\n", ""])
    text = st.tuples(header, syntax(STYLE_PIECES, 40)).map(lambda p: (p[0] + p[1]).encode("utf-8", "surrogatepass"))
    return st.one_of(st.binary(max_size=200), text, st.tuples(text, st.binary(max_size=8)).map(b"".join))


@pytest.mark.parametrize("examples", SIZES)
def test_styles_files(examples, tmp_path):
    """Any file: load() gives styles (bad rows skipped, bytes that are not UTF-8 replaced) and never raises;
    upsert() either adds the style keeping every other one, or refuses (StylesError) and leaves the file as it
    was, so what could not be read is never overwritten."""
    path = tmp_path / "styles.csv"

    @given(_style_files())
    def check(raw):
        path.write_bytes(raw)
        table = styles.load(path)
        assert all(isinstance(s, styles.Style) and s.name == name == name.strip() and name for name, s in table.items())
        styles.apply("a cat", "dog", list(table), table)
        try:
            styles.upsert(path, styles.Style("fuzz-new", "{prompt}, x", "y"))
        except styles.StylesError as exc:
            assert str(path) in str(exc)
            assert path.read_bytes() == raw
            return
        after = styles.load(path, strict=True)
        assert after["fuzz-new"] == styles.Style("fuzz-new", "{prompt}, x", "y")
        assert {k: v for k, v in after.items() if k != "fuzz-new"} == {k: v for k, v in table.items() if k != "fuzz-new"}

    run(examples, check)


_style_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_style_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10).map(str.strip).filter(bool)


@pytest.mark.parametrize("examples", SIZES)
def test_styles_round_trip(examples, tmp_path):
    """What save() writes, load() reads back exactly, leading spaces, quotes and newlines included."""
    path = tmp_path / "styles.csv"

    @given(st.dictionaries(_style_names, st.tuples(_style_text, _style_text, _style_text), max_size=5))
    def check(table):
        written = {name: styles.Style(name, *texts) for name, texts in table.items()}
        styles.save(path, written)
        assert styles.load(path, strict=True) == written

    run(examples, check)


SCHEDULE_PIECES = ["0", "1", "30", "-1", ":", "(", ")", ",", " ", '"', "'", "t", "max_f", "s", "sin(", "where(", "**",
                   "*", "/", "//", "%", "-", "+", "~", "<<", ">>", "&", "|", "^", "<", "==", ".", "e", "1e308", "1e999",
                   "2<<1024", "1.5", "-.25", "nan", "inf", "pi", "and", "=", HUGE, LONG, "(" * 50, "-" * 50]


@pytest.mark.parametrize("examples", SIZES)
def test_deforum_schedules(examples):
    """A schedule parses to max_frames finite values (ints for whole-number schedules), or is refused with a
    ScheduleError; string schedules and frame keys likewise."""

    @given(syntax(SCHEDULE_PIECES), st.integers(1, 40), st.integers(-1, 2**32))
    def check(text, max_frames, seed):
        try:
            sched = keyframes.parse_schedule(text, max_frames, "zoom", seed=seed)
            values = sched.values(seed)
        except keyframes.ScheduleError as exc:
            assert str(exc).startswith("schedule 'zoom'")
        else:
            assert len(values) == max_frames and all(isinstance(v, float) and math.isfinite(v) for v in values)
            assert len(sched.ints(seed)) == max_frames
        try:
            strings = keyframes.parse_string_schedule(text, max_frames, "sampler_schedule").values()
        except keyframes.ScheduleError as exc:
            assert str(exc).startswith("schedule 'sampler_schedule'")
        else:
            assert len(strings) == max_frames and all(isinstance(v, str) for v in strings)
        try:
            assert isinstance(keyframes.frame_of_key(text, max_frames), int)
        except keyframes.ScheduleError as exc:
            assert str(exc).startswith("prompts")

    run(examples, check)


@pytest.mark.parametrize("examples", SIZES)
def test_deforum_expressions(examples):
    """An expression compiles and evaluates to a number, or is refused with ExpressionError (with a column)."""

    @given(syntax(SCHEDULE_PIECES), st.integers(-5, 10**6), st.integers(-1, 2**32))
    def check(text, t, seed):
        try:
            expr = keyframes.compile_expression(text)
            value = expr.evaluate(t=t, max_f=100, s=seed)
        except keyframes.ExpressionError as exc:
            assert exc.column >= 1 and exc.message
        else:
            assert isinstance(value, (int, float, bool))

    run(examples, check)


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), syntax(SCHEDULE_PIECES, 12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8)
_deforum_keys = st.sampled_from([*deforum.DEFORUM_DEFAULTS, *deforum.ALIASES, *deforum.REMOVED_KEYS, "use_zoe_depth",
                                 "cn_1_weight", "cn_1_enabled", "cn_2_resize_mode", "cn_9_weight", "unknown"])
_frame_prompts = st.dictionaries(syntax(["0", "max_f", "-1", "max_f/2", HUGE, "(", "s"], 6),
                                 syntax(["`t`", "`", "--neg", "a", " ", "`sin(t)`", "`2<<1024`"], 8), max_size=3)


def _settings_sources() -> st.SearchStrategy:
    small = st.fixed_dictionaries({"max_frames": st.integers(1, 12)})
    settings_dict = st.tuples(st.dictionaries(_deforum_keys, _json, max_size=6), small,
                              st.one_of(st.none(), _frame_prompts)).map(
        lambda p: {**p[0], **p[1], **({"prompts": p[2]} if p[2] is not None else {})})
    return st.one_of(settings_dict, settings_dict.map(json.dumps), st.text(max_size=30), st.binary(max_size=30))


@pytest.mark.parametrize("examples", SIZES)
def test_deforum_settings_files(examples):
    """A settings file (dict, JSON text, any text or bytes) loads or is refused with DeforumSettingsError naming
    the key; a loaded one gives its prompts, schedules, seeds and batch name per frame (a value that only fails
    at a frame: DeforumSettingsError / ScheduleError) and writes back as JSON."""

    @given(_settings_sources(), st.integers(0, 2**32 - 1))
    def check(source, seed):
        try:
            loaded = deforum.load_settings(source)
        except deforum.DeforumSettingsError as exc:
            assert str(exc)
            return
        assert json.loads(loaded.to_json())
        try:
            assert len(deforum.prompts_by_frame(loaded, seed)) == loaded["max_frames"]
            loaded.schedules(seed)
            assert len(deforum.seeds_by_frame(loaded, seed)) == loaded["max_frames"]
        except (deforum.DeforumSettingsError, keyframes.ScheduleError) as exc:
            assert str(exc)
        name = deforum.format_batch_name(loaded, "20240101000000", seed)
        assert "/" not in name and "\\" not in name and name not in ("", ".", "..")

    run(examples, check)


# ---- what the fuzzing found, as plain tests ------------------------------------------------------------


def test_found_prompt_edit_at_infinity():
    """``[a:b:1e999]`` (a float's infinity) raised OverflowError; it never switches, as any later step does."""
    assert prompt.prompt_schedule("[a:b:1e999]", 10) == [(10, "a")]
    assert prompt.prompt_schedule(f"[a:b:{HUGE}.5]", 10) == [(10, "a")]
    assert prompt.prompt_schedule("[a:b:-1e999]", 10) == [(10, "b")]
    assert prompt.prompt_schedule("[a:b:1.5e999]", 0) == [(0, "a")]
    assert prompt.prompt_schedule("[a:b:3]", 10) == [(3, "a"), (10, "b")]  # unchanged


def test_found_prompt_weight_at_infinity():
    """``(a:999...)`` gave an infinite weight (NaN conditioning); like ``0.1.5`` it is not a weight, so it stays text."""
    assert prompt.parse_attention(f"(a:{HUGE})") == [(f"a:{HUGE}", 1.1)]
    assert prompt.parse_attention("(a:1e3)") == [("a:1e3", 1.1)]  # never a weight in A1111's syntax either
    assert prompt.parse_attention("(a:1000)") == [("a", 1000.0)]


def test_found_infotext_number_overflow():
    """``Steps: 999...`` raised OverflowError out of from_infotext; it is a RequestError naming the field."""
    for text in (f"a\nSteps: {HUGE}, Seed: 1, Size: 512x512", f"a\nSteps: 20, Seed: {HUGE}, Size: 512x512"):
        with pytest.raises(RequestError, match="infotext field (Steps|Seed)"):
            from_infotext(text)


def test_found_xyz_values():
    """A carriage return raised csv.Error; ``0-1000000000`` built a billion-item list before the 10,000 check and
    ``0-1 [1000000000]`` likewise; hundreds of digits raised OverflowError; ``nan``/``inf`` were accepted; 11 words
    of Prompt order made 39,916,800 orders. All are AxisErrors now, counted before anything is built."""
    cases = {"1,\r2": (int, "comma list"), "0-1000000000": (int, "more than 10000"),
             "1000000000-0 (-1)": (int, "more than 10000"), "0-1 [1000000000]": (float, "more than 10000"),
             f"0-1 [{HUGE}]": (float, "more than 10000"), f"0-{HUGE} (+1)": (float, "more than 10000"),
             "0-1 (+0.0000001)": (float, "more than 10000"), f"0-{HUGE} [3]": (int, "is not an integer"),
             "nan": (float, "finite"), "inf": (float, "finite"), HUGE: (float, "finite")}
    for text, (kind, words) in cases.items():
        with pytest.raises(xyz.AxisError, match=words):
            xyz.expand_values(text, kind)
    with pytest.raises(xyz.AxisError, match="11 words have more than 10000 orders"):
        xyz.axis_values(xyz.axis("Prompt order"), ",".join(string.ascii_lowercase[:11]))
    assert len(xyz.axis_values(xyz.axis("Prompt order"), "a,b,c,d,e,f,g")) == 5040
    assert xyz.expand_values("1-5 (+2), 10-100 [5], 10-1 (-3)", int) == [1, 3, 5, 10, 32, 55, 77, 100, 10, 7, 4]
    assert xyz.expand_values("0.5-2 (+0.5), 1-2 [3]", float) == [0.5, 1.0, 1.5, 2.0, 1.0, 1.5, 2.0]
    assert len(xyz.expand_values("1-10000", int)) == 10000


def test_found_deforum_schedules():
    """Hundreds of nested signs or calls raised RecursionError; a 5000-term sum raised it when evaluated; 4400
    digits raised Python's int-string ValueError; a 400-digit key raised OverflowError and a 400-digit value gave
    inf; a whole number beyond any float raised OverflowError (alone, or
    with a float); interpolating between two huge keys gave inf.
    Each is a ScheduleError naming the schedule now."""
    cases = {
        "0:(" + "-" * 3000 + "1)": "nested too deeply",
        "0:(" + "sin(" * 3000 + "1" + ")" * 3000 + ")": "nested too deeply",
        "0:(" + "**".join(["1"] * 2000) + ")": "nested too deeply",
        "0:(" + "+".join(["t"] * 5000) + ")": "too long or nested too deeply to evaluate",
        f"0:({LONG}+t)": "a number of 4400 digits is too long",
        f"0:(1), {HUGE}:(2)": "the key's frame is inf",
        f"0:({HUGE})": "is inf",
        "0:((2<<1024)<<1024)": "is inf at frame 0",
        "0:(-(2<<1024)<<1024)": "is -inf at frame 0",
        "0:((2<<1024)*(2<<1024)*0.5)": "is inf at frame 0",
        f"0:(-{'9' * 308}), 9:({'9' * 308})": "the value at frame 1 is inf",
    }
    for text, words in cases.items():
        with pytest.raises(keyframes.ScheduleError, match=words):
            keyframes.parse_schedule(text, 10, "zoom").values()
    with pytest.raises(keyframes.ScheduleError, match="the key's frame is inf"):
        keyframes.frame_of_key(HUGE, 10)
    assert keyframes.parse_schedule("0:(" + "(" * 3000 + "1" + ")" * 3000 + ")", 3).values() == [1.0, 1.0, 1.0]
    assert keyframes.parse_schedule("0:(1), 2:(3)", 3).values() == [1.0, 2.0, 3.0]  # unchanged


def test_found_deforum_settings():
    """A dict as a ControlNet resize mode raised TypeError (unhashable); a backtick value too long to print raised
    ValueError."""
    with pytest.raises(deforum.DeforumSettingsError, match="cn_4_resize_mode"):
        deforum.load_settings({"cn_4_resize_mode": {"": None}})
    loaded = deforum.load_settings({"max_frames": 2, "prompts": {"0": "x `" + "<<".join(["2"] + ["1024"] * 16) + "`"}})
    with pytest.raises(deforum.DeforumSettingsError, match="too large a number to write"):
        deforum.prompts_by_frame(loaded)
    # JSON text holding a number over Python's 4,300-digit limit, or nested past the recursion limit, raised
    # ValueError / RecursionError (the 10^6-example run, shards 00/07/08/12/14/17)
    for key, source in (("settings", LONG), ("prompts", {"max_frames": 2, "prompts": LONG}),
                        ("settings", "[" * 100_000), ("init_images", {"use_looper": True, "init_images": "[1]"})):
        with pytest.raises(deforum.DeforumSettingsError, match=f"^{key}: "):
            loaded = deforum.load_settings(source)
            deforum.guided_images(loaded)
    # a 400-digit whole number raised OverflowError from math.isfinite (shard 07); where a number may be
    # fractional it is refused, where it must be whole it is read
    with pytest.raises(deforum.DeforumSettingsError, match="^strength: expected a finite number, got a 1329-bit"):
        deforum.load_settings(json.dumps({"max_frames": 2, "strength": int(HUGE)}))
    assert deforum.load_settings(f'{{"max_frames": 2, "seed": {HUGE}}}')["seed"] == int(HUGE)
    with pytest.raises(deforum.DeforumSettingsError, match="^max_frames: at most 1,000,000 frames, got a 1329-bit"):
        deforum.load_settings(f'{{"max_frames": {HUGE}}}')


def test_found_styles_files(tmp_path):
    """A file that is not UTF-8 raised UnicodeDecodeError and a field over csv's limit raised csv.Error from
    every styles listing; now they read (bad rows skipped), and a change to such a file is refused before it
    could overwrite what was not read. save() quotes every field, so leading spaces come back."""
    path = tmp_path / "styles.csv"
    path.write_bytes(b"name,prompt,negative_prompt\nLatin,caf\xe9,\nOk,a,b\n")
    assert styles.load(path) == {"Latin": styles.Style("Latin", "caf\ufffd"), "Ok": styles.Style("Ok", "a", "b")}
    with pytest.raises(styles.StylesError, match="not UTF-8 text"):
        styles.upsert(path, styles.Style("New", "x"))
    assert path.read_bytes() == b"name,prompt,negative_prompt\nLatin,caf\xe9,\nOk,a,b\n"
    path.write_text(f'name,prompt\nBig,"{"x" * 200_000}"\nOk,a\n', encoding="utf-8")
    assert list(styles.load(path)) == ["Ok"]
    with pytest.raises(styles.StylesError, match="line"):
        styles.delete(path, "Ok")
    styles.save(path, {"Pad": styles.Style("Pad", "  {prompt}", " x")})
    assert styles.load(path)["Pad"] == styles.Style("Pad", "  {prompt}", " x")


def test_found_xyz_size():
    """A Size value with a number over Python's 4,300-digit int() limit raised ValueError (the 10⁶ run's find)."""
    ax = xyz.axis("Size")
    with pytest.raises(xyz.AxisError, match="not a size in pixels"):
        ax.apply(Txt2ImgRequest(prompt="a"), "1" * 4403 + "x512", ["x"])
    assert ax.apply(Txt2ImgRequest(prompt="a"), "640x384", ["x"]).width == 640
