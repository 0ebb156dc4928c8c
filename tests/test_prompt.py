"""The A1111 prompt language: documented examples, edge cases and properties."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdstudio.core.prompt import _read_schedule, parse_attention, prompt_schedule, split_and

ATTENTION_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("[]", [("", 1.0)]),
    ("((x))", [("x", 1.2100000000000002)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("[[x]]", [("x", (1 / 1.1) * (1 / 1.1))]),
    ("(x:1.5)", [("x", 1.5)]),
    ("( x : 1.5 )", [(" x ", 1.5)]),  # whitespace around the weight is allowed
    ("(x:0)", [("x", 0.0)]),
    ("(x:-1)", [("x", -1.0)]),
    ("((x:2):3)", [("x", 6.0)]),
    ("(a:b)", [("a:b", 1.1)]),  # ':' without a number is text inside the group
    ("a:1.5)", [("a:1.5)", 1.0)]),  # a weight with no open bracket is text
    ("x)", [("x)", 1.0)]),
    ("x]", [("x]", 1.0)]),
    ("\\\\", [("\\", 1.0)]),
    ("end\\", [("end", 1.0)]),  # a lone backslash at the end is dropped
    ("猫 (🐱:1.2)", [("猫 ", 1.0), ("🐱", 1.2)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    # inside brackets the BREAK marker is multiplied too, so it no longer reads as a break (as in A1111)
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("BREAKfast", [("BREAKfast", 1.0)]),
    ("a, (b), (c)", [("a, ", 1.0), ("b", 1.1), (", ", 1.0), ("c", 1.1)]),
]


@pytest.mark.parametrize("text, expected", ATTENTION_CASES)
def test_parse_attention(text, expected):
    assert parse_attention(text) == expected


def test_novelai_braces_are_optional():
    assert parse_attention("{x}") == [("{x}", 1.0)]
    assert parse_attention("{x}", novelai_braces=True) == [("x", 1.05)]
    assert parse_attention("{{x}} (y)", novelai_braces=True) == [("x", 1.05 * 1.05), (" ", 1.0), ("y", 1.1)]
    assert parse_attention("\\{x\\}", novelai_braces=True) == [("{x}", 1.0)]


SCHEDULE_CASES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
    ("[from::4] x", [(4, "from x"), (10, " x")]),
    ("[a:b:0]", [(10, "b")]),  # "when" 0: never before
    ("[a:b:20]", [(10, "a")]),  # past the last step: clamped, "before" throughout
    ("[a:b:0.0]", [(10, "b")]),
    ("a [b|c] [d:e:0.5]", [(1, "a b d"), (2, "a c d"), (3, "a b d"), (4, "a c d"), (5, "a b d"),
                           (6, "a c e"), (7, "a b e"), (8, "a c e"), (9, "a b e"), (10, "a c e")]),
    ("a [b:c:x] d", [(10, "a [b:c:x] d")]),  # not a number: plain text
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),  # A1111 1.10's grammar rejects it too (stale doctest)
]


@pytest.mark.parametrize("prompt, expected", SCHEDULE_CASES)
def test_prompt_schedule(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


# Nested and malformed edits and cycles; the expected schedules are what A1111's Earley grammar (lark 1.3) gave.
NESTED_AND_MALFORMED = [
    ('[a:[b:[c:d:3]:2]:1]', [(1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')]),
    ('[[a|b]:[c|d]:2]', [(1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')]),
    ('[a|[b:c:2]|d]', [(1, 'a'), (2, 'b'), (3, 'd'), (4, 'a')]),
    ('([a:b:2]:1.3)', [(2, '(a:1.3)'), (4, '(b:1.3)')]),
    ('[(x:1.2):(y):0.5]', [(2, '(x:1.2)'), (4, '(y)')]),
    ('[[a:2]]', [(2, '[]'), (4, '[a]')]),
    ('[a:b:2]:', [(2, 'a:'), (4, 'b:')]),
    ('[a:b:2]]', [(2, 'a]'), (4, 'b]')]),
    ('[[a:b:2]', [(2, '[a'), (4, '[b')]),
    ('] [a:b:2] [', [(2, '] a ['), (4, '] b [')]),
    ('(a [b:c:2]', [(2, '(a b'), (4, '(a c')]),
    ('[a:b:2] (c', [(2, 'a (c'), (4, 'b (c')]),
    ('[a:b:2]x::', [(2, 'ax::'), (4, 'bx::')]),
    ('[a|b] :: [c|d]', [(1, 'a :: c'), (2, 'b :: d'), (3, 'a :: c'), (4, 'b :: d')]),
    ('[a:b:c:2]', [(4, '[a:b:c:2]')]),
    ('[a:b]', [(4, '[a:b]')]),
    ('[a:2:3]', [(3, 'a'), (4, '2')]),
    ('[a|b:2]', [(4, '[a|b:2]')]),
    ('(a|b)', [(4, '(a|b)')]),
    ('a | b', [(4, 'a | b')]),
    ('[a:b:2]|', [(4, '[a:b:2]|')]),
    ('[a|b', [(4, '[a|b')]),
    ('[a:b:x]', [(4, '[a:b:x]')]),
    ('[a:b:2e]', [(4, '[a:b:2e]')]),
    ('[a:b:1e1]', [(4, 'a')]),
    ('[a:b: +2 ]', [(2, 'a'), (4, 'b')]),
    ('[a:b:-1]', [(4, 'b')]),
    ('[a:b:.5.5]', [(4, '[a:b:.5.5]')]),
    ('\\[a:b:2]', [(4, '\\[a:b:2]')]),
    ('[a:b:2\\]', [(4, '[a:b:2\\]')]),
    ('[a\\|b]', [(4, '[a\\|b]')]),
    ('x\\', [(4, 'x\\')]),
    ('[a:b:2] \\\n', [(4, '[a:b:2] \\\n')]),
    ('[a:b:2] \\\t', [(2, 'a \\\t'), (4, 'b \\\t')]),
    ('[a:b:\n2\n]', [(2, 'a'), (4, 'b')]),
    ('[\n|\n]', [(1, '\n'), (2, '\n'), (3, '\n'), (4, '\n')]),
    ('((a:[b:c:2]))', [(2, '((a:b))'), (4, '((a:c))')]),
    ('(a:[b:c:2]:d)', [(2, '(a:b:d)'), (4, '(a:c:d)')]),
    ('[:a:2]', [(2, ''), (4, 'a')]),
    ('[a::2]', [(2, 'a'), (4, '')]),
    ('[::2]', [(2, ''), (4, '')]),
    ('[|||]', [(1, ''), (2, ''), (3, ''), (4, '')]),
    ('[a)b:2]', [(4, '[a)b:2]')]),  # a closing bracket of the wrong kind spoils the brackets around it
    ('[a:b:2)]', [(4, '[a:b:2)]')]),
    ('[(a]:2]', [(4, '[(a]:2]')]),
    ('[a|b)]', [(4, '[a|b)]')]),
    ('[x [a:b:2] ) :3]', [(2, '[x a ) :3]'), (4, '[x b ) :3]')]),
    ('[a:(b]:2)', [(4, '[a:(b]:2)')]),
]


@pytest.mark.parametrize("prompt, expected", NESTED_AND_MALFORMED)
def test_nested_and_malformed_schedules_match_a1111(prompt, expected):
    assert prompt_schedule(prompt, 4) == expected


def test_an_edit_before_stray_brackets_is_kept():
    """Where stray brackets or colons follow an edit's "]", A1111's parser keeps or drops the edit by how many
    there are (an accident of its Earley parser's tie-breaking: ":" keeps it, "::" drops it, ":::" keeps it);
    we always keep it."""
    assert prompt_schedule("[a:b:2]:", 4) == [(2, "a:"), (4, "b:")]  # as A1111
    assert prompt_schedule("[a:b:2]::", 4) == [(2, "a::"), (4, "b::")]  # A1111: [(4, "[a:b:2]::")]
    assert prompt_schedule("[a:b:2]:::", 4) == [(2, "a:::"), (4, "b:::")]  # as A1111
    assert prompt_schedule("x [a:b:2]([ y", 4) == [(2, "x a([ y"), (4, "x b([ y")]  # A1111: all text


BRACKET_HEAVY = [
    "[" * 2500 + "]" * 2500,
    "(" * 2500 + "[a:b:1]" * 100 + ")" * 2000,
    "[a:" * 850 + "b" + ":2]" * 850,  # edits nested 850 deep
    "[a|b]" * 1000,
    "[[a|b]:" * 600 + "c" + ":3]" * 600,
    "(a:[b:c:2]:d)" * 380,
    "[" + "a:" * 2500 + "]",
    ":[" * 1250 + "x" + ":3]" * 1250,
    "\\[(" * 1700,
]


@pytest.mark.parametrize("shape", range(len(BRACKET_HEAVY)))
def test_long_bracket_heavy_prompts_are_read_in_one_pass(shape):
    """A1111's Earley parser took 13.7 s on a 900-character bracket-heavy prompt (and grows far worse than
    linearly); ours reads each character once: its work counter stays within twice the prompt's length."""
    text = BRACKET_HEAVY[shape]
    assert len(text) >= 4900
    assert _read_schedule(text, 20).work <= 2 * len(text)
    schedule = prompt_schedule(text, 20)
    assert schedule[-1][0] == 20 and all(isinstance(t, str) for _, t in schedule)


