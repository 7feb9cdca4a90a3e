"""Output checkers: what each accepts and rejects, what its messages say, the float checker's
tolerance boundaries, Judge0's rule with its quirks, checker specs from API input, and that
huge outputs are checked in linear time. Pure: no jobs run here."""

from __future__ import annotations

import time

import pytest

from conftest import EMULATED_CPU, overhead_ms
from sandboxd.judge.checkers import (
    DEFAULT_FLOAT_TOLERANCE,
    CheckerError,
    OutputChecker,
    ProgramSource,
    exact,
    float_tokens,
    judge0_accepts,
    lines,
    parse_checker,
    tokens,
)

# A quadratic checker would take hours on the huge inputs below; a linear one well under this.
LINEAR_TIME_BUDGET_S = overhead_ms(5_000, 60_000) / 1000


# --- exact -----------------------------------------------------------------------------------

@pytest.mark.parametrize("expected, got", [
    (b"", b""),
    (b"42\n", b"42\n"),
    (b"\x00\xff binary \r\n", b"\x00\xff binary \r\n"),
])
def test_exact_accepts_identical_bytes(expected, got):
    outcome = exact(expected, got)
    assert outcome.accepted, outcome.message


@pytest.mark.parametrize("expected, got", [
    (b"42\n", b"42"),  # a missing final newline
    (b"42", b"42\n"),
    (b"42\n", b"42\r\n"),  # CRLF is a difference here
    (b"42\n", b"42 \n"),
    (b"a", b"A"),
    (b"", b"\n"),
])
def test_exact_rejects_any_difference(expected, got):
    assert not exact(expected, got).accepted


def test_exact_messages_locate_the_difference():
    assert exact(b"a\nb\n", b"a\nc\n").message == "line 2, column 1: expected 'b\\n', got 'c\\n'"
    assert exact(b"a\nbc\n", b"a\nb").message == "line 2, column 2: output ends early; expected 'bc\\n'"
    assert exact(b"a\n", b"a\nmore\n").message == "line 2, column 1: expected end of output, got 'more\\n'"
    assert exact(b"x\n", b"x\r\n").message == "line 1, column 2: expected 'x\\n', got 'x\\r\\n'"


# --- lines -----------------------------------------------------------------------------------

@pytest.mark.parametrize("expected, got", [
    (b"1\n2\n", b"1\n2\n"),
    (b"1\n2\n", b"1\n2"),  # no final newline
    (b"1\n2", b"1\n2\n\n\n"),  # trailing empty lines
    (b"1\n2\n", b"1   \n2\t\n"),  # trailing whitespace on a line
    (b"1\n2\n", b"1\r\n2\r\n"),  # CRLF equals LF
    (b"1\r\n2\r\n", b"1\n2\n"),
    (b"1\n2\n", b"1\n2\n \n\t\n"),  # trailing lines of whitespace only
    (b"", b"\n\n  \n"),  # no output equals blank lines
    (b"a\n\nb\n", b"a\n\nb\n"),
    (b"a \x0b\x0c\n", b"a\n"),  # \v and \f are whitespace too
])
def test_lines_accepts_what_differs_only_in_trailing_whitespace(expected, got):
    outcome = lines(expected, got)
    assert outcome.accepted, outcome.message


@pytest.mark.parametrize("expected, got", [
    (b"1 2\n", b"1  2\n"),  # whitespace inside a line counts
    (b"1\n", b" 1\n"),  # leading whitespace counts
    (b"1\n2\n", b"\n1\n2\n"),  # a leading empty line counts
    (b"a\n\nb\n", b"a\nb\n"),  # an empty line in the middle counts
    (b"a\nb\n", b"a\rb\n"),  # a lone \r does not end a line
    (b"1\n2\n", b"1\n"),
    (b"1\n", b"1\n2\n"),
    (b"1\xc2\xa0\n", b"1\n"),  # U+00A0 is not ASCII whitespace
])
def test_lines_rejects(expected, got):
    assert not lines(expected, got).accepted


def test_lines_messages_name_the_line_and_both_sides():
    assert lines(b"a\nb\nc\n", b"a\nB\nc\n").message == "line 2: expected 'b', got 'B'"
    assert lines(b"a\nb\nc\n", b"a\nb\n").message == "line 3: expected 'c', got end of output (2 lines, 3 expected)"
    assert lines(b"a\n", b"a\nb\n").message == "line 2: expected end of output, got 'b' (2 lines, 1 expected)"
    assert lines(b"1\n2\n", b"1\n2\n").message == "identical"
    assert lines(b"1\n2\n", b"1 \n2").message == "2 lines match"


def test_lines_message_of_a_long_line_shows_the_difference_cut_short():
    prefix = b"x" * 5000
    message = lines(prefix + b"1" + prefix, prefix + b"2" + prefix).message
    assert message.startswith("line 1: expected ")
    assert "x1x" in message and "x2x" in message
    assert len(message) < 300


