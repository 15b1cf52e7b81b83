"""Flow control's extension points: saturation detection, per-flow queue ordering and the
fairness between flows of one priority band (GIE §5.3).

Policies only *order* dispatches; the flow controller (``epp.flowcontrol``) owns queues,
limits, timers and the saturation gate. Queues use lazy deletion: a request that leaves
early (TTL, client gone) is only marked, and skipped when it reaches the head.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Protocol

from epp.framework.datalayer import Endpoint
from epp.framework.plugin import Plugin


class SaturationDetector(Plugin):
    """Tells whether the candidate endpoints can take more work (admission, flow control)."""

    @abstractmethod
    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        """Pool saturation; >= 1.0 means saturated."""

    def is_saturated(self, endpoints: Sequence[Endpoint]) -> bool:
        return self.saturation(endpoints) >= 1.0


class QueuedItem(Protocol):
    """What the policies read of a queued request (``epp.flowcontrol`` owns the type)."""

    #: global arrival sequence number (monotonic across the controller)
    seq: int
    #: absolute deadline used by EDF (``inf`` when the request has no TTL)
    deadline: float

    @property
    def pending(self) -> bool:
        """Still waiting (not dispatched, expired, rejected or gone)."""
        ...


# --------------------------------------------------------------------------- ordering


class FlowQueue(ABC):
    """The queue of one flow. ``len`` is not tracked here (the controller counts live items)."""

    @abstractmethod
    def push(self, item: QueuedItem) -> None: ...

    @abstractmethod
    def peek(self) -> QueuedItem | None:
        """The next live item (dead ones at the head are dropped), or None."""

    @abstractmethod
    def pop(self) -> QueuedItem | None: ...


class OrderingPolicy(Plugin):
    """Makes the per-flow queues of the bands that reference it."""

    @abstractmethod
    def new_queue(self) -> FlowQueue: ...


class FairnessState(ABC):
    """Per-band fairness state. ``backlogged`` maps fairness id → its queue (only flows with
    at least one live item; the controller keeps it that way)."""

    def on_backlogged(self, flow: str, backlogged: Mapping[str, FlowQueue]) -> None:  # noqa: B027
        """``flow`` just went from empty to non-empty (it is already in ``backlogged``)."""

    @abstractmethod
    def pick(self, backlogged: Mapping[str, FlowQueue]) -> str | None:
        """The flow to dispatch from next (None if nothing is backlogged). Must not change
        the policy's state: the dispatch may still be refused (pool saturated)."""

    def dispatched(self, flow: str) -> None:  # noqa: B027
        """The flow ``pick`` chose was dispatched."""

    def charge(self, flow: str, tokens: float) -> None:  # noqa: B027
        """``tokens`` (estimated) were dispatched for ``flow``; may be negative (correction)."""

    def counter(self, flow: str) -> float:
        """The flow's service counter (for metrics and tests); 0 when the policy keeps none."""
        return 0.0


class FairnessPolicy(Plugin):
    """Makes the fairness state of the bands that reference it."""

    #: True when the policy wants token accounting (charge/correct) from the controller
    uses_tokens: bool = False

    @abstractmethod
    def new_state(self) -> FairnessState: ...

    def cost(self, prompt_tokens: float, cached_tokens: float, completion_tokens: float) -> float:
        """Unweighted service cost of a request (token policies override)."""
        return 0.0

    def estimate(self, prompt_tokens: int, max_tokens: int | None) -> float:
        """Cost charged at dispatch, before the real usage is known."""
        return 0.0


#: GIE's defaults when a band names no policy
DEFAULT_FAIRNESS_POLICY = "global-strict-fairness-policy"
DEFAULT_ORDERING_POLICY = "fcfs-ordering-policy"
