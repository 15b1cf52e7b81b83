"""The picker's own block keys: a chained xxh64 over token ids (see ``index.py``)."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from xxhash import xxh64_intdigest


def token_array(tokens: Sequence[int]) -> array:
    """Token ids as uint32 (an id outside that range keeps its low 32 bits)."""
    try:
        return array("I", tokens)
    except (OverflowError, TypeError):
        return array("I", (t & 0xFFFFFFFF for t in tokens))


def root_key(namespace: str) -> int:
    return xxh64_intdigest(namespace.encode())


def block_keys(tokens: Sequence[int], block_size: int, namespace: str = "", max_blocks: int | None = None,
               parent: int | None = None, extras: Sequence[str | None] = ()) -> list[int]:
    """Chained keys of the full blocks of ``tokens`` (a trailing partial block is dropped,
    as the engine only caches full blocks). ``extras[i]`` (e.g. a request's ``cache_salt``
    on block 0) is mixed into block i's key, as the engine mixes it into its hash."""
    n = len(tokens) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n <= 0:
        return []
    data = token_array(tokens[: n * block_size]).tobytes()
    step = block_size * 4
    prev = root_key(namespace) if parent is None else parent
    xxh = xxh64_intdigest
    out: list[int] = []
    append = out.append
    for i, off in enumerate(range(0, n * step, step)):
        extra = extras[i] if i < len(extras) else None
        if extra is None:
            prev = xxh(data[off : off + step] + prev.to_bytes(8, "little"))
        else:
            prev = xxh(data[off : off + step] + prev.to_bytes(8, "little") + b"\x00" + extra.encode())
        append(prev)
    return out
