"""``round-robin-fairness-policy`` (GIE): the flows of a band take turns, one dispatch each
(the unit of fairness is a request, whatever its size)."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from epp.framework.flowcontrol import FairnessPolicy, FairnessState, FlowQueue


class _RoundRobinState(FairnessState):
    __slots__ = ("_ring",)

    def __init__(self) -> None:
        self._ring: deque[str] = deque()

    def on_backlogged(self, flow: str, backlogged: Mapping[str, FlowQueue]) -> None:
        if flow not in self._ring:  # O(flows), only when a flow wakes up
            self._ring.append(flow)

    def pick(self, backlogged: Mapping[str, FlowQueue]) -> str | None:
        ring = self._ring
        while ring:
            if ring[0] in backlogged:
                return ring[0]
            ring.popleft()  # drained flows leave the ring; on_backlogged re-adds them
        return None

    def dispatched(self, flow: str) -> None:
        ring = self._ring
        if ring and ring[0] == flow:
            ring.rotate(-1)


class RoundRobinFairnessPolicy(FairnessPolicy):
    """Flows take turns (GIE's; the unit of fairness is one dispatch, whatever its size)."""

    type_name = "round-robin-fairness-policy"

    def new_state(self) -> FairnessState:
        return _RoundRobinState()
