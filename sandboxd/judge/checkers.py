"""Output checkers: does what a program printed answer the test?

Each checker is a pure function of two byte strings, the expected output and the program's,
returning a `CheckOutcome` whose message says, on a rejection, where the outputs part and how
(line or token number, both sides quoted and cut to about a hundred characters), so a verdict
can be shown as it is.

- `exact`: byte for byte.
- `lines`: line by line, ignoring whitespace at the end of each line and empty lines at the
  end of the output. A line ends at "\\n" only: "\\r" counts as trailing whitespace, so CRLF
  output equals LF output, while a lone "\\r" does not break a line.
- `tokens`: the whitespace-separated tokens (ASCII whitespace: space, \\t, \\n, \\r, \\v, \\f)
  are equal; CRLF is whitespace like any other.
- `float_tokens` (type "float"): tokens again, but where the expected token is a decimal
  number (or inf/nan), the program's must be a number within an absolute OR a relative
  tolerance of it (Kattis's rule: |got - expected| <= absolute, or <= relative * |expected|).
  Numbers are compared in exact decimal arithmetic, so a difference of exactly the tolerance
  as written is accepted, whatever binary floating point would round it to.

All of them run in time linear in the outputs: identical outputs are accepted at C speed,
and the search for the first difference walks each output once.

`judge0_accepts` is Judge0 1.13.1's own rule for `expected_output`, kept separate because
the Judge0-compatible API must reproduce it, quirks included.

`parse_checker` reads a checker named in an API request ({"type": "float", ...}, or a
checker program, whose runner comes later) and refuses anything malformed with a
`CheckerError` saying what.
"""

from __future__ import annotations

import decimal
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

EXCERPT_CHARS = 100  # how much of a line or token a message quotes
DEFAULT_FLOAT_TOLERANCE = 1e-6
BUILTIN_TYPES = ("exact", "lines", "tokens", "float")
CHECKER_TYPES = (*BUILTIN_TYPES, "program")

