"""Replace the top-level ``model`` of a JSON request body without re-encoding the rest.

The model rewrite normally re-encodes the parsed body with ``orjson.dumps`` (fast, C). That
fails for documents nested deeper than 254 levels, which ``orjson.loads`` (1024 levels) and
model servers accept, so a legitimate deep body would become a 500. This module is the
fallback: it walks only the top level of the raw bytes, finds the value span(s) of the
``"model"`` member and splices the new value in, leaving every other byte as the client sent
it. Nested values are skipped with regular expressions and a depth counter, so depth costs
nothing but a counter (no recursion).

It is only called on that fallback path (a few ms for a large body, never the common case);
the input is always a body ``orjson.loads`` already accepted, so it is valid JSON.
"""

from __future__ import annotations

import re

import orjson

_WS = re.compile(rb"[ \t\n\r]*")
# A JSON string: the unrolled loop form, linear time on any input.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCALAR = re.compile(rb"[^,}\] \t\n\r]+")
_STRUCT = re.compile(rb'["\[\]{}]')


def _skip_value(raw: bytes, pos: int) -> int:
    """Index just past the JSON value that starts at ``pos``."""
    c = raw[pos]
    if c == 0x22:  # "
        m = _STRING.match(raw, pos)
        if m is None:
            raise ValueError("unterminated string")
        return m.end()
    if c != 0x5B and c != 0x7B:  # not [ or {: number, true, false, null
        m = _SCALAR.match(raw, pos)
        if m is None:
            raise ValueError("bad scalar")
        return m.end()
    depth = 0
    search = _STRUCT.search
    match_string = _STRING.match
    i = pos
    while True:
        m = search(raw, i)
        if m is None:
            raise ValueError("unterminated container")
        j = m.start()
        ch = raw[j]
        if ch == 0x22:
            s = match_string(raw, j)
            if s is None:
                raise ValueError("unterminated string")
            i = s.end()
            continue
        if ch == 0x5B or ch == 0x7B:
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return j + 1
        i = j + 1


def _is_model_key(key: bytes) -> bool:
    if key == b'"model"':
        return True
    if b"\\" not in key:
        return False
    return bool(orjson.loads(key) == "model")  # escaped spelling, e.g. "mod\u0065l"


def replace_model(raw: bytes | bytearray | memoryview, model: str) -> bytes | None:
    """``raw`` with every top-level ``"model"`` value replaced by the JSON string ``model``.

    None when ``raw`` is not a JSON object with such a member (the caller then answers 400).
    Duplicate ``model`` members are all replaced, so whichever one a downstream parser keeps
    carries the new value.
    """
    data = bytes(raw)
    try:
        pos = _WS.match(data, 0).end()  # type: ignore[union-attr]
        if data[pos] != 0x7B:
            return None
        pos = _WS.match(data, pos + 1).end()  # type: ignore[union-attr]
        spans: list[tuple[int, int]] = []
        if data[pos] != 0x7D:
            while True:
                m = _STRING.match(data, pos)
                if m is None:
                    return None
                key = m.group()
                pos = _WS.match(data, m.end()).end()  # type: ignore[union-attr]
                if data[pos] != 0x3A:  # :
                    return None
                start = _WS.match(data, pos + 1).end()  # type: ignore[union-attr]
                end = _skip_value(data, start)
                if _is_model_key(key):
                    spans.append((start, end))
                pos = _WS.match(data, end).end()  # type: ignore[union-attr]
                if data[pos] == 0x2C:  # ,
                    pos = _WS.match(data, pos + 1).end()  # type: ignore[union-attr]
                    continue
                if data[pos] == 0x7D:
                    break
                return None
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return None
    if not spans:
        return None
    value = orjson.dumps(model)
    out = bytearray()
    last = 0
    for start, end in spans:
        out += data[last:start]
        out += value
        last = end
    out += data[last:]
    return bytes(out)
