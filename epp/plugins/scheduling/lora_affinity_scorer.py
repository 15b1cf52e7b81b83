"""``lora-affinity-scorer``: send a LoRA request where its adapter is (or can be) loaded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from pydantic import BaseModel

from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext, PluginParams
from epp.framework.scheduling import LLMRequest, Scorer

ACTIVE = 1.0
FREE_SLOT = 0.8
WAITING = 0.6
FULL = 0.0


class LoraAffinityParams(PluginParams):
    #: model names that are base models, never adapters (requests for them score neutrally)
    base_models: tuple[str, ...] = ()


class LoraAffinityScorer(Scorer):
    """Adapter active → 1.0; free slot (active + waiting < max) → 0.8; adapter waiting → 0.6;
    else 0 (GIE tiers).

    Which requests are LoRA requests? The rule, in order:

    1. ``target_model`` listed in ``baseModels`` → not an adapter: every endpoint scores 1.0.
    2. No candidate reports any LoRA state (``max_adapters`` 0 and no active/waiting
       adapters: the pool does not serve LoRA, or ``vllm:lora_requests_info`` is absent)
       → nothing to prefer: every endpoint scores 1.0.
    3. Otherwise ``target_model`` is treated as an adapter and the GIE tiers apply. An adapter
       no endpoint has loaded yet ("cold") thus goes where a slot is free.

    Rule 3 also catches a base-model request in a LoRA pool when ``baseModels`` is not set;
    it then merely prefers pods with free adapter slots, which is harmless. A uniform score
    never changes the pick, so the neutral cases cost nothing in ranking.
    """

    type_name = "lora-affinity-scorer"
    category = "Affinity"
    Params = LoraAffinityParams

    def __init__(self, name: str, base_models: Sequence[str] = ()) -> None:
        super().__init__(name)
        self.base_models = frozenset(base_models)

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, LoraAffinityParams)
        return cls(name, params.base_models)

    def score(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        model = request.target_model
        if model in self.base_models:
            return [1.0] * len(endpoints)
        lora_pool = False
        for ep in endpoints:
            m = ep.metrics
            if m.max_adapters > 0 or m.active_adapters or m.waiting_adapters:
                lora_pool = True
                break
        if not lora_pool:
            return [1.0] * len(endpoints)
        out = []
        for ep in endpoints:
            m = ep.metrics
            if model in m.active_adapters:
                out.append(ACTIVE)
            elif len(m.active_adapters) + len(m.waiting_adapters) < m.max_adapters:
                out.append(FREE_SLOT)
            elif model in m.waiting_adapters:
                out.append(WAITING)
            else:
                out.append(FULL)
        return out
