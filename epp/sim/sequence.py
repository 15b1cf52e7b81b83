"""One request as the simulated engine tracks it: tokens, KV blocks, progress, timestamps.

Shared by the engine (which schedules and advances it) and the HTTP server (which builds it
from a request body and streams its tokens); neither owns the other's logic, so the type
lives on its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from epp.sim.config import LoraModule


class SeqState(IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2



@dataclass(slots=True)
class Sequence:
    """One request inside the engine (n=1): its tokens, KV blocks, progress and timestamps."""

    request_id: str
    token_ids: list[int]
    max_tokens: int
    lora: LoraModule | None = None
    lora_id: int | None = None
    remote_prefill: bool = False  # P/D decode leg: prompt KV arrives from the prefiller
    remote_decode: bool = False  # P/D prefill leg: return kv_transfer_params
    prompt_len: int = 0
    extra_keys: Any = None
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    num_registered: int = 0
    generated: int = 0
    cached_tokens: int = -1  # set at first admission (local hits + transferred)
    preemptions: int = 0
    state: SeqState = SeqState.WAITING
    finish_reason: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    arrival: float = 0.0
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    finished_at: float = 0.0
    waiter: asyncio.Future[None] | None = None

    def __post_init__(self) -> None:
        self.prompt_len = len(self.token_ids)
        if self.lora is not None:
            # vLLM's LoRA extra key for block hashes: the adapter's name *and* path.
            self.extra_keys = (("lora", self.lora.name, self.lora.path),)

    @property
    def finished(self) -> bool:
        return self.state == SeqState.FINISHED

    def wake(self) -> None:
        """Wake the request handler waiting on this sequence (new token, finish or abort)."""
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)