def test_messages_show_invisible_and_invalid_bytes_escaped():
    message = lines(b"a\tb\n", b"a b\n").message
    assert message == "line 1: expected 'a\\tb', got 'a b'"
    assert "\\xff" in lines(b"ok\n", b"\xff\n").message


# --- tokens ----------------------------------------------------------------------------------

@pytest.mark.parametrize("expected, got", [
    (b"1 2 3\n", b"1 2 3\n"),
    (b"1 2 3\n", b"1\n2\n3"),
    (b"1 2 3", b"  1\t2 \r\n 3 \n\n"),
    (b"1 2\r\n3\r\n", b"1 2\n3\n"),  # CRLF is whitespace like any other
    (b"1\x0b2\x0c3", b"1 2 3"),
    (b"", b" \n\t"),
])
def test_tokens_accepts_any_whitespace_between_equal_tokens(expected, got):
    outcome = tokens(expected, got)
    assert outcome.accepted, outcome.message


@pytest.mark.parametrize("expected, got", [
    (b"1 2 3", b"1 2 4"),
    (b"1 2 3", b"1 2"),
    (b"1 2", b"1 2 3"),
    (b"12", b"1 2"),
    (b"YES", b"yes"),
    (b"1.0", b"1"),  # tokens are words, not numbers
    (b"1 2", b"1\xc2\xa02"),  # U+00A0 does not separate tokens
])
def test_tokens_rejects(expected, got):
    assert not tokens(expected, got).accepted


def test_tokens_messages_name_the_token_and_its_line():
    assert tokens(b"1 2 3 4", b"1 2\n3 5\n").message == "token 4 (line 2): expected '4', got '5'"
    assert tokens(b"1 2 3", b"1\n2\n").message == "token 3: expected '3', got end of output (2 tokens, 3 expected)"
    assert tokens(b"1", b"1\n\n2").message == "token 2 (line 3): expected end of output, got '2' (2 tokens, 1 expected)"
    assert tokens(b"1 2", b"1\n2").message == "2 tokens match"


# --- float -----------------------------------------------------------------------------------

def floats(expected: bytes, got: bytes, absolute: float, relative: float) -> bool:
    return float_tokens(expected, got, absolute_tolerance=absolute, relative_tolerance=relative).accepted


@pytest.mark.parametrize("expected, got, absolute, relative, accepted", [
    # Absolute tolerance, and its boundary as written in decimal (binary would round 1.000001 - 1
    # to a hair over 1e-6).
    (b"1", b"1.000001", 1e-6, 0, True),
    (b"1", b"0.999999", 1e-6, 0, True),
    (b"1", b"1.0000011", 1e-6, 0, False),
    (b"0.1", b"0.2", 0.1, 0, True),
    (b"0.1", b"0.2000001", 0.1, 0, False),
    # Relative tolerance, relative to the expected value.
    (b"1000000", b"1000001", 0, 1e-6, True),
    (b"1000000", b"1000001.1", 0, 1e-6, False),
    (b"100", b"111", 0, 0.1, False),  # 11 > 0.1 * 100
    (b"111", b"100", 0, 0.1, True),  # 11 <= 0.1 * 111
    (b"-1000000", b"-1000001", 0, 1e-6, True),
    # Either tolerance suffices.
    (b"1000000", b"1000001", 1e-6, 1e-6, True),
    (b"0.000001", b"0.0000015", 1e-6, 1e-6, True),
    (b"1e-9", b"3e-9", 0, 1e-6, False),
    # No tolerance: numeric equality, however the number is written.
    (b"1", b"1.000", 0, 0, True),
    (b"1000", b"1e3", 0, 0, True),
    (b"0.5", b".5", 0, 0, True),
    (b"0", b"-0.0", 0, 0, True),
    (b"+2", b"2", 0, 0, True),
    (b"1", b"1.0000000000000002", 0, 0, False),
    # Beyond binary floating point's range, still decimal numbers.
    (b"1e400", b"1.0000001e400", 0, 1e-6, True),
    (b"1e400", b"2e400", 0, 1e-6, False),
    (b"1e999999999999999999", b"-1e999999999999999999", 1e-6, 1e-6, False),
])
def test_float_tolerances(expected, got, absolute, relative, accepted):
    assert floats(expected, got, absolute, relative) is accepted


@pytest.mark.parametrize("expected, got, accepted", [
    (b"nan", b"NaN", True),
    (b"nan", b"-nan", True),
    (b"nan", b"0", False),
    (b"0", b"nan", False),
    (b"inf", b"Infinity", True),
    (b"-inf", b"-INF", True),
    (b"inf", b"-inf", False),
    (b"inf", b"1e308", False),
    (b"1e308", b"inf", False),
    (b"inf", b"nan", False),
])
def test_float_nan_and_infinity_match_only_their_own_kind(expected, got, accepted):
    assert floats(expected, got, 1e-6, 1e-6) is accepted