def test_long_prompts_schedule_as_their_pieces_do():
    assert prompt_schedule("[a|b]" * 1000, 4) == [(i, "ab"[(i - 1) % 2] * 1000) for i in range(1, 5)]
    assert prompt_schedule("[a:" * 850 + "b" + ":2]" * 850, 4) == [(2, "a"), (4, "b")]
    assert prompt_schedule("[" * 2500 + "]" * 2500, 4) == [(4, "[" * 2500 + "]" * 2500)]


def test_a_backslash_before_a_newline_leaves_the_prompt_as_text():
    assert prompt_schedule("[a:b:2] \\\n", 4) == [(4, "[a:b:2] \\\n")]
    assert prompt_schedule("[a:b:2] \\", 4) == [(4, "[a:b:2] \\")]
    assert prompt_schedule("[a:b:2]\\[\n", 4) == [(2, "a\\[\n"), (4, "b\\[\n")]


def test_hires_pass_uses_its_own_steps():
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:13] c", 10, hires_steps=10) == [(3, "a  c"), (10, "a b c")]


def test_split_and():
    assert split_and("a cat") == [("a cat", 1.0)]
    assert split_and("a cat :1.2 AND a dog") == [("a cat", 1.2), (" a dog", 1.0)]
    assert split_and("a AND b:-0.5 AND c") == [("a", 1.0), (" b", -0.5), (" c", 1.0)]
    assert split_and("ANDROID and ANDY") == [("ANDROID and ANDY", 1.0)]
    assert split_and("x:.5") == [("x", 0.5)]


