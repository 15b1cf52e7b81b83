"""``queue-scorer``: prefer endpoints with the shortest waiting queue (GIE, Distribution)."""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter, sub

from epp.framework.datalayer import Endpoint
from epp.framework.scheduling import LLMRequest, Scorer
from epp.plugins.scheduling.scoring import min_max_low_is_best

_METRICS = attrgetter("metrics")
_WAITING = attrgetter("waiting_queue_size")
_RUNNING = attrgetter("running_requests_size")
_INFLIGHT = attrgetter("inflight")


def effective_queue(ep: Endpoint) -> int:
    """The waiting queue the endpoint most likely has *now*, not at the last scrape.

    ``waiting`` is from the last scrape, which lags by up to one refresh interval.
    ``inflight`` is the picker's own live count of requests it sent there. Any in-flight
    request the server already knew about at scrape time is inside ``running + waiting``;
    the excess, ``inflight - (running + waiting)``, are requests sent since that the scrape
    has not seen yet. Without adding them, a burst arriving between two scrapes would all
    see the same "idle" queue and pile onto one pod. The correction is floored at 0 because
    the server also counts requests from other clients or other picker replicas, which this
    picker cannot see, so ``inflight`` can legitimately be smaller than what was scraped.
    """
    m = ep.metrics
    unseen = ep.inflight - (m.running_requests_size + m.waiting_queue_size)
    return m.waiting_queue_size + unseen if unseen > 0 else m.waiting_queue_size


class QueueScorer(Scorer):
    """Min-max normalised effective waiting queue: (max - q) / (max - min); all equal → 1."""

    type_name = "queue-scorer"
    category = "Distribution"
    #: scores are in [0, 1] and never NaN (the scheduler need not clamp them)
    bounded = True

    def score(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        # effective_queue for every endpoint, computed in C: waiting + max(0, inflight -
        # running - waiting) is max(waiting, inflight - running). Each endpoint's ``metrics``
        # is read once: the scraper replaces that object, so waiting and running come from
        # the same scrape.
        metrics = list(map(_METRICS, endpoints))
        waiting = map(_WAITING, metrics)
        unseen = map(sub, map(_INFLIGHT, endpoints), map(_RUNNING, metrics))
        return min_max_low_is_best(list(map(max, waiting, unseen)))
