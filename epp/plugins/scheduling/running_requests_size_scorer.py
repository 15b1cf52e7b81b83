"""``running-requests-size-scorer``: prefer endpoints running fewer requests (GIE)."""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework.datalayer import Endpoint
from epp.framework.scheduling import LLMRequest, Scorer
from epp.plugins.scheduling.scoring import min_max_low_is_best


class RunningRequestsSizeScorer(Scorer):
    """Min-max normalised scraped running-request count, like ``queue-scorer``.

    Kept on the scraped value as GIE does; the picker's own live load is what
    ``active-request-scorer`` and the queue scorer's in-flight correction are for.
    """

    type_name = "running-requests-size-scorer"
    category = "Distribution"
    #: scores are in [0, 1] and never NaN (the scheduler need not clamp them)
    bounded = True

    def score(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return min_max_low_is_best([ep.metrics.running_requests_size for ep in endpoints])
