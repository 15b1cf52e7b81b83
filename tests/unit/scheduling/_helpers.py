"""Builders for scheduling tests: endpoints with given load, requests with given text."""

from __future__ import annotations

import time

from epp.framework.datalayer import Endpoint, EndpointMetrics
from epp.framework.scheduling import LLMRequest

_counter = iter(range(1, 1_000_000))


def ep(
    name: str | None = None,
    *,
    waiting: int = 0,
    running: int = 0,
    kv: float = 0.0,
    inflight: int = 0,
    inflight_tokens: int = 0,
    fresh: bool = True,
    active: frozenset[str] = frozenset(),
    waiting_adapters: frozenset[str] = frozenset(),
    max_adapters: int = 0,
    block_size: int | None = None,
    num_blocks: int | None = None,
) -> Endpoint:
    i = next(_counter)
    return Endpoint(
        name=name or f"pod-{i}",
        address=f"10.0.{i // 250}.{i % 250}",
        port=8000,
        metrics=EndpointMetrics(
            waiting_queue_size=waiting,
            running_requests_size=running,
            kv_cache_usage=kv,
            active_adapters=active,
            waiting_adapters=waiting_adapters,
            max_adapters=max_adapters,
            cache_block_size=block_size,
            cache_num_blocks=num_blocks,
            updated_at=time.monotonic() if fresh else 0.0,
        ),
        inflight=inflight,
        inflight_tokens=inflight_tokens,
    )


def req(text: str | bytes = b"", model: str = "base-model", salt: str | None = None,
        rid: str = "r") -> LLMRequest:
    data = text.encode() if isinstance(text, str) else text
    return LLMRequest(request_id=rid, target_model=model, incoming_model=model,
                      prefix_text=data, cache_salt=salt)
