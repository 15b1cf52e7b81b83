"""What re-anchoring an orphaned block needs: the engine's hash recipe and where an event's
blocks sit in a request the picker routed.

An *orphan* is a ``BlockStored`` whose parent the index never saw: the engine stored that
parent before the picker was listening (late start, a resync after a gap, a truncated replay)
and never publishes it again while it stays cached. Its token ids alone cannot be keyed — a
key chains over every token from the start of the prompt. But the picker knows the prompts it
routes: when an orphan continues a request it sent to that endpoint, the request's tokens up
to the event's first block are the missing prefix.

Two levels of certainty:

* **verified** — the engine's published hashes are reproducible (vLLM's default recipe:
  ``sha256(pickle((parent_digest, tuple(block_tokens), extra_keys)))`` rooted at
  ``H("vllm-none-hash")``, or ``sha256_cbor``; tests/data/vllm_kv_events_sample.txt §8). If
  the digest chain of the request's first ``j`` blocks ends in the event's
  ``parent_block_hash``, the prefix is proven and every block's engine hash is known, so later
  ``BlockRemoved`` events apply exactly.
* **unverified** — a LoRA adapter (its server-side path enters the hash but is never
  published) or an unknown hash seed: the position is taken only when the event's first block
  matches the request at exactly one place; the parent gets its engine hash, the blocks before
  it are held without one (an eviction of those is not seen; see docs/precise-prefix.md).
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

NONE_HASH_SEED = "vllm-none-hash"


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 1 << 8:
        return bytes((major << 5 | 24, n))
    if n < 1 << 16:
        return bytes((major << 5 | 25,)) + struct.pack(">H", n)
    if n < 1 << 32:
        return bytes((major << 5 | 26,)) + struct.pack(">I", n)
    return bytes((major << 5 | 27,)) + struct.pack(">Q", n)


def cbor(obj: object) -> bytes:
    """Canonical CBOR of the values a block hash input holds (None, bool, int, bytes, str,
    tuples/lists of those): what ``cbor2.dumps(x, canonical=True)`` produces for them."""
    if obj is None:
        return b"\xf6"
    if obj is True:
        return b"\xf5"
    if obj is False:
        return b"\xf4"
    if isinstance(obj, int):
        return _cbor_head(0, obj) if obj >= 0 else _cbor_head(1, -1 - obj)
    if isinstance(obj, bytes):
        return _cbor_head(2, len(obj)) + obj
    if isinstance(obj, str):
        raw = obj.encode()
        return _cbor_head(3, len(raw)) + raw
    if isinstance(obj, tuple | list):
        return _cbor_head(4, len(obj)) + b"".join(cbor(x) for x in obj)
    raise TypeError(f"cannot CBOR-encode {type(obj).__name__}")


def _pickle(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=5)


@dataclass(slots=True, frozen=True)
class HashRecipe:
    """One way an engine may hash blocks (algorithm + chain root)."""

    name: str
    encode: Callable[[object], bytes]
    none_hash: bytes

    def chain(self, tokens: Sequence[int], block_size: int, n: int, salt: str | None) -> list[bytes]:
        """Digests of the first ``n`` blocks (``salt``: the request's cache_salt, block 0 only)."""
        parent = self.none_hash
        out: list[bytes] = []
        enc = self.encode
        sha = hashlib.sha256
        for i in range(n):
            extra = (salt,) if salt is not None and i == 0 else None
            parent = sha(enc((parent, tuple(tokens[i * block_size:(i + 1) * block_size]), extra))).digest()
            out.append(parent)
        return out


def make_recipes(seed: str | None = None) -> tuple[HashRecipe, ...]:
    """vLLM's hash recipes for the default root, and for ``PYTHONHASHSEED`` = ``seed``."""
    out = []
    for s in (NONE_HASH_SEED, *([seed] if seed else [])):
        for name, enc in (("sha256", _pickle), ("sha256_cbor", cbor)):
            out.append(HashRecipe(f"{name}:{s}", enc, hashlib.sha256(enc(s)).digest()))
    return tuple(out)


def published(digest: bytes) -> int:
    """The uint64 vLLM publishes for a digest."""
    return int.from_bytes(digest[-8:], "big")


@dataclass(slots=True)
class PickRecord:
    """A request the picker sent to an endpoint (kept briefly while that endpoint recovers)."""

    at: float
    tokens: array  # uint32 token ids, up to the matched-prefix limit
    block_size: int
    namespace: str
    salt: str | None


def positions(pick: PickRecord, first_block: array, exact_only: bool) -> list[int]:
    """Block offsets ``j >= 1`` at which an event's first block may continue ``pick``'s
    tokens, the most likely (largest) first. A full overlap must match token for token;
    unless ``exact_only``, the pick's trailing partial block (its prompt tail, completed with
    generated tokens by the engine) and the block right after the prompt are candidates too."""
    tokens = pick.tokens
    bs = pick.block_size
    n = len(tokens)
    out: list[int] = []
    width = len(first_block)
    for j in range(1, n // bs + 1):
        s = j * bs
        if s + width > n:
            break
        if tokens[s:s + width] == first_block:
            out.append(j)
    if not exact_only and n // bs >= 1:
        tail = n // bs
        s = tail * bs
        if tail not in out and (s == n or tokens[s:n] == first_block[:n - s]):
            out.append(tail)
    out.sort(reverse=True)
    return out
