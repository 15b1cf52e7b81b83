"""Admission without flow control (GIE's legacy rule).

A sheddable request (priority < 0) is rejected with 429 when the candidate endpoints are
saturated; everything else goes straight to scheduling, and the model servers queue it.
With flow control enabled, the flow controller replaces this gate.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datalayer.endpoint import Endpoint
from epp.requestcontrol.errors import shed
from epp.scheduling.framework import SaturationDetector
from epp.scheduling.types import LLMRequest


def admit(request: LLMRequest, candidates: Sequence[Endpoint], detector: SaturationDetector | None) -> None:
    if request.priority < 0 and detector is not None and detector.is_saturated(candidates):
        raise shed("sheddable request dropped: the pool is saturated")
