"""``weighted-random-picker``: random endpoints with probability proportional to score (GIE)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Self

from pydantic import BaseModel

from epp.scheduling.framework import Picker, PluginContext
from epp.scheduling.plugins.max_score_picker import PickerParams
from epp.scheduling.types import LLMRequest, ProfileRunResult, ScoredEndpoint


class WeightedRandomPicker(Picker):
    """A-Res weighted sampling without replacement: key = U^(1/score), keep the largest keys.

    Spreads load in proportion to the scores instead of always taking the best, which avoids
    herding when several pickers (or several requests between two scrapes) see the same
    scores. Endpoints scoring ≤ 0 are only taken once every positive one is; if no endpoint
    has a positive score the draw is uniform.
    """

    type_name = "weighted-random-picker"
    Params = PickerParams

    def __init__(self, name: str, max_num_of_endpoints: int = 1, rng: random.Random | None = None):
        super().__init__(name)
        self.k = max_num_of_endpoints
        self.rng = rng or random.Random()

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, PickerParams)
        return cls(name, params.max_num_of_endpoints)

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
