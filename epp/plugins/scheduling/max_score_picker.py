"""``max-score-picker`` (GIE default): the highest-scored endpoints; near-ties go to the
endpoint picked least recently."""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import compress, repeat
from operator import attrgetter, eq, ge
from typing import Literal, Self

from pydantic import BaseModel, Field

from epp.framework.plugin import PluginContext
from epp.framework.scheduling import LLMRequest, ProfileRunResult, ScoredEndpoint
from epp.plugins.scheduling.picker_base import CountingPicker, PickerParams
from epp.plugins.scheduling.scoring import ScoredEndpoints

_LAST_PICKED = attrgetter("last_picked")


class MaxScoreParams(PickerParams):
    #: how near-ties are broken: ``least-recently-picked`` (default) or ``random`` (GIE's)
    tie_break: Literal["least-recently-picked", "random"] = "least-recently-picked"
    #: scores within this of the best count as tied (weighted-score units)
    tie_epsilon: float = Field(0.05, ge=0.0)


class MaxScorePicker(CountingPicker):
    """The best-scored endpoint first, then the next best (``maxNumOfEndpoints``).

    Ties are common: an idle pool, or a busy one where every pod holds about the same work
    and the scores differ only by noise (a few KV blocks). GIE breaks them at random, which
    sends ~1/3 of requests onto a pod that was just given one — two prefills then share an
    engine step and both first tokens come late (measured: TTFT p90 1.35x round robin on a
    no-sharing workload, benchmarks/RESULTS.md). Taking the near-tied endpoint picked least
    recently spaces requests in time like round robin does, while any real difference
    (a prefix hit, a queue, one more request's KV) still decides. ``tieBreak: random``
    restores GIE's behaviour.
    """

    type_name = "max-score-picker"
    Params = MaxScoreParams

    def __init__(self, name: str, max_num_of_endpoints: int = 1, rng: random.Random | None = None,
                 tie_break: str = "least-recently-picked", tie_epsilon: float = 0.05) -> None:
        super().__init__(name, max_num_of_endpoints, rng)
        self.lru = tie_break == "least-recently-picked"
        self.eps = tie_epsilon if self.lru else 0.0

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, MaxScoreParams)
        return cls(name, params.max_num_of_endpoints, None, params.tie_break, params.tie_epsilon)

    def pick(self, request: LLMRequest, scored: Sequence[ScoredEndpoint]) -> ProfileRunResult:
        if not scored:
            return ProfileRunResult([])
        if isinstance(scored, ScoredEndpoints):  # the scheduler's view: no per-endpoint objects
            endpoints, totals = scored.endpoints, scored.totals
        else:
            endpoints = [se.endpoint for se in scored]
            totals = [se.score for se in scored]
        n = len(totals)
        floor = max(totals) - self.eps
        # indices of the near-tied, selected in C (compress over a map of >=)
        ties = list(compress(range(n), map(ge, totals, repeat(floor, n))))
        if len(ties) == 1:
            chosen = ties[0]
        elif self.lru:
            # the least recently picked of the near-tied; a random one among equals
            picked = list(map(_LAST_PICKED, map(endpoints.__getitem__, ties)))
            oldest = min(picked)
            ties = list(compress(ties, map(eq, picked, repeat(oldest, len(picked)))))
            chosen = ties[0] if len(ties) == 1 else ties[self.rng.randrange(len(ties))]
        else:
            chosen = ties[self.rng.randrange(len(ties))]
        first = endpoints[chosen]
        if self.k == 1:
            return ProfileRunResult([first])
        order = [i for i in range(len(totals)) if i != chosen]
        self.rng.shuffle(order)
        order.sort(key=totals.__getitem__, reverse=True)  # stable: shuffled order breaks exact ties
        return ProfileRunResult([first] + [endpoints[i] for i in order[: self.k - 1]])
