"""Small scoring helpers shared by several scorers, and the scored-candidates view the
scheduler hands to pickers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from operator import sub, truediv
from typing import overload

from epp.framework.datalayer import Endpoint
from epp.framework.scheduling import ScoredEndpoint


def min_max_low_is_best(values: Sequence[float]) -> list[float]:
    """(max - v) / (max - min) per value: the smallest gets 1, the largest 0; all equal → 1.

    GIE's queue and running-requests scorers use this so that scores spread over the whole
    [0, 1] range whatever the absolute load, which lets a weight mean the same thing at any
    load level.

    Vectorised the way plain CPython allows: ``map`` over ``operator`` functions runs the
    per-value arithmetic in C (no bytecode per value), ~3x faster than a list comprehension
    at 1,000 endpoints, with the same floating-point results.
    """
    if not values:
        return []
    lo = min(values)
    hi = max(values)
    n = len(values)
    if hi == lo:
        return [1.0] * n
    return list(map(truediv, map(sub, repeat(hi, n), values), repeat(hi - lo, n)))


def scaled(values: Iterable[float], factor: float, n: int) -> list[float]:
    """``[v / factor for v in values]`` computed in C (see ``min_max_low_is_best``)."""
    return list(map(truediv, values, repeat(factor, n)))


class ScoredEndpoints(Sequence[ScoredEndpoint]):
    """Candidates and their weighted totals as two parallel lists, seen as a sequence of
    ``ScoredEndpoint``.

    Why a view: a decision over N endpoints used to allocate N ``ScoredEndpoint`` objects
    that only a debugging property reads. Pickers that know this type (``max-score-picker``)
    read ``endpoints`` / ``totals`` directly; any other picker sees the plain sequence, whose
    items are built on access.
    """

    __slots__ = ("endpoints", "totals")

    def __init__(self, endpoints: Sequence[Endpoint], totals: list[float]) -> None:
        self.endpoints = endpoints
        self.totals = totals

    def __len__(self) -> int:
        return len(self.totals)

    @overload
    def __getitem__(self, i: int) -> ScoredEndpoint: ...

    @overload
    def __getitem__(self, i: slice) -> list[ScoredEndpoint]: ...

    def __getitem__(self, i: int | slice) -> ScoredEndpoint | list[ScoredEndpoint]:
        if isinstance(i, slice):
            return [ScoredEndpoint(e, t) for e, t in zip(self.endpoints[i], self.totals[i], strict=True)]
        return ScoredEndpoint(self.endpoints[i], self.totals[i])

    def __iter__(self) -> Iterator[ScoredEndpoint]:
        return map(ScoredEndpoint, self.endpoints, self.totals)