# What bytes.split() and bytes.rstrip() treat as whitespace: the ASCII set, no Unicode.
_ASCII_WHITESPACE = b" \t\n\r\x0b\x0c"
_TOKEN_RE = re.compile(rb"[^ \t\n\r\x0b\x0c]+")
# A decimal number as programs print them (no hex, no digit separators), or inf/nan.
_NUMBER_RE = re.compile(rb"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.IGNORECASE)
# Exact enough for any tolerance a judge uses; exponents as wide as decimal allows.
_DECIMAL_CONTEXT = decimal.Context(prec=60, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
_CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class CheckOutcome:
    accepted: bool
    message: str  # on a rejection, where and how the outputs differ; on acceptance, a summary


def _quote(data: bytes) -> str:
    """A piece of output as a message shows it: escapes visible, about EXCERPT_CHARS long."""
    text = data[: EXCERPT_CHARS * 4].decode("utf-8", "backslashreplace")
    if len(text) > EXCERPT_CHARS or len(data) > EXCERPT_CHARS * 4:
        text = text[:EXCERPT_CHARS] + "…"
    return repr(text)


def _excerpt(data: bytes, at: int) -> str:
    """The line of `data` holding offset `at` (with its newline, which may be the difference),
    starting a little before `at` when the line is long, so the difference stays in view."""
    line_start = data.rfind(b"\n", 0, at) + 1
    newline = data.find(b"\n", at)
    line_end = len(data) if newline < 0 else newline + 1
    start = max(line_start, at - EXCERPT_CHARS // 2)
    quoted = _quote(data[start:line_end])
    return "…" + quoted if start > line_start else quoted


def _first_difference(first: bytes, second: bytes) -> int:
    """The first offset where the two differ (the shorter one's length if one is a prefix).
    Chunks are compared at C speed; only the chunk holding the difference is walked."""
    limit = min(len(first), len(second))
    start = 0
    while start < limit:
        end = min(start + _CHUNK_BYTES, limit)
        if first[start:end] != second[start:end]:
            return next(index for index in range(start, end) if first[index] != second[index])
        start = end
    return limit


def _line_and_column(data: bytes, at: int) -> tuple[int, int]:
    line = data.count(b"\n", 0, at) + 1
    column = at - (data.rfind(b"\n", 0, at) + 1) + 1
    return line, column


# --- exact -----------------------------------------------------------------------------------

def exact(expected: bytes, got: bytes) -> CheckOutcome:
    if expected == got:
        return CheckOutcome(True, f"identical ({len(got)} bytes)")
    at = _first_difference(expected, got)
    line, column = _line_and_column(expected, at)
    where = f"line {line}, column {column}"
    if at == len(got):
        return CheckOutcome(False, f"{where}: output ends early; expected {_excerpt(expected, at)}")
    if at == len(expected):
        return CheckOutcome(False, f"{where}: expected end of output, got {_excerpt(got, at)}")
    return CheckOutcome(False, f"{where}: expected {_excerpt(expected, at)}, got {_excerpt(got, at)}")


# --- lines -----------------------------------------------------------------------------------

def _significant_lines(data: bytes) -> list[bytes]:
    rows = [row.rstrip(_ASCII_WHITESPACE) for row in data.split(b"\n")]
    while rows and not rows[-1]:
        rows.pop()
    return rows


def _line_difference(expected: bytes, got: bytes) -> str:
    at = _first_difference(expected, got)
    return f"expected {_excerpt(expected, at)}, got {_excerpt(got, at)}"


def lines(expected: bytes, got: bytes) -> CheckOutcome:
    if expected == got:
        return CheckOutcome(True, "identical")
    wanted, given = _significant_lines(expected), _significant_lines(got)
    if wanted == given:
        return CheckOutcome(True, f"{len(wanted)} lines match")
    for index, (want, give) in enumerate(zip(wanted, given)):
        if want != give:
            return CheckOutcome(False, f"line {index + 1}: {_line_difference(want, give)}")
    index = min(len(wanted), len(given))
    counts = f"({len(given)} lines, {len(wanted)} expected)"
    if len(given) < len(wanted):
        return CheckOutcome(False, f"line {index + 1}: expected {_quote(wanted[index])}, got end of output {counts}")
    return CheckOutcome(False, f"line {index + 1}: expected end of output, got {_quote(given[index])} {counts}")


# --- tokens ----------------------------------------------------------------------------------

def _line_of_token(data: bytes, index: int) -> int:
    for number, match in enumerate(_TOKEN_RE.finditer(data)):
        if number == index:
            return data.count(b"\n", 0, match.start()) + 1
    return data.count(b"\n") + 1


def _compare_tokens(wanted: list[bytes], given: list[bytes], got: bytes,
                    problem: Callable[[bytes, bytes], str | None]) -> CheckOutcome:
    """Tokens pairwise; `problem` says why two tokens that are not byte-identical differ
    (None: they match all the same, as 1.0 and 1.00 do for the float checker)."""
    if wanted == given:  # at C speed: byte-identical tokens always match
        return CheckOutcome(True, f"{len(wanted)} tokens match")
    for index, (want, give) in enumerate(zip(wanted, given)):
        if want != give:
            reason = problem(want, give)
            if reason is not None:
                return CheckOutcome(False, f"token {index + 1} (line {_line_of_token(got, index)}): {reason}")
    index = min(len(wanted), len(given))
    counts = f"({len(given)} tokens, {len(wanted)} expected)"
    if len(given) < len(wanted):
        return CheckOutcome(False, f"token {index + 1}: expected {_quote(wanted[index])}, got end of output {counts}")
    if len(given) > len(wanted):
        return CheckOutcome(False, f"token {index + 1} (line {_line_of_token(got, index)}): expected end of "
                                   f"output, got {_quote(given[index])} {counts}")
    return CheckOutcome(True, f"{len(wanted)} tokens match")


def _different(want: bytes, give: bytes) -> str:
    return f"expected {_quote(want)}, got {_quote(give)}"


def tokens(expected: bytes, got: bytes) -> CheckOutcome:
    return _compare_tokens(expected.split(), got.split(), got, _different)


# --- float -----------------------------------------------------------------------------------

def _number(token: bytes) -> decimal.Decimal | None:
    if _NUMBER_RE.fullmatch(token) is None:
        return None
    return decimal.Decimal(token.decode("ascii"))


def _tolerance(value: float) -> decimal.Decimal:
    # repr is the shortest decimal that reads back as the float: 1e-06 is exactly 0.000001.
    return decimal.Decimal(repr(float(value)))


def _difference(want: decimal.Decimal, give: decimal.Decimal) -> decimal.Decimal | None:
    """|give - want|; None when NaN or infinity make it meaningless (they match only their
    own kind: NaN any NaN, an infinity the same infinity)."""
    if want.is_nan() or give.is_nan() or want.is_infinite() or give.is_infinite():
        return None
    try:
        return _DECIMAL_CONTEXT.subtract(give, want).copy_abs()
    except decimal.DecimalException:  # past even decimal's range: as far apart as can be
        return decimal.Decimal("Infinity")


def _numbers_match(want: decimal.Decimal, give: decimal.Decimal, absolute: decimal.Decimal,
                   relative: decimal.Decimal) -> bool:
    difference = _difference(want, give)
    if difference is None:
        return (want.is_nan() and give.is_nan()) or want == give
    return difference <= absolute or difference <= _DECIMAL_CONTEXT.multiply(relative, want.copy_abs())


def float_tokens(expected: bytes, got: bytes, *, absolute_tolerance: float = DEFAULT_FLOAT_TOLERANCE,
                 relative_tolerance: float = DEFAULT_FLOAT_TOLERANCE) -> CheckOutcome:
    absolute, relative = _tolerance(absolute_tolerance), _tolerance(relative_tolerance)

    def problem(want: bytes, give: bytes) -> str | None:
        wanted = _number(want)
        if wanted is None:  # words are compared as words
            return _different(want, give)
        given = _number(give)
        if given is None:
            return f"expected the number {_quote(want)}, got {_quote(give)}"
        if _numbers_match(wanted, given, absolute, relative):
            return None
        difference = _difference(wanted, given)
        detail = "" if difference is None else f", a difference of {float(difference):.3g}"
        return (f"expected {_quote(want)}, got {_quote(give)}{detail} (tolerance: absolute "
                f"{absolute_tolerance:g}, relative {relative_tolerance:g})")

    return _compare_tokens(expected.split(), got.split(), got, problem)


# --- Judge0 ----------------------------------------------------------------------------------

# Ruby's String#rstrip removes NUL as well as ASCII whitespace.
_RUBY_RSTRIP = b"\x00\t\n\x0b\x0c\r "


def _judge0_strip(text: bytes) -> bytes:
    return b"\n".join(line.rstrip(_RUBY_RSTRIP) for line in text.split(b"\n")).rstrip(_RUBY_RSTRIP)


def judge0_accepts(expected: str | bytes | None, stdout: str | bytes | None) -> bool:
    """Whether Judge0 1.13.1 would call this output Accepted (rather than Wrong Answer).

    Its rule (IsolateJob#determine_status and #strip): with no expected_output, any output is
    accepted. Otherwise both texts are split at "\\n", trailing whitespace and NUL removed
    from each line, the lines joined with "\\n" again and trailing whitespace and NUL removed
    from the whole; the results must be equal byte for byte. Leading whitespace and blank
    lines before the output matter; "\\r" before a newline does not. Judge0 stores an empty
    stdout as null, and null never equals an expected output, even an empty one: a program
    that prints nothing is a wrong answer whenever expected_output is set.
    """
    if expected is None:
        return True
    if not stdout:
        return False
    wanted = expected.encode("utf-8") if isinstance(expected, str) else expected
    given = stdout.encode("utf-8") if isinstance(stdout, str) else stdout
    return _judge0_strip(wanted) == _judge0_strip(given)


# --- checker specs ---------------------------------------------------------------------------

class CheckerError(ValueError):
    """A checker in a request is malformed; the message says which part and why."""


@dataclass(frozen=True)
class OutputChecker:
    """One of the built-in checkers; the tolerances apply to type "float" only."""

    type: str
    absolute_tolerance: float = 0.0
    relative_tolerance: float = 0.0

    def check(self, expected: bytes, got: bytes) -> CheckOutcome:
        if self.type == "float":
            return float_tokens(expected, got, absolute_tolerance=self.absolute_tolerance,
                                relative_tolerance=self.relative_tolerance)
        return _BUILTIN[self.type](expected, got)


@dataclass(frozen=True)
class ProgramSource:
    """A program in a language of the catalogue, as source: a checker program (or an
    interactive problem's interactor); only its shape is checked here."""

    language: str
    source: str


CheckerSpec = OutputChecker | ProgramSource

_BUILTIN: dict[str, Callable[[bytes, bytes], CheckOutcome]] = {"exact": exact, "lines": lines, "tokens": tokens}
_TOLERANCES = ("absolute_tolerance", "relative_tolerance")
_KEYS: dict[str, tuple[str, ...]] = {"exact": (), "lines": (), "tokens": (), "float": _TOLERANCES,
                                     "program": ("language", "source")}


def _parse_tolerance(data: Mapping[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CheckerError(f"checker: {key} must be a finite number >= 0, got {value!r}")
    return float(value)


def _parse_text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CheckerError(f"checker: type 'program' needs {key!r}, a non-empty string")
    return value


def parse_checker(data: Any) -> CheckerSpec:
    """A checker from an API request: {"type": "lines"}, or just "lines";
    {"type": "float", "absolute_tolerance": 1e-6, "relative_tolerance": 1e-6} (neither given:
    both DEFAULT_FLOAT_TOLERANCE; one given: only that one applies);
    {"type": "program", "language": "cpp", "source": "..."}."""
    if isinstance(data, str):
        data = {"type": data}
    if not isinstance(data, Mapping):
        raise CheckerError(f"checker: expected an object with a 'type', got {data!r}")
    kind = data.get("type")
    if kind not in _KEYS:
        raise CheckerError(f"checker: unknown type {kind!r} (known: {', '.join(CHECKER_TYPES)})")
    allowed = _KEYS[kind]
    for key in data:
        if key != "type" and key not in allowed:
            detail = f"allowed: {', '.join(allowed)}" if allowed else "it takes no options"
            raise CheckerError(f"checker: type {kind!r} has no option {key!r} ({detail})")
    if kind == "program":
        return ProgramSource(language=_parse_text(data, "language"), source=_parse_text(data, "source"))
    if kind != "float":
        return OutputChecker(type=kind)
    if not any(key in data for key in _TOLERANCES):
        return OutputChecker(type="float", absolute_tolerance=DEFAULT_FLOAT_TOLERANCE,
                             relative_tolerance=DEFAULT_FLOAT_TOLERANCE)
    absolute, relative = (_parse_tolerance(data, key) if key in data else 0.0 for key in _TOLERANCES)
    return OutputChecker(type="float", absolute_tolerance=absolute, relative_tolerance=relative)
