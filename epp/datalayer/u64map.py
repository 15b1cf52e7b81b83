"""A compact uint64 → int64 hash map on two flat arrays (open addressing, linear probing).

Both prefix indexes keep their block → holders table in one: the precise (KV-event) index
and the approximate one learned from routing.

Why not a ``dict``: the precise index holds millions of (block, endpoint) entries, and a dict
of Python ints costs ~90-110 bytes per entry (two int objects of 32-36 bytes plus the slot and
its index). Here an entry is 16 bytes of array slot, so at the 0.375-0.75 load this table keeps
it is 21-43 bytes — the difference between ~1 GB and ~250 MB for a 100-pod fleet
(``benchmarks/precise_index.py``).

Keys are block hashes (the picker's xxh64 keys, the engines' published hashes): uniformly
distributed, so the slot is the key's low bits with no extra mixing. Slot value 0 means empty,
so key 0 is kept beside the arrays (``_zero``): every key is exact. Deletion shifts later
entries of the probe run back (no tombstones), so lookups never slow down with churn.

Single-threaded (the event loop); every method is O(1) expected.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

_MIN_CAPACITY = 16


class U64Map:
    """uint64 keys → int64 values (``signed=True``) or uint64 values."""

    __slots__ = ("_keys", "_mask", "_typecode", "_vals", "_zero", "size")

    def __init__(self, capacity: int = _MIN_CAPACITY, signed: bool = True) -> None:
        self._typecode = "q" if signed else "Q"
        cap = _MIN_CAPACITY
        while cap < capacity:
            cap <<= 1
        self._alloc(cap)
        self._zero: int | None = None  # the value of key 0 (0 marks an empty slot)
        self.size = 0

    def _alloc(self, cap: int) -> None:
        self._keys = array("Q", bytes(8 * cap))
        self._vals = array(self._typecode, bytes(8 * cap))
        self._mask = cap - 1

    def __len__(self) -> int:
        return self.size

    @property
    def capacity(self) -> int:
        return self._mask + 1

    def nbytes(self) -> int:
        """Bytes held by the two arrays (what tracemalloc sees, minus ~130 bytes of headers)."""
        return 16 * (self._mask + 1)

    # ------------------------------------------------------------------ reads
    def get(self, key: int, default: int | None = None) -> int | None:
        if not key:
            return default if self._zero is None else self._zero
        keys = self._keys
        mask = self._mask
        i = key & mask
        while True:
            k = keys[i]
            if k == key:
                return self._vals[i]
            if k == 0:
                return default
            i = (i + 1) & mask

    def leading(self, keys: Iterable[int]) -> list[int]:
        """The values of ``keys`` from the first one up to the first key not present: the
        held run of a chain of block hashes, one loop for the whole chain (it runs for every
        block of every request, so the probe is inlined rather than a ``get`` per key)."""
        ks = self._keys
        vs = self._vals
        mask = self._mask
        out: list[int] = []
        append = out.append
        for key in keys:
            if not key:
                if self._zero is None:
                    return out
                append(self._zero)
                continue
            i = key & mask
            while True:
                k = ks[i]
                if k == key:
                    append(vs[i])
                    break
                if k == 0:
                    return out
                i = (i + 1) & mask
        return out

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def items(self) -> Iterator[tuple[int, int]]:
        """(key, value) pairs; do not mutate the map while iterating."""
        if self._zero is not None:
            yield 0, self._zero
        vals = self._vals
        for i, k in enumerate(self._keys):
            if k:
                yield k, vals[i]

    def values(self) -> list[int]:
        vals = self._vals
        out = [vals[i] for i, k in enumerate(self._keys) if k]
        if self._zero is not None:
            out.append(self._zero)
        return out

    # ------------------------------------------------------------------ writes
    def put(self, key: int, value: int) -> int | None:
        """Set ``key`` to ``value``; the value it replaced, None when the key is new (one probe
        for "insert or update, and tell me what was there")."""
        if not key:
            old, self._zero = self._zero, value
            self.size += old is None
            return old
        if (self.size + 1) * 4 > (self._mask + 1) * 3:
            self._resize((self._mask + 1) * 2)
        keys = self._keys
        mask = self._mask
        i = key & mask
        while True:
            k = keys[i]
            if k == key:
                old = self._vals[i]
                self._vals[i] = value
                return old
            if k == 0:
                keys[i] = key
                self._vals[i] = value
                self.size += 1
                return None
            i = (i + 1) & mask

    def put_new(self, key: int, value: int) -> int | None:
        """Insert ``value`` unless ``key`` is present; return the present value (or None).
        One probe: the index's common case (a block it did not hold) costs a single walk."""
        if not key:
            if self._zero is None:
                self._zero = value
                self.size += 1
            else:
                return self._zero
            return None
        if (self.size + 1) * 4 > (self._mask + 1) * 3:
            self._resize((self._mask + 1) * 2)
        keys = self._keys
        mask = self._mask
        i = key & mask
        while True:
            k = keys[i]
            if k == key:
                return self._vals[i]
            if k == 0:
                keys[i] = key
                self._vals[i] = value
                self.size += 1
                return None
            i = (i + 1) & mask

    def pop(self, key: int, default: int | None = None) -> int | None:
        if not key:
            old, self._zero = self._zero, None
            if old is None:
                return default
            self.size -= 1
            return old
        keys = self._keys
        vals = self._vals
        mask = self._mask
        i = key & mask
        while True:
            k = keys[i]
            if k == key:
                break
            if k == 0:
                return default
            i = (i + 1) & mask
        value = vals[i]
        # backward-shift deletion: move later members of the run into the hole when their
        # home slot is not between the hole and their current slot
        j = i
        while True:
            j = (j + 1) & mask
            k = keys[j]
            if k == 0:
                break
            home = k & mask
            if (j > i and (home <= i or home > j)) or (j < i and home <= i and home > j):
                keys[i] = k
                vals[i] = vals[j]
                i = j
        keys[i] = 0
        vals[i] = 0
        self.size -= 1
        cap = mask + 1
        if cap > _MIN_CAPACITY and self.size * 8 < cap:
            self._resize(cap // 2)
        return value

    def clear(self) -> None:
        self._alloc(_MIN_CAPACITY)
        self._zero = None
        self.size = 0

    def _resize(self, cap: int) -> None:
        old_keys, old_vals = self._keys, self._vals
        self._alloc(max(cap, _MIN_CAPACITY))
        keys = self._keys
        vals = self._vals
        mask = self._mask
        for idx, k in enumerate(old_keys):
            if k:
                i = k & mask
                while keys[i]:
                    i = (i + 1) & mask
                keys[i] = k
                vals[i] = old_vals[idx]
