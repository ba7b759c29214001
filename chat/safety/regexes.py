"""Faster scans for the safety patterns, with the same matches.

Python's `re` tries every alternative of a large alternation at every
position of the text. The rules and the injection signals are such
alternations, and they scan every message and every output window. Most
positions (spaces, punctuation, letters no rule begins with) cannot start a
match, so `guarded` puts a lookahead for the characters a match can begin
with in front of the pattern: at any other position the search moves on
after one character-class test instead of a few hundred failed branches
(about 1.8x faster on the rules, decision 0008).

The set is computed from the parsed pattern, so it follows the rules as they
change. It is a superset of the real first characters (lookarounds and
anchors are skipped over, which only widens it), which keeps the guarded
pattern's matches exactly those of the original. Whatever the computation
cannot bound (`.`, `\\w`, a negated class, a pattern that can match the
empty string) leaves the pattern unguarded.

`shared_prefixes` goes further for a pattern that is only asked whether it
matches (the rules' combined prefilter): `re` skips an alternative for the
price of one character test only when the alternative begins with a literal,
and the rules' few hundred alternatives sit behind `\b` and groups, so each
word start paid for all of them. Multiplied out and sharing their leading
characters like the words of a dictionary, only the alternatives that begin
with a word's letters are tried (about 3x faster on the rules).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from typing import Any

_parser: Any
_c: Any
_compiler: Any
try:  # CPython's own parser for `re`, as `re` uses it (3.11+; private, hence the fallback).
    _parser = importlib.import_module("re._parser")
    _c = importlib.import_module("re._constants")
    _compiler = importlib.import_module("re._compiler")
except ImportError:  # pragma: no cover - another Python: no guard, same matches
    _parser = _c = _compiler = None

_GLOBAL_FLAGS = re.compile(r"\A\(\?[aiLmsux]+\)")
# A class range wider than this is not spelled out (it would only slow the guard).
_MAX_RANGE = 256
# A pattern that multiplies out into more alternatives than this is left as it is.
_MAX_ALTERNATIVES = 4096


class _Unbounded(Exception):
    """The pattern can begin with characters we do not enumerate."""


def first_chars(pattern: re.Pattern[str]) -> frozenset[str] | None:
    """Return every character a match of `pattern` can begin with, or None if unbounded."""
    if _parser is None or not isinstance(pattern.pattern, str):
        return None
    try:
        chars, can_be_empty = _sequence(_parser.parse(pattern.pattern, pattern.flags))
    except (_Unbounded, re.error, RecursionError):
        return None
    return None if can_be_empty or not chars else frozenset(chars)


def guarded(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """Return `pattern` behind a lookahead for its first characters, when they are bounded."""
    chars = first_chars(pattern)
    if chars is None:
        return pattern
    charset = "".join(re.escape(c) for c in sorted(chars))
    # Inline global flags must open a pattern; pattern.flags carries them.
    source = _GLOBAL_FLAGS.sub("", pattern.pattern, count=1)
    try:
        return re.compile(f"(?=[{charset}])(?:{source})", pattern.flags)
    except re.error:  # e.g. global inline flags that must open the pattern
        return pattern


def _sequence(items: Iterable[tuple[Any, Any]]) -> tuple[set[str], bool]:
    """First characters of a sequence, and whether all of it can match nothing."""
    chars: set[str] = set()
    for op, arg in items:
        first, can_be_empty = _item(op, arg)
        chars |= first
        if not can_be_empty:
            return chars, False
    return chars, True


def _item(op: Any, arg: Any) -> tuple[set[str], bool]:
    if op is _c.LITERAL:
        return {chr(arg)}, False
    if op is _c.IN:
        return _class(arg), False
    if op is _c.SUBPATTERN:
        _group, add_flags, _del_flags, body = arg
        if add_flags & re.IGNORECASE:  # (?i:...) inside: other cases too, not listed
            raise _Unbounded(op)
        return _sequence(body)
    if op is _c.BRANCH:
        chars: set[str] = set()
        can_be_empty = False
        for alternative in arg[1]:
            first, empty = _sequence(alternative)
            chars |= first
            can_be_empty = can_be_empty or empty
        return chars, can_be_empty
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
        low, _high, body = arg
        first, empty = _sequence(body)
        return first, empty or low == 0
    if op is _c.ATOMIC_GROUP:
        return _sequence(arg)
    if op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
        # Zero-width: the match begins with what follows. Skipping a lookahead
        # only widens the set, which is safe.
        return set(), True
    raise _Unbounded(op)


def _class(items: Iterable[tuple[Any, Any]]) -> set[str]:
    chars: set[str] = set()
    for op, arg in items:
        if op is _c.LITERAL:
            chars.add(chr(arg))
        elif op is _c.RANGE and arg[1] - arg[0] <= _MAX_RANGE:
            chars.update(chr(code) for code in range(arg[0], arg[1] + 1))
        else:  # NEGATE, CATEGORY (\w, \d, \s), a wide range
            raise _Unbounded(op)
    return chars


class _TooMany(Exception):
    """Multiplied out, the pattern would have more than _MAX_ALTERNATIVES alternatives."""


def shared_prefixes(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """Return a pattern that can begin a match at exactly the positions `pattern` can.

    The leading groups, alternations and optional parts of `pattern` are
    multiplied out into plain alternatives, and alternatives that begin with
    the same literal character or anchor share it, level by level. Where a
    match can begin is unchanged; which alternative wins, and so where a
    match ends, may differ: use the result to ask whether, or where first, a
    text matches. A pattern with capturing groups, or that would multiply
    out into too many alternatives, is returned as it is.
    """
    if _parser is None or _compiler is None or not isinstance(pattern.pattern, str):
        return pattern
    try:
        tree = _parser.parse(pattern.pattern, pattern.flags)
        if tree.state.groups > 1:  # group 0 is the whole match
            return pattern
        alternatives = _multiplied_out(list(tree.data), [0])
        rebuilt = _shared(tree.state, alternatives)
        if len(rebuilt) > 1:
            rebuilt = [_node(tree.state, [(_c.BRANCH, (None, rebuilt))])]
        return _compiler.compile(rebuilt[0], pattern.flags)
    except (_TooMany, re.error, RecursionError, RuntimeError):
        return pattern


def _multiplied_out(items: list[tuple[Any, Any]], count: list[int]) -> list[list[tuple[Any, Any]]]:
    """Return the sequences `items` stands for, its leading choices made each way."""
    if not items:
        return _as_is(items, count)
    (op, arg), rest = items[0], items[1:]
    if op is _c.AT:
        return [[items[0], *tail] for tail in _multiplied_out(rest, count)]
    if op is _c.SUBPATTERN and arg[0] is None and not arg[1] and not arg[2]:
        return _multiplied_out(list(arg[3]) + rest, count)
    if op is _c.BRANCH:
        out: list[list[tuple[Any, Any]]] = []
        for alternative in arg[1]:
            out += _multiplied_out(list(alternative) + rest, count)
        return out
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT) and arg[0] == 0 and arg[1] == 1:
        return _multiplied_out(list(arg[2]) + rest, count) + _multiplied_out(rest, count)
    return _as_is(items, count)


def _as_is(items: list[tuple[Any, Any]], count: list[int]) -> list[list[tuple[Any, Any]]]:
    count[0] += 1
    if count[0] > _MAX_ALTERNATIVES:
        raise _TooMany()
    return [items]


def _shared(state: Any, sequences: list[list[tuple[Any, Any]]]) -> list[Any]:
    """Return alternatives for `sequences`, those with the same first literal or anchor merged."""
    heads: dict[tuple[Any, Any], list[list[tuple[Any, Any]]]] = {}
    others = []
    for sequence in sequences:
        if sequence and sequence[0][0] in (_c.LITERAL, _c.AT):
            heads.setdefault(sequence[0], []).append(sequence[1:])
        else:
            others.append(_node(state, sequence))
    merged = []
    for head, tails in heads.items():
        if len(tails) == 1:
            merged.append(_node(state, [head, *tails[0]]))
        else:
            merged.append(_node(state, [head, (_c.BRANCH, (None, _shared(state, tails)))]))
    return merged + others


def _node(state: Any, items: list[tuple[Any, Any]]) -> Any:
    return _parser.SubPattern(state, items)


# --- How many words a match can span ---------------------------------------------------------


def max_word_breaks(pattern: re.Pattern[str]) -> int | None:
    """Return the most runs of non-word characters a match of `pattern` can hold, or None.

    A match with n such runs spans at most n + 1 words, however long they
    are: the output gate keeps that many words of context (moderation.py).
    None when it is unbounded (`\\W+\\w+` repeated without a bound, `.` or a
    class of both kinds repeated) or cannot be computed.
    """
    if _parser is None:
        return None
    try:
        breaks = _breaks(_parser.parse(pattern.pattern, pattern.flags))
    except (_Unbounded, re.error, RecursionError):
        return None
    return breaks


def _is_word_char(code: int) -> bool:
    return chr(code).isalnum() or chr(code) == "_"


def _kinds(op: Any, arg: Any) -> tuple[bool, bool]:
    """Return whether a one-character item can match a word and a non-word character."""
    if op is _c.LITERAL:
        return _is_word_char(arg), not _is_word_char(arg)
    if op is _c.IN:
        word = other = False
        for item_op, item in arg:
            if item_op is _c.LITERAL:
                word, other = word or _is_word_char(item), other or not _is_word_char(item)
            elif item_op is _c.CATEGORY and item in (_c.CATEGORY_WORD, _c.CATEGORY_DIGIT):
                word = True
            elif item_op is _c.CATEGORY and item in (_c.CATEGORY_NOT_WORD, _c.CATEGORY_SPACE):
                other = True
            else:  # a range, a negation, \D, \S: either kind
                word = other = True
        return word, other
    return True, True  # ANY, NOT_LITERAL


def _breaks(items: Iterable[tuple[Any, Any]]) -> int:
    total = 0
    after_break = False  # the previous item matches only non-word characters
    for op, arg in items:
        if op in (_c.LITERAL, _c.IN, _c.ANY, _c.NOT_LITERAL):
            word, other = _kinds(op, arg)
            total += other and not (after_break and not word)
            after_break = other and not word
            continue
        previous_was_break, after_break = after_break, False
        if op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
            continue  # zero-width (the gate's context adds a word for lookbehinds)
        if op is _c.SUBPATTERN:
            total += _breaks(arg[-1])
        elif op is _c.ATOMIC_GROUP:
            total += _breaks(arg)
        elif op is _c.BRANCH:
            total += max(_breaks(alternative) for alternative in arg[1])
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            _low, high, body = arg
            body = list(body)
            if len(body) == 1 and body[0][0] in (_c.LITERAL, _c.IN, _c.ANY, _c.NOT_LITERAL):
                word, other = _kinds(*body[0])
                if other and not word:
                    total += not previous_was_break  # one run, however long
                    after_break = True
                    continue
                if other and high > 1:  # the kinds can alternate
                    if high == _c.MAXREPEAT:
                        raise _Unbounded(op)
                    total += (high + 1) // 2
                else:
                    total += other
                continue
            inner = _breaks(body)
            if inner and high == _c.MAXREPEAT:
                raise _Unbounded(op)
            total += inner * high
        else:
            raise _Unbounded(op)
    return total
