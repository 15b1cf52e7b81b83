"""What every picker type shares: GIE's ``maxNumOfEndpoints`` parameter and a seedable RNG."""

from __future__ import annotations

import random
from typing import Self

from pydantic import BaseModel, Field

from epp.framework.plugin import PluginContext, PluginParams
from epp.framework.scheduling import Picker


class PickerParams(PluginParams):
    #: how many endpoints to return: the primary plus fallbacks, best first. 1 (GIE's default)
    #: because the list also goes in the ``x-gateway-destination-endpoint`` header, which
    #: gateways routing with an ORIGINAL_DST cluster on that header cannot parse as a list
    #: (503 for every request); the generated Envoy config retries on another pod without a
    #: list. Raise it for gateways that walk the metadata list (docs/faults.md).
    max_num_of_endpoints: int = Field(1, gt=0)


class CountingPicker(Picker):
    """Base of pickers returning up to ``maxNumOfEndpoints`` endpoints (no ``type_name``: not a
    plugin by itself)."""

    Params = PickerParams

    def __init__(self, name: str, max_num_of_endpoints: int = 1, rng: random.Random | None = None):
        super().__init__(name)
        self.k = max_num_of_endpoints
        self.rng = rng or random.Random()

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, PickerParams)
        return cls(name, params.max_num_of_endpoints)
