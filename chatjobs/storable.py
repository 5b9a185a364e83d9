"""JSON that Postgres will store and that reads back.

Python's json accepts NaN and Infinity (and ``1e400``, which it reads as infinity), strings
with NUL or lone surrogates, and any nesting its recursion allows; JSONB refuses the first
three, and pydantic's serialiser gives up at about 250 levels. So:

- ``first_offence`` judges what a client sent: a value that could not be stored or read
  back, with its JSON path, so the API refuses it with a 422 naming the place;
- ``storable`` makes a value storable and readable by replacing what is not: non-finite
  numbers become null, NUL and lone surrogates U+FFFD, anything nested deeper than
  ``MAX_DEPTH`` null. It keeps an upstream's paid-for answer instead of losing it, and it is
  how every JSON column is read back, whoever wrote the row;
- ``loads`` reads a JSON column's text, including what Postgres holds and Python's json
  cannot read (an integer over 4,300 digits, nesting past the recursion limit).

Both are linear in the size of the value and never recurse: a value is first judged at C
speed (``_surely_clean``, about the cost of one json.dumps), and only one with an offence is
walked, iteratively and never below ``MAX_DEPTH`` + 1 levels. ``storable`` copies only a
value that needs it.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

# Levels of arrays and objects in one stored JSON value, the value itself being level 1: far
# above any chat-completion request (a JSON schema in response_format nests a dozen) and far
# below what pydantic can serialise inside a job's read shape.
MAX_DEPTH = 64

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

Path = tuple[str | int, ...]


def clean_text(value: str) -> str:
    """``value`` with NUL and lone surrogates replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", value) if _UNSTORABLE.search(value) else value


def _scalar(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def _items(container: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> Iterator[tuple[Any, Any]]:
    return iter(container.items()) if isinstance(container, dict) else enumerate(container)


def storable(value: Any, *, max_depth: int = MAX_DEPTH) -> Any:
    """``value`` made storable and readable (see the module): ``value`` itself when it is
    already (most rows: one walk, nothing copied), else a cleaned copy."""
    if first_offence(value, max_depth=max_depth) is None:
        return value
    return _cleaned(value, max_depth)


def _cleaned(value: Any, max_depth: int) -> Any:
    if not isinstance(value, dict | list | tuple):
        return _scalar(value)
    root: dict[Any, Any] | list[Any] = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, dict[Any, Any] | list[Any], int]] = [(value, root, 1)]
    while stack:
        source, target, depth = stack.pop()
        for key, item in _items(source):
            out: Any
            if isinstance(item, dict | list | tuple):
                if depth >= max_depth:
                    out = None
                else:
                    out = {} if isinstance(item, dict) else []
                    stack.append((item, out, depth + 1))
            else:
                out = _scalar(item)
            if isinstance(target, dict):
                target[clean_text(key) if isinstance(key, str) else key] = out
            else:
                target.append(out)
    return root


@dataclass(frozen=True)
class Offence:
    """A value of a JSON document that cannot be stored: where, which rule, why."""

    path: Path
    rule: str
    message: str


def _path(node: tuple[Any, ...] | None) -> Path:
    # Paths are kept as (parent, key) links, one per value, and spelled out only for the
    # offence: building a tuple per value would cost O(depth) each.
    keys: list[str | int] = []
    while node is not None:
        node, key = node
        keys.append(clean_text(key) if isinstance(key, str) else key)
    return tuple(reversed(keys))


def first_offence(value: Any, *, max_depth: int = MAX_DEPTH) -> Offence | None:
    """A value that ``storable`` would have to change, with its path; None if there is none.

    Strings with NUL or lone surrogates (object keys too), NaN and ±Infinity, and arrays or
    objects nested deeper than ``max_depth`` levels, ``value`` itself being level 1. The
    members of an array or object are judged before what nests in them; path members are
    cleaned with ``clean_text``, so an offending key can be named in an error.
    """
    found = _scalar_offence(value, False)
    if found is not None:
        return Offence((), *found)
    if not isinstance(value, dict | list | tuple) or _surely_clean(value, max_depth):
        return None
    # Only a value with an offence (or text that looks like one) is walked here.
    # The hot loop of a 10 MiB body: exact type tests, locals, no call per member.
    search = _UNSTORABLE.search
    isfinite = math.isfinite
    stack: list[tuple[Any, tuple[Any, ...] | None, int]] = [(value, None, 1)]
    while stack:
        container, node, depth = stack.pop()
        if depth > max_depth:
            return Offence(
                _path(node),
                "json_too_deep",
                f"nests arrays and objects deeper than {max_depth} levels",
            )
        if type(container) is dict:
            members: Any = container.items()
        elif len(container) > 32 and _uniform_and_clean(container):
            continue
        else:
            members = enumerate(container)
        for key, item in members:
            if type(key) is str and search(key):
                return Offence(_path((node, key)), *_text_offence(key, "key "))
            kind = type(item)
            if kind is str:
                if search(item):
                    return Offence(_path((node, key)), *_text_offence(item, ""))
            elif kind is float:
                if not isfinite(item):
                    return Offence(_path((node, key)), *_NON_FINITE)
            elif kind is int or kind is bool or item is None:
                pass
            elif kind is dict or kind is list or isinstance(item, dict | list | tuple):
                # An empty array or object counts only for its depth.
                if item or depth >= max_depth:
                    stack.append((item, (node, key), depth + 1))
            elif (found := _scalar_offence(item, False)) is not None:
                return Offence(_path((node, key)), *found)
    return None


