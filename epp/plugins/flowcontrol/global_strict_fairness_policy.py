"""``global-strict-fairness-policy`` (GIE's default): one global arrival order across the
flows of a band, i.e. no fairness at all: the oldest request dispatches first."""

from __future__ import annotations

import math
from collections.abc import Mapping

from epp.framework.flowcontrol import FairnessPolicy, FairnessState, FlowQueue


def _oldest_head(backlogged: Mapping[str, FlowQueue]) -> str | None:
    best: str | None = None
    best_seq = math.inf
    for flow, q in backlogged.items():
        head = q.peek()
        if head is not None and head.seq < best_seq:
            best, best_seq = flow, head.seq
    return best


class _GlobalStrictState(FairnessState):
    def pick(self, backlogged: Mapping[str, FlowQueue]) -> str | None:
        return _oldest_head(backlogged)


class GlobalStrictFairnessPolicy(FairnessPolicy):
    """One global arrival order across the band's flows (GIE's default): no fairness at all,
    the oldest request dispatches first."""

    type_name = "global-strict-fairness-policy"

    def new_state(self) -> FairnessState:
        return _GlobalStrictState()