@pytest.mark.parametrize("expected, got, accepted", [
    (b"YES 1.5", b"YES 1.5000001", True),
    (b"YES 1.5", b"yes 1.5", False),  # words are compared exactly
    (b"0x10", b"16", False),  # hex is a word, not a number
    (b"1_000", b"1000", False),  # so are digit separators
    (b"1.5", b"abc", False),
    (b"1 2 3", b"1 2", False),
    (b"1 2", b"1 2 3", False),
    (b"1.0\r\n2.0\r\n", b"1 2", True),
])
def test_float_words_and_token_counts(expected, got, accepted):
    assert floats(expected, got, 1e-6, 1e-6) is accepted


def test_float_messages():
    message = float_tokens(b"1.0 2.0", b"1.0 2.00001").message
    assert message == ("token 2 (line 1): expected '2.0', got '2.00001', a difference of 1e-05 "
                       "(tolerance: absolute 1e-06, relative 1e-06)")
    assert float_tokens(b"1\n2.5", b"1\nabc").message == "token 2 (line 2): expected the number '2.5', got 'abc'"
    assert float_tokens(b"YES", b"NO").message == "token 1 (line 1): expected 'YES', got 'NO'"
    assert float_tokens(b"1 2", b"1.0000001 2").message == "2 tokens match"


def test_float_default_tolerance_is_one_in_a_million():
    assert DEFAULT_FLOAT_TOLERANCE == 1e-6
    assert float_tokens(b"3.14159265", b"3.1415936").accepted
    assert not float_tokens(b"3.14159265", b"3.1416").accepted


# --- Judge0 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("expected, stdout, accepted", [
    (None, b"anything", True),  # no expected output: any output is accepted
    (None, b"", True),
    ("42", b"42", True),
    ("42", b"42\n", True),
    ("42\n", b"42", True),
    ("1\n2", b"1  \n2\t\n\n \n", True),  # trailing whitespace per line and at the end
    ("1\n2\n", b"1\r\n2\r\n", True),  # \r before a newline is trailing whitespace
    ("42", b"42\x00\x00", True),  # Ruby's rstrip removes NUL too
    ("42", b" 42", False),  # leading whitespace counts
    ("42", b"\n42", False),  # a leading blank line counts
    ("1\n2", b"1\n\n2", False),  # a blank line inside counts
    ("1 2", b"1  2", False),
    ("42", b"42\xc2\xa0", False),  # U+00A0 is not whitespace to Ruby's rstrip
    ("", b"\n", True),
    ("", b"", False),  # Judge0 stores an empty stdout as null, and null equals no expectation
    ("42", b"", False),
    ("42", None, False),
    ("héllo", "héllo\n".encode(), True),  # a str is its UTF-8 bytes
    (b"\xffraw\n", b"\xffraw", True),  # bytes are compared as bytes, valid UTF-8 or not
    ("42", "42\n", True),
])
def test_judge0_accepts_as_judge0_1_13_1_does(expected, stdout, accepted):
    assert judge0_accepts(expected, stdout) is accepted


# --- checker specs ---------------------------------------------------------------------------

@pytest.mark.parametrize("data, spec", [
    ({"type": "exact"}, OutputChecker("exact")),
    ({"type": "lines"}, OutputChecker("lines")),
    ("tokens", OutputChecker("tokens")),
    ({"type": "float"}, OutputChecker("float", DEFAULT_FLOAT_TOLERANCE, DEFAULT_FLOAT_TOLERANCE)),
    ({"type": "float", "absolute_tolerance": 1e-9, "relative_tolerance": 1e-3}, OutputChecker("float", 1e-9, 1e-3)),
    ({"type": "float", "absolute_tolerance": 0.01}, OutputChecker("float", 0.01, 0.0)),  # only that one
    ({"type": "float", "relative_tolerance": 0}, OutputChecker("float", 0.0, 0.0)),
    ({"type": "program", "language": "cpp", "source": "int main() {}"}, ProgramSource("cpp", "int main() {}")),
])
def test_parse_checker(data, spec):
    assert parse_checker(data) == spec


