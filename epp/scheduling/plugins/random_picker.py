"""``random-picker``: uniformly random endpoints, ignoring scores (GIE)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Self

from pydantic import BaseModel

from epp.scheduling.framework import Picker, PluginContext
from epp.scheduling.plugins.max_score_picker import PickerParams
from epp.scheduling.types import LLMRequest, ProfileRunResult, ScoredEndpoint


class RandomPicker(Picker):
    """``maxNumOfEndpoints`` distinct endpoints drawn uniformly at random."""

    type_name = "random-picker"
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
        k = min(self.k, len(scored))
        return ProfileRunResult([se.endpoint for se in self.rng.sample(list(scored), k)])
