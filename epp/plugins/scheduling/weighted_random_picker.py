"""``weighted-random-picker``: random endpoints with probability proportional to score (GIE)."""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework.scheduling import LLMRequest, ProfileRunResult, ScoredEndpoint
from epp.plugins.scheduling.picker_base import CountingPicker


class WeightedRandomPicker(CountingPicker):
    """A-Res weighted sampling without replacement: key = U^(1/score), keep the largest keys.

    Spreads load in proportion to the scores instead of always taking the best, which avoids
    herding when several pickers (or several requests between two scrapes) see the same
    scores. Endpoints scoring ≤ 0 are only taken once every positive one is; if no endpoint
    has a positive score the draw is uniform.
    """

    type_name = "weighted-random-picker"
    def pick(self, request: LLMRequest, scored: Sequence[ScoredEndpoint]) -> ProfileRunResult:
        rnd = self.rng.random
        k = min(self.k, len(scored))
        if not any(se.score > 0.0 for se in scored):
            return ProfileRunResult([se.endpoint for se in self.rng.sample(list(scored), k)])
        # Non-positive scores get key -1 (< any U^(1/w) in [0, 1]); random among themselves.
        keyed = [
            (rnd() ** (1.0 / se.score) if se.score > 0.0 else -1.0 - rnd(), i)
            for i, se in enumerate(scored)
        ]
        keyed.sort(reverse=True)
        return ProfileRunResult([scored[i].endpoint for _, i in keyed[:k]])
