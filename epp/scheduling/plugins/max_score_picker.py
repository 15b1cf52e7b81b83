"""``max-score-picker`` (GIE default): the highest-scored endpoints, ties broken at random."""

from __future__ import annotations

from collections.abc import Sequence

from epp.scheduling.plugins.picker_base import CountingPicker
from epp.scheduling.types import LLMRequest, ProfileRunResult, ScoredEndpoint


class MaxScorePicker(CountingPicker):
    """Shuffle, stable-sort by score (highest first), keep the top ``maxNumOfEndpoints``.

    The shuffle makes ties random: without it, equal endpoints (a cold start, an idle pool)
    would always resolve to the same one and a burst would pile onto it. For the common
    single-endpoint case the same distribution is had without sorting: pick uniformly among
    the endpoints sharing the maximum score.
    """

    type_name = "max-score-picker"
    def pick(self, request: LLMRequest, scored: Sequence[ScoredEndpoint]) -> ProfileRunResult:
        if not scored:
            return ProfileRunResult([])
        if self.k == 1:
            best = scored[0].score
            ties = [scored[0]]
            for se in scored[1:]:
                s = se.score
                if s > best:
                    best = s
                    ties = [se]
                elif s == best:
                    ties.append(se)
            chosen = ties[0] if len(ties) == 1 else ties[self.rng.randrange(len(ties))]
            return ProfileRunResult([chosen.endpoint])
        order = list(scored)
        self.rng.shuffle(order)
        order.sort(key=_score, reverse=True)  # stable: shuffled order breaks ties
        return ProfileRunResult([se.endpoint for se in order[: self.k]])


def _score(se: ScoredEndpoint) -> float:
    return se.score