@pytest.mark.parametrize("data, message", [
    (None, "checker: expected an object with a 'type', got None"),
    (["lines"], "checker: expected an object with a 'type', got ['lines']"),
    ({}, "checker: unknown type None (known: exact, lines, tokens, float, program)"),
    ({"type": "diff"}, "checker: unknown type 'diff' (known: exact, lines, tokens, float, program)"),
    ("LINES", "checker: unknown type 'LINES'"),
    ({"type": "lines", "absolute_tolerance": 1}, "checker: type 'lines' has no option 'absolute_tolerance' "
                                                 "(it takes no options)"),
    ({"type": "float", "tolerance": 1e-6}, "checker: type 'float' has no option 'tolerance' "
                                           "(allowed: absolute_tolerance, relative_tolerance)"),
    ({"type": "float", "absolute_tolerance": -1e-6}, "checker: absolute_tolerance must be a finite number >= 0"),
    ({"type": "float", "relative_tolerance": float("nan")}, "checker: relative_tolerance must be a finite number"),
    ({"type": "float", "relative_tolerance": float("inf")}, "checker: relative_tolerance must be a finite number"),
    ({"type": "float", "absolute_tolerance": "1e-6"}, "checker: absolute_tolerance must be a finite number"),
    ({"type": "float", "absolute_tolerance": True}, "checker: absolute_tolerance must be a finite number"),
    ({"type": "program", "source": "x"}, "checker: type 'program' needs 'language', a non-empty string"),
    ({"type": "program", "language": "cpp"}, "checker: type 'program' needs 'source', a non-empty string"),
    ({"type": "program", "language": "cpp", "source": "  \n"}, "checker: type 'program' needs 'source'"),
    ({"type": "program", "language": 7, "source": "x"}, "checker: type 'program' needs 'language'"),
    ({"type": "program", "language": "cpp", "source": "x", "stdin": ""}, "checker: type 'program' has no option "
                                                                         "'stdin' (allowed: language, source)"),
])
def test_parse_checker_refuses_malformed_specs(data, message):
    with pytest.raises(CheckerError) as raised:
        parse_checker(data)
    assert str(raised.value).startswith(message)
    assert isinstance(raised.value, ValueError)


def test_a_parsed_spec_checks_with_its_options():
    loose = parse_checker({"type": "float", "absolute_tolerance": 0.5})
    assert loose.check(b"1", b"1.4").accepted
    assert not loose.check(b"1", b"1.6").accepted
    assert parse_checker("lines").check(b"1\n", b"1 \r\n").accepted
    assert not parse_checker("exact").check(b"1\n", b"1 \r\n").accepted
    assert parse_checker("tokens").check(b"1 2", b"1\n2").accepted


# --- huge inputs -----------------------------------------------------------------------------

def timed(check, expected: bytes, got: bytes):
    started = time.perf_counter()
    outcome = check(expected, got)
    return outcome, time.perf_counter() - started


HUGE_LINES = 200_000 if EMULATED_CPU else 1_000_000


@pytest.mark.parametrize("check", [exact, lines, tokens, float_tokens])
def test_huge_outputs_that_differ_at_the_end_are_checked_in_linear_time(check):
    body = b"".join(b"%d 0.5\n" % number for number in range(HUGE_LINES))
    outcome, elapsed_s = timed(check, body + b"1\n", body + b"2\n")
    assert not outcome.accepted
    assert f"{HUGE_LINES + 1}" in outcome.message  # the last line, or the last token's line
    assert elapsed_s < LINEAR_TIME_BUDGET_S


@pytest.mark.parametrize("check", [exact, lines, tokens, float_tokens])
def test_huge_equal_outputs_are_accepted_in_linear_time(check):
    body = b"".join(b"%d 0.5\n" % number for number in range(HUGE_LINES))
    outcome, elapsed_s = timed(check, body, body)
    assert outcome.accepted
    assert elapsed_s < LINEAR_TIME_BUDGET_S


def test_huge_equivalent_outputs_are_accepted_in_linear_time():
    expected = b"".join(b"%d 0.5\n" % number for number in range(HUGE_LINES))
    for check, got in [
        (lines, expected.replace(b"\n", b" \r\n")),
        (tokens, expected.replace(b" ", b"\n")),
        (float_tokens, expected.replace(b"0.5", b"0.5000001")),
    ]:
        outcome, elapsed_s = timed(check, expected, got)
        assert outcome.accepted, (check.__name__, outcome.message)
        assert elapsed_s < LINEAR_TIME_BUDGET_S, check.__name__


@pytest.mark.parametrize("check", [exact, lines, tokens, float_tokens])
def test_a_huge_single_line_or_token_is_quoted_short(check):
    huge = b"7" * (HUGE_LINES * 10)
    # Differences at the start and at the end (the float checker's numbers must differ by more
    # than a millionth, so only at the start).
    pairs = [(b"1" + huge, b"2" + huge)] + ([] if check is float_tokens else [(huge + b"1", huge + b"2")])
    for expected, got in pairs:
        outcome, elapsed_s = timed(check, expected, got)
        assert not outcome.accepted
        assert len(outcome.message) < 400
        assert elapsed_s < LINEAR_TIME_BUDGET_S
