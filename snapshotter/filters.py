"""containerd's filter language, as its `filters` package defines it.

    selectors := selector ("," selector)*
    selector  := fieldpath (operator value)?
    fieldpath := field ('.' field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := "..." (Go escapes); /.../ and |...| also for "~="

Several filter strings are OR-ed; the selectors inside one string are AND-ed.
A selector without operator tests for presence. This module knows nothing of
snapshots: `match` takes a callable mapping a field path to (value, present).

`~=` patterns are RE2 (Go's regexp syntax, what containerd uses): matching takes linear
time, so no pattern can hold the process (Python's `re` backtracks, and holds the GIL while
it does: one `(a+)+$` froze every RPC). A pattern RE2 rejects is a syntax error here,
where containerd would log it and match nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import re2

Lookup = Callable[[Sequence[str]], tuple[str, bool]]

PRESENT, EQUAL, NOT_EQUAL, MATCHES = "?", "==", "!=", "~="

_QUOTES = '"/|'
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


class FilterSyntaxError(ValueError):
    """A filter string that containerd's parser would reject too."""


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str = PRESENT
    value: str = ""
    regex: Any = field(default=None, compare=False)  # compiled RE2 pattern for "~="

    def matches(self, lookup: Lookup) -> bool:
        value, present = lookup(self.fieldpath)
        if self.operator == PRESENT:
            return present
        if self.operator == EQUAL:
            return present and value == self.value
        if self.operator == NOT_EQUAL:
            return value != self.value
        return self.regex is not None and self.regex.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """An OR of AND-ed selector lists; the empty filter matches everything."""

    alternatives: tuple[tuple[Selector, ...], ...] = ()

    def matches(self, lookup: Lookup) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.matches(lookup) for s in conj) for conj in self.alternatives)


def parse_all(strings: Sequence[str]) -> Filter:
    """Parse several filter strings (OR-ed); an empty string matches everything."""
    alternatives = []
    for s in strings:
        if s == "":
            return Filter()  # containerd: Parse("") is Always, so the OR is always true
        alternatives.append(_Parser(s).selectors())
    return Filter(tuple(alternatives))


def _is_field_char(c: str) -> bool:
    return c == "_" or ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9")


def _is_value_char(c: str) -> bool:
    return c != "," and not c.isspace() and c.isprintable()


class _Parser:
    """A direct port of the scanner + recursive-descent parser of containerd's filters."""

    def __init__(self, text: str) -> None:
        if "\x00" in text:
            raise FilterSyntaxError(f"filters: unexpected null in {text!r}")
        self.text = text
        self.pos = 0

    def _error(self, msg: str) -> FilterSyntaxError:
        return FilterSyntaxError(f"filters: parse error: [{self.text} >|{self.text[self.pos:]}]: {msg}")

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _peek_raw(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def selectors(self) -> tuple[Selector, ...]:
        result = [self.selector()]
        while True:
            c = self._peek_raw()
            if c == "":
                return tuple(result)
            if c != ",":
                raise self._error(f"unexpected input: {c}")
            self.pos += 1
            result.append(self.selector())

    def selector(self) -> Selector:
        path = self.fieldpath()
        c = self._peek_raw()
        if c in ("", ",", "."):
            return Selector(tuple(path))
        op = self.operator()
        value = self.value(allow_alt_quotes=op == MATCHES)
        regex = self._regex(value) if op == MATCHES else None
        return Selector(tuple(path), op, value, regex)

    def _regex(self, pattern: str) -> Any:
        options = re2.Options()
        options.log_errors = False  # RE2 would print to stderr; we raise instead
        try:
            return re2.compile(pattern, options)
        except re2.error as e:
            detail = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            raise self._error(f"invalid regular expression {pattern!r}: {detail}") from None

    def fieldpath(self) -> list[str]:
        path = [self.field()]
        while self._peek_raw() == ".":
            self.pos += 1
            path.append(self.field())
        return path

    def field(self) -> str:
        self._skip_space()
        c = self._peek_raw()
        if c == "":
            raise self._error("expected field or quoted")
        if c in _QUOTES:
            return self.quoted(allow_alt_quotes=False)
        if _is_field_char(c):
            start = self.pos
            while self.pos < len(self.text) and _is_field_char(self.text[self.pos]):
                self.pos += 1
            return self.text[start : self.pos]
        raise self._error("expected field or quoted")

    def operator(self) -> str:
        self._skip_space()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "=!~":
            self.pos += 1
        op = self.text[start : self.pos]
        if not op:
            raise self._error('expected an operator ("=="|"!="|"~=")')
        if op not in (EQUAL, NOT_EQUAL, MATCHES):
            raise self._error(f"unsupported operator {op!r}")
        return op

    def value(self, allow_alt_quotes: bool) -> str:
        self._skip_space()
        c = self._peek_raw()
        if c == "":
            raise self._error("unexpected EOF")
        if c in _QUOTES:
            return self.quoted(allow_alt_quotes)
        if c in ",.=!~":
            raise self._error("expected value or quoted")
        start = self.pos
        while self.pos < len(self.text) and _is_value_char(self.text[self.pos]):
            self.pos += 1
        if self.pos == start:
            raise self._error("expected value or quoted")
        return self.text[start : self.pos]

    def quoted(self, allow_alt_quotes: bool) -> str:
        quote = self.text[self.pos]
        if quote != '"' and not allow_alt_quotes:
            raise self._error("invalid quote encountered")
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self._error("quoted literal not terminated")
            c = self.text[self.pos]
            if c == quote:
                self.pos += 1
                return "".join(out)
            if c != "\\":
                out.append(c)
                self.pos += 1
                continue
            out.append(self._escape(quote))

    def _escape(self, quote: str) -> str:
        self.pos += 1  # the backslash
        c = self._peek_raw()
        if c in _SIMPLE_ESCAPES:
            self.pos += 1
            return _SIMPLE_ESCAPES[c]
        if c == quote:
            self.pos += 1
            return quote
        digits = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}
        if c in digits:
            base, n = digits[c]
            start = self.pos + 1
        elif c in "01234567" and c:
            base, n = 8, 3
            start = self.pos
        else:
            raise self._error("illegal escape sequence")
        text = self.text[start : start + n]
        try:
            if len(text) != n:
                raise ValueError
            code = int(text, base)
            char = chr(code)
        except ValueError:
            raise self._error("illegal numeric escape sequence") from None
        self.pos = start + n
        return char
