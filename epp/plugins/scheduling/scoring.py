"""Small scoring helpers shared by several scorers."""

from __future__ import annotations

from collections.abc import Sequence


def min_max_low_is_best(values: Sequence[float]) -> list[float]:
    """(max - v) / (max - min) per value: the smallest gets 1, the largest 0; all equal → 1.

    GIE's queue and running-requests scorers use this so that scores spread over the whole
    [0, 1] range whatever the absolute load, which lets a weight mean the same thing at any
    load level.
    """
    if not values:
        return []
    lo = min(values)
    hi = max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]
