"""A compact uint64 → int64 hash map on two flat arrays (open addressing, linear probing).

Why not a ``dict``: the precise index holds millions of (block, endpoint) entries, and a dict
of Python ints costs ~90-110 bytes per entry (two int objects of 32-36 bytes plus the slot and
its index). Here an entry is 16 bytes of array slot, so at the 0.375-0.75 load this table keeps
it is 21-43 bytes — the difference between ~1 GB and ~250 MB for a 100-pod fleet
(``benchmarks/precise_index.py``).

Keys are block hashes (the picker's xxh64 keys, the engines' published hashes): uniformly
distributed, so the slot is the key's low bits with no extra mixing. Slot value 0 means empty,
so key 0 is stored as 1 (a 2**-64 alias, harmless for hash keys). Deletion shifts later
entries of the probe run back (no tombstones), so lookups never slow down with churn.

Single-threaded (the event loop); every method is O(1) expected.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

_MIN_CAPACITY = 16


class U64Map:
    """uint64 keys → int64 values (``signed=True``) or uint64 values."""

    __slots__ = ("_keys", "_mask", "_typecode", "_vals", "size")

    def __init__(self, capacity: int = _MIN_CAPACITY, signed: bool = True) -> None:
        self._typecode = "q" if signed else "Q"
        cap = _MIN_CAPACITY
        while cap < capacity:
            cap <<= 1
        self._alloc(cap)
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
        key = key or 1
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

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def items(self) -> Iterator[tuple[int, int]]:
        """(key, value) pairs; do not mutate the map while iterating."""
        vals = self._vals
        for i, k in enumerate(self._keys):
            if k:
                yield k, vals[i]

    def values(self) -> list[int]:
        vals = self._vals
        return [vals[i] for i, k in enumerate(self._keys) if k]

    # ------------------------------------------------------------------ writes
    def put(self, key: int, value: int) -> None:
        key = key or 1
        if (self.size + 1) * 4 > (self._mask + 1) * 3:
            self._resize((self._mask + 1) * 2)
        keys = self._keys
        mask = self._mask
        i = key & mask
        while True:
            k = keys[i]
            if k == key:
                self._vals[i] = value
                return
            if k == 0:
                keys[i] = key
                self._vals[i] = value
                self.size += 1
                return
            i = (i + 1) & mask

    def put_new(self, key: int, value: int) -> int | None:
        """Insert ``value`` unless ``key`` is present; return the present value (or None).
        One probe: the index's common case (a block it did not hold) costs a single walk."""
        key = key or 1
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
        key = key or 1
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
