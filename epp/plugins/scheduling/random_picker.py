"""``random-picker``: uniformly random endpoints, ignoring scores (GIE)."""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework.scheduling import LLMRequest, ProfileRunResult, ScoredEndpoint
from epp.plugins.scheduling.picker_base import CountingPicker


class RandomPicker(CountingPicker):
    """``maxNumOfEndpoints`` distinct endpoints drawn uniformly at random."""

    type_name = "random-picker"

    def pick(self, request: LLMRequest, scored: Sequence[ScoredEndpoint]) -> ProfileRunResult:
        k = min(self.k, len(scored))
        return ProfileRunResult([se.endpoint for se in self.rng.sample(list(scored), k)])