# A JSON string in json.dumps output, and the escape of NUL (not preceded by an escaped "\").
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[{]}"))
_STEPS = bytes.maketrans(b"()", b"\x01\xff")  # +1 and -1 as signed bytes
_QUICK_PASSES = 8


def _surely_clean(value: Any, max_depth: int) -> bool:
    """True when ``value`` certainly has no offence, decided at C speed: json.dumps refuses
    NaN and Infinity, UTF-8 encoding refuses lone surrogates, NUL shows as its escape, and
    the depth is that of the brackets outside strings (innermost pairs removed per level).
    False means "walk it": there is an offence, or the value is not plain JSON."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        data = text.encode()
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return False
    if b"\\u0000" in data and _NUL_ESCAPE.search(data):
        return False
    if data.count(b"[") + data.count(b"{") <= max_depth:
        # No more openings than levels allowed, strings included: it cannot nest too deep.
        # Spares the string-stripping regex below on a large body of text (0.5 s / 10 MiB).
        return True
    brackets = _JSON_STRING.sub(b"", data).translate(_PARENS, _NOT_BRACKETS)
    # Each pass removes the innermost pairs, one level: most values are gone in a few. What
    # remains is measured in one pass (+1 per open, -1 per close; its deepest prefix).
    for removed in range(_QUICK_PASSES):
        if not brackets:
            return True
        if removed == max_depth:
            return False
        brackets = brackets.replace(b"()", b"")
    if not brackets:
        return True
    steps = array("b", brackets.translate(_STEPS))
    return _QUICK_PASSES + max(accumulate(steps)) <= max_depth


_NON_FINITE = ("non_finite_number", "must be a finite number: NaN and Infinity are not JSON")
_NOTHING_NESTED = frozenset({int, bool, type(None)})


def _uniform_and_clean(container: Any) -> bool:
    """True when a large array holds only members that cannot offend, decided at C speed
    (numbers, or strings searched as one); False when the members must be judged one by one."""
    kinds = set(map(type, container))
    if kinds <= _NOTHING_NESTED:
        return True
    if kinds == {str}:
        return _UNSTORABLE.search("".join(container)) is None
    if kinds <= {float, int}:
        try:
            return all(map(math.isfinite, container))
        except OverflowError:  # an int too large for a float: judged one by one
            return False
    return False


def _text_offence(text: str, where: str) -> tuple[str, str]:
    if "\x00" in text:
        return "nul_character", f"{where}must not contain NUL (\\u0000): Postgres cannot store it"
    return (
        "lone_surrogate",
        f"{where}must not contain a lone surrogate (\\ud800-\\udfff): it is not valid Unicode",
    )


def _scalar_offence(item: Any, is_key: bool) -> tuple[str, str] | None:
    if isinstance(item, str):
        return _text_offence(item, "key " if is_key else "") if _UNSTORABLE.search(item) else None
    if isinstance(item, float) and not math.isfinite(item):
        return _NON_FINITE
    return None


def loads(data: str | bytes) -> Any:
    """``json.loads`` for JSON columns (the engine's ``json_deserializer``), never raising on
    what Postgres holds: an integer too long for Python's int parser loads as infinity (which
    ``storable`` shows as null), a document nested past the recursion limit as None."""
    try:
        return json.loads(data)
    except RecursionError:
        return None
    except ValueError:
        # Postgres only returns valid JSON: the one ValueError left is int's digit limit.
        return json.loads(data, parse_int=_int_or_float)


def _int_or_float(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)  # too many digits: infinity
