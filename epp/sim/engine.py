"""One simulated vLLM engine: FCFS waiting queue, continuous batching, chunked prefill,
prefix caching, preemption, LoRA slots — driven by a single step loop.

Why one loop per pod and not a task per request: the timing a router can observe in vLLM comes
from iteration-level batching (every running sequence advances one token per engine step; a new
prompt's prefill makes that step longer for everyone). Simulating exactly that is also the
cheapest way to run many pods in one process: each step is one timer, and requests are woken
through a future only when they got a token.

Step cost (simulated seconds, then x ``time_scale``)::

    f(n)  = 1 + (time_factor_under_load - 1) * (n - 1) / (max_num_seqs - 1)   # n = running seqs
    cost  = f(n) * ( max(inter_token_latency        if any sequence is decoding,
                         prefill_time_per_token * uncached prompt tokens scheduled this step)
                   + lora_load_delay * adapters loaded into a GPU slot this step )
          + lora_load_time * adapters read from disk this step (evicted from the CPU cache)

The ``max`` is a roofline: a decode step is memory-bound (weights + KV reads), so prompt tokens
batched into it cost little until their compute exceeds that time (vLLM's chunked prefill).

``prefill_overhead`` is latency *before* the engine sees a request (the server sleeps it before
``submit``), not engine time: charging 30 ms of step time per admitted prompt would let the
overhead alone saturate a pod at ~30 req/s, far below what the profile's H100 sustains. A lone
request therefore sees TTFT = overhead + uncached x per-token and then one token per
``inter_token_latency`` — the llm-d-inference-sim per-token model — while load, queueing beyond
``max_num_seqs``, KV-cache exhaustion (preemption) and cache hits change it the way they do in
vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from epp.sim.config import LoraModule, SimConfig
from epp.sim.kvcache import KVCache, chain_digests
from epp.sim.kvevents import KVEventPublisher
from epp.sim.lora import LoraTiers
from epp.sim.metrics import EngineStats, Gauges, labels
from epp.sim.sequence import SeqState, Sequence

_LORA_SERIES_LIMIT = 256


class QueueFullError(Exception):
    """The waiting queue is at ``max_waiting_queue_length``."""


@dataclass(slots=True)
class Engine:
    """Scheduler + KV cache + stats of one pod. All methods run on the event loop thread."""

    config: SimConfig
    publisher: KVEventPublisher | None = None
    side_channel_port: int = 0
    out_ids: list[int] = field(default_factory=lambda: [0])
    engine_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    kv: KVCache = field(init=False)
    stats: EngineStats = field(default_factory=EngineStats)
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    transferring: int = 0
    lora: LoraTiers = field(init=False)
    lora_series: OrderedDict[str, float] = field(default_factory=OrderedDict)
    #: loop time until which steps pause for runtime adapter loads (disk reads)
    _stalled_until: float = 0.0
    steps: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        cfg = self.config
        self.kv = KVCache(cfg.num_gpu_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.lora = LoraTiers(cfg.max_loras, cfg.cpu_lora_slots)
        for m in cfg.lora_modules:
            self.load_lora(m)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        """Stop stepping and abort every request (their handlers return at once)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for seq in [*self.running, *self.waiting]:
            self.abort(seq)

    # ------------------------------------------------------------------ LoRA registry
    def load_lora(self, module: LoraModule) -> bool:
        """Register an adapter at once (``--lora-modules``); False if the name is loaded."""
        return self.lora.register(module)

    async def load_lora_runtime(self, module: LoraModule, inplace: bool = False) -> bool:
        """``/v1/load_lora_adapter``: read the adapter from disk (``lora_load_time``, steps
        paused meanwhile; concurrent loads queue behind each other as in vLLM's engine core),
        then serve it. False if the name got registered meanwhile (and not ``inplace``)."""
        delay = self.config.lora_load_time * self.config.time_scale
        if delay > 0:
            loop = asyncio.get_running_loop()
            now = loop.time()
            self._stalled_until = max(now, self._stalled_until) + delay
            await asyncio.sleep(self._stalled_until - now)
        if module.name in self.lora.registry:
            if not inplace:
                return False
            self.lora.replace(module)
            return True
        self.lora.disk_reads += 1
        return self.lora.register(module)

    def unload_lora(self, name: str) -> bool:
        return self.lora.unregister(name)

    # ------------------------------------------------------------------ requests
    def submit(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting_queue_length:
            raise QueueFullError
        seq.arrival = time.monotonic()
        seq.state = SeqState.WAITING
        self.waiting.append(seq)
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        """Drop a request (client gone or pod stopping), releasing its KV blocks."""
        if seq.state == SeqState.FINISHED:
            return
        if seq.state == SeqState.WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self.running.remove(seq)
            self.kv.free(seq.block_ids)
            seq.block_ids = []
        seq.state = SeqState.FINISHED
        seq.finish_reason = "abort"
        seq.finished_at = time.monotonic()
        self.stats.success["abort"] += 1
        seq.wake()

    def reset_prefix_cache(self) -> None:
        self.kv.reset()

    def cached_prefix_tokens(self, token_ids: list[int], lora: LoraModule | None) -> int:
        """Tokens of a prompt currently in the prefix cache (no side effects)."""
        extra = (("lora", lora.name, lora.path),) if lora is not None else None
        bs = self.config.block_size
        max_blocks = (len(token_ids) - 1) // bs
        digests = chain_digests(token_ids, bs, extra, n_blocks=max_blocks)
        return len(self.kv.lookup(digests, max_blocks)) * bs

    # ------------------------------------------------------------------ gauges
    def gauges(self) -> Gauges:
        series: list[tuple[str, float]] = []
        if self.config.lora_enabled:
            running = sorted({s.lora.name for s in self.running if s.lora is not None})
            waiting = sorted({s.lora.name for s in self.waiting if s.lora is not None})
            lbl = labels({
                "max_lora": str(self.config.max_loras),
                "running_lora_adapters": ",".join(running),
                "waiting_lora_adapters": ",".join(waiting),
            })
            self.lora_series[lbl] = time.time()
            self.lora_series.move_to_end(lbl)
            while len(self.lora_series) > _LORA_SERIES_LIMIT:
                self.lora_series.popitem(last=False)
            series = list(self.lora_series.items())
        return Gauges(
            running=len(self.running),
            waiting=len(self.waiting) + self.transferring,
            waiting_deferred=self.transferring,
            kv_usage=self.kv.usage,
            lora_series=series,
        )

    # ------------------------------------------------------------------ the step loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        scale = self.config.time_scale
        while True:
            if not self.running and not self.waiting:
                if self.kv.pending_events and self.publisher is not None:
                    self.publisher.publish(self.kv.drain_events())
                self._wake.clear()
                await self._wake.wait()
                continue
            t0 = loop.time()
            if self._stalled_until > t0:  # a runtime adapter load holds the engine
                await asyncio.sleep(self._stalled_until - t0)
                continue
            scheduled, cost = self._schedule(time.monotonic())
            events = self.kv.drain_events()
            if events and self.publisher is not None:
                self.publisher.publish(events)
            if not scheduled:
                # Nothing fits right now (e.g. every waiting request is LoRA-blocked): wait for
                # an abort or a new arrival instead of spinning.
                self._wake.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that arrives as the wait completes, and stop() would then wait forever
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self._wake.wait()
                continue
            delay = cost * scale
            if delay > 0:
                await asyncio.sleep(max(0.0, t0 + delay - loop.time()))
            self._complete(scheduled, time.monotonic())

    def _load_factor(self, n: int) -> float:
        cfg = self.config
        if cfg.max_num_seqs <= 1 or n <= 1:
            return 1.0
        return 1.0 + (cfg.time_factor_under_load - 1.0) * (min(n, cfg.max_num_seqs) - 1) / (cfg.max_num_seqs - 1)

    def _schedule(self, now: float) -> tuple[list[tuple[Sequence, int]], float]:
        """Pick this step's work (vLLM V1 order: running first, then waiting if nothing was
        preempted) and return it with the step's simulated cost."""
        cfg = self.config
        bs = cfg.block_size
        kv = self.kv
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        decoding = False
        prefill_tokens = 0
        lora_loads = 0
        disk_reads = 0
        preempted = False
        running = self.running

        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            need = -(-(seq.num_computed + n) // bs) - len(seq.block_ids)
            if need > 0:
                while True:
                    new = kv.allocate(need)
                    if new is not None:
                        seq.block_ids.extend(new)
                        break
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                if seq.state != SeqState.RUNNING:
                    break
            scheduled.append((seq, n))
            budget -= n
            if seq.generated > 0 and n == 1 and seq.num_computed + 1 == len(seq.token_ids):
                decoding = True
            else:
                prefill_tokens += n
            self._register(seq, n)
            i += 1

        if not preempted:
            skipped: list[Sequence] = []
            active = {s.lora.name for s in running if s.lora is not None} if cfg.lora_enabled else set()
            while self.waiting and len(running) < cfg.max_num_seqs and budget > 0:
                seq = self.waiting[0]
                if seq.lora is not None and seq.lora.name not in active and len(active) >= cfg.max_loras:
                    skipped.append(self.waiting.popleft())
                    continue
                n = self._admit(seq, budget, now)
                if n == 0:
                    break
                self.waiting.popleft()
                running.append(seq)
                seq.state = SeqState.RUNNING
                scheduled.append((seq, n))
                budget -= n
                prefill_tokens += n
                if seq.lora is not None:
                    active.add(seq.lora.name)
                    gpu, disk = self.lora.use(seq.lora.name)
                    lora_loads += gpu
                    disk_reads += disk
                self._register(seq, n)
            for seq in reversed(skipped):
                self.waiting.appendleft(seq)

        self.stats.h_iteration_tokens.observe(float(cfg.max_num_batched_tokens - budget))
        self.steps += 1
        cost = (
            max(cfg.inter_token_latency if decoding else 0.0, prefill_tokens * cfg.prefill_time_per_token)
            + lora_loads * cfg.lora_load_delay
        ) * self._load_factor(len(running)) + disk_reads * cfg.lora_load_time
        return scheduled, cost

    def _admit(self, seq: Sequence, budget: int, now: float) -> int:
        """Give a waiting request its cached prefix and blocks for its first chunk; returns
        the tokens scheduled (0 = not enough free blocks, stay waiting)."""
        cfg = self.config
        bs = cfg.block_size
        kv = self.kv
        total = len(seq.token_ids)
        hits: list[int] = []
        if cfg.enable_prefix_caching:
            max_hit = (total - 1) // bs  # vLLM always computes at least the last token
            chain_digests(seq.token_ids, bs, seq.extra_keys, seq.digests, n_blocks=max_hit)
            hits = kv.lookup(seq.digests, max_hit)
            kv.touch(hits)
        hit_tokens = len(hits) * bs
        computed = hit_tokens
        external = 0
        if seq.remote_prefill and seq.cached_tokens < 0:
            external = max(0, seq.prompt_len - 1 - hit_tokens)
            computed += external
        n = min(total - computed, budget)
        new = kv.allocate(-(-(computed + n) // bs) - len(hits))
        if new is None:
            kv.free(hits)
            return 0
        seq.block_ids = hits + new
        seq.num_computed = computed
        seq.num_registered = len(hits)
        st = self.stats
        st.prefix_queries += total
        st.prefix_hits += hit_tokens
        if seq.cached_tokens < 0:
            seq.cached_tokens = hit_tokens + external
            seq.scheduled_at = now
            st.prompt_tokens += seq.prompt_len
            st.prompt_local_cache_hit += hit_tokens
            st.prompt_external += external
            st.prompt_local_compute += seq.prompt_len - hit_tokens - external
            if seq.remote_prefill:
                st.external_queries += seq.prompt_len
                st.external_hits += external
        if external:
            # Transferred blocks become part of this pod's prefix cache (and are published).
            self._register(seq, 0)
        return n

    def _register(self, seq: Sequence, n: int) -> None:
        """Cache (and publish) blocks that become full once ``n`` more tokens are computed."""
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        full = (seq.num_computed + n) // bs
        if full <= seq.num_registered:
            return
        chain_digests(seq.token_ids, bs, seq.extra_keys, seq.digests, n_blocks=full)
        self.kv.register(seq.block_ids, seq.digests, seq.num_registered, full, seq.token_ids,
                         seq.lora_id, seq.lora.name if seq.lora else None)
        seq.num_registered = full

    def _preempt(self, seq: Sequence) -> None:
        """vLLM's recompute preemption: drop the KV, requeue at the head of the waiting queue."""
        self.kv.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.state = SeqState.WAITING
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def _complete(self, scheduled: list[tuple[Sequence, int]], now: float) -> None:
        """End of a step: computed tokens land, sequences that finished their input sample one."""
        st = self.stats
        out_ids = self.out_ids
        n_out = len(out_ids)
        gen = 0
        for seq, n in scheduled:
            if seq.state != SeqState.RUNNING:
                continue
            seq.num_computed += n
            if seq.num_computed < len(seq.token_ids):
                continue  # mid-prefill chunk
            idx = seq.generated
            seq.token_ids.append(out_ids[idx % n_out])
            seq.generated = idx + 1
            gen += 1
            if idx == 0:
                seq.first_token_at = now
                st.h_ttft.observe(now - seq.arrival)
            else:
                st.h_itl.observe(now - seq.last_token_at)
            seq.last_token_at = now
            if seq.generated >= seq.max_tokens:
                self._finish(seq, "length", now)
            seq.wake()
        st.generation_tokens += gen
        st.dirty = True

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        self.running.remove(seq)
        if seq.remote_decode and reason == "length":
            seq.kv_transfer_params = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": list(seq.block_ids),
                "remote_engine_id": self.engine_id,
                "remote_request_id": seq.request_id,
                "remote_host": self.config.kv_side_channel_host,
                "remote_port": self.side_channel_port or self.config.kv_side_channel_port,
                "tp_size": 1,
            }
        self.kv.free(seq.block_ids)
        seq.block_ids = []
        seq.state = SeqState.FINISHED
        seq.finish_reason = reason
        seq.finished_at = now
        self.stats.record_finished(seq, reason, now)
