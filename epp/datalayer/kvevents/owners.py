"""Which endpoints hold each block key, and in which tiers: one int64 per key.

The common case under prefix-affinity routing is a key held by one endpoint, so that case
costs nothing beyond the table slot: the value is ``(endpoint index << 4) | tier mask``
(> 0). A key held by several endpoints points (value ``-(slot + 1)``) into a side list of
``bytes`` records, three bytes per owner (index as 2 bytes little-endian, tier mask), shared
by all of them. Endpoints are interned to small indices by the index (``KVBlockIndex``);
tier masks use four bits (GPU, CPU and two more mediums).
"""

from __future__ import annotations

from epp.datalayer.u64map import U64Map

MAX_ENDPOINTS = 1 << 16


def _pack(owners: dict[int, int]) -> bytes:
    out = bytearray()
    for idx, mask in owners.items():
        out += bytes((idx & 0xFF, idx >> 8, mask))
    return bytes(out)


def _find(record: bytes, idx: int) -> int:
    """Offset of endpoint ``idx``'s 3-byte entry in a record, or -1 (a C-speed scan; the
    match must sit on an entry boundary)."""
    pair = bytes((idx & 0xFF, idx >> 8))
    j = record.find(pair)
    while j != -1 and j % 3:
        j = record.find(pair, j + 1)
    return j


def unpack(record: bytes) -> dict[int, int]:
    return {record[i] | (record[i + 1] << 8): record[i + 2] for i in range(0, len(record), 3)}


class OwnerTable:
    __slots__ = ("_free", "_multi", "entries", "table")

    def __init__(self) -> None:
        self.table = U64Map(signed=True)
        self._multi: list[bytes] = []
        self._free: list[int] = []
        #: (key, endpoint) pairs held
        self.entries = 0

    def __len__(self) -> int:
        return len(self.table)

    def owners_of(self, value: int) -> dict[int, int]:
        """endpoint index → tier mask, for a table value."""
        if value > 0:
            return {value >> 4: value & 15}
        return unpack(self._multi[-value - 1])

    def mask(self, key: int, idx: int) -> int:
        v = self.table.get(key)
        if v is None:
            return 0
        if v > 0:
            return v & 15 if v >> 4 == idx else 0
        record = self._multi[-v - 1]
        j = _find(record, idx)
        return 0 if j < 0 else record[j + 2]

    def add_bit(self, key: int, idx: int, bit: int) -> int:
        """Add tier ``bit`` for endpoint ``idx``; returns the previous mask (0: a new entry)."""
        v = self.table.put_new(key, (idx << 4) | bit)
        if v is None:
            self.entries += 1
            return 0
        if v > 0:
            prev = v & 15 if v >> 4 == idx else 0
        else:
            record = self._multi[-v - 1]
            j = _find(record, idx)
            prev = 0 if j < 0 else record[j + 2]
        if prev | bit != prev:
            self.set_mask(key, idx, prev | bit)
        return prev

    def set_mask(self, key: int, idx: int, mask: int) -> int:
        """Set endpoint ``idx``'s tiers for ``key`` (0 removes it); returns the previous mask."""
        table = self.table
        v = table.get(key)
        if v is None:
            if mask:
                table.put(key, (idx << 4) | mask)
                self.entries += 1
            return 0
        if v > 0:
            owner = v >> 4
            if owner == idx:
                if mask:
                    table.put(key, (idx << 4) | mask)
                else:
                    table.pop(key)
                    self.entries -= 1
                return v & 15
            if not mask:
                return 0
            self._store_multi(key, None, {owner: v & 15, idx: mask})
            self.entries += 1
            return 0
        slot = -v - 1
        record = self._multi[slot]
        j = _find(record, idx)
        old = 0 if j < 0 else record[j + 2]
        if mask:
            if j < 0:
                record += bytes((idx & 0xFF, idx >> 8, mask))
                self.entries += 1
            elif old != mask:
                record = record[:j + 2] + bytes((mask,)) + record[j + 3:]
        elif j >= 0:
            record = record[:j] + record[j + 3:]
            self.entries -= 1
        else:
            return 0
        if len(record) == 3:  # one owner left: back to the inline form
            self._release(slot)
            self.table.put(key, (record[0] | record[1] << 8) << 4 | record[2])
        else:
            self._multi[slot] = record
        return old

    def _store_multi(self, key: int, slot: int | None, owners: dict[int, int]) -> None:
        if len(owners) <= 1:
            if slot is not None:
                self._release(slot)
            if owners:
                (idx, mask), = owners.items()
                self.table.put(key, (idx << 4) | mask)
            else:
                self.table.pop(key)
            return
        record = _pack(owners)
        if slot is None:
            if self._free:
                slot = self._free.pop()
                self._multi[slot] = record
            else:
                slot = len(self._multi)
                self._multi.append(record)
            self.table.put(key, -(slot + 1))
        else:
            self._multi[slot] = record

    def _release(self, slot: int) -> None:
        self._multi[slot] = b""
        self._free.append(slot)

    def multi_owner_keys(self) -> int:
        return len(self._multi) - len(self._free)
