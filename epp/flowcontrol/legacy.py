"""Admission without flow control (GIE's legacy rule).

A sheddable request (priority < 0) is rejected with 429 when the candidate endpoints are
saturated; everything else goes straight to scheduling, and the model servers queue it.
With the ``flowControl`` feature gate on, the flow controller replaces this gate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from epp.framework import errors
from epp.framework.datalayer import Endpoint
from epp.framework.flowcontrol import SaturationDetector
from epp.framework.requestcontrol import ResponseInfo
from epp.framework.scheduling import LLMRequest


def admit(request: LLMRequest, candidates: Sequence[Endpoint], detector: SaturationDetector | None) -> None:
    """Raise 429 for a sheddable request when ``candidates`` are saturated."""
    if request.priority < 0 and detector is not None and detector.is_saturated(candidates):
        raise errors.shed("sheddable request dropped: the pool is saturated")


@dataclass(slots=True)
class LegacyAdmission:
    """No queueing: shed sheddable requests when saturated, admit the rest at once."""

    detector: SaturationDetector | None

    async def admit(self, request: LLMRequest, candidates: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]:
        eps = candidates()
        if not eps:
            raise errors.unavailable("no ready endpoints in the inference pool")
        admit(request, eps, self.detector)
        return eps

    def release(self, request: LLMRequest, info: ResponseInfo) -> None:
        return None