_prompts = st.lists(st.sampled_from(list("ab ,()[]:|\\.0123456789") + ["BREAK", " AND ", "猫", "🐱"]),
                   max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(_prompts)
def test_parsers_never_raise_and_keep_the_words(text):
    runs = parse_attention(text)
    assert runs and all(isinstance(t, str) and isinstance(w, float) for t, w in runs)
    joined = "".join(t for t, w in runs)
    for word in ("猫", "🐱"):
        assert joined.count(word) == text.count(word)
    schedule = prompt_schedule(text, 7)
    assert schedule[-1][0] == 7 and all(1 <= step <= 7 for step, _ in schedule)
    assert [s for s, _ in schedule] == sorted({s for s, _ in schedule})
    for _, scheduled in schedule:
        for word in ("猫", "🐱"):
            assert scheduled.count(word) <= text.count(word)
    assert split_and(text)


def test_a_weight_that_is_not_a_number_stays_text():
    """``(a:0.1.5)`` made A1111's parser (and ours) raise; a prompt is text: the unreadable weight stays in the
    prompt and the bracket closes as a plain one."""
    assert parse_attention("(a:0.1.5)") == [("a:0.1.5", 1.1)]
    assert parse_attention("x (a: .. ) y") == [("x ", 1.0), ("a: .. ", 1.1), (" y", 1.0)]
    assert parse_attention("((a:1..2):1.5)") == [("a:1..2", pytest.approx(1.65))]
    assert parse_attention("(a:1.5)") == [("a", 1.5)]  # a real weight is still one


_pieces = st.lists(st.sampled_from(["(", ")", "[", "]", ":", "|", "a", " ", "0.1.5", "1.", ".", "..", "-1", "0.5",
                                    "BREAK", " AND ", ":1.2", "\\(", "\\", "猫"]), max_size=24).map("".join)


@settings(max_examples=2000, deadline=None)
@given(_pieces)
def test_a1111_syntax_pieces_never_make_the_parsers_raise(text):
    assert parse_attention(text)
    assert prompt_schedule(text, 10)[-1][0] == 10
    assert split_and(text)
