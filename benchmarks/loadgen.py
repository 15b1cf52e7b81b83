"""Open-loop load generator: one aiohttp session, streaming reads, timestamps only.

Requests are fired at their scheduled offsets whether or not earlier ones finished (open
loop; a slow router builds a backlog instead of slowing the client down), except that a chat
turn waits for its session's previous turn. Per streamed read the only Python work is one
clock read and one append; the SSE events are split and the final usage chunk parsed once,
after the response ended, so the client stays cheap even at thousands of chunks per second.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from benchmarks.workloads import Item

POD_HEADER = "x-inference-pod"
#: the sim names pods by port too; the port header aligns with the per-pod /metrics scrape
PORT_HEADER = "x-inference-port"


@dataclass(slots=True)
class Record:
    """What one request did, as the client saw it. Times are seconds from the run start."""

    idx: int
    scheduled: float
    sent: float = 0.0
    status: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ideal_cached: int = 0
    pod: str = ""
    error: str = ""
    group: int = -1
    session: int = -1
    turn: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.ttft is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "idx": self.idx, "scheduled": round(self.scheduled, 4), "sent": round(self.sent, 4),
            "status": self.status, "ttft": self.ttft, "e2e": self.e2e,
            "itl_mean": (sum(self.itl) / len(self.itl)) if self.itl else None,
            "output_tokens": self.output_tokens, "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens, "ideal_cached": self.ideal_cached, "pod": self.pod,
            "error": self.error, "group": self.group, "session": self.session, "turn": self.turn,
        }


def _parse_stream(buf: bytes, marks: list[tuple[int, float]], rec: Record, t0: float) -> None:
    """Split the SSE body into events, time each token event by the read that completed it,
    and take usage from the final chunk."""
    ends = [m[0] for m in marks]
    token_times: list[float] = []
    pos = 0
    usage: dict[str, Any] | None = None
    while True:
        start = buf.find(b"data: ", pos)
        if start < 0:
            break
        end = buf.find(b"\n\n", start)
        if end < 0:
            end = len(buf)
        payload = buf[start + 6:end]
        pos = end + 2
        if payload.startswith(b"[DONE]"):
            break
        if b'"usage":{' in payload and b'"choices":[]' in payload:
            with contextlib.suppress(orjson.JSONDecodeError):
                usage = orjson.loads(payload).get("usage")
            continue
        if b'"error"' in payload and b'"choices"' not in payload:
            rec.error = payload[:200].decode(errors="replace")
            continue
        # a chat stream opens with an empty role delta: not a token
        if b'"role":"assistant","content":""' in payload:
            continue
        i = bisect.bisect_left(ends, end)
        token_times.append(marks[min(i, len(marks) - 1)][1])
    if token_times:
        rec.ttft = token_times[0] - t0
        rec.itl = [b - a for a, b in itertools.pairwise(token_times)]
    rec.output_tokens = len(token_times)
    if usage:
        rec.output_tokens = int(usage.get("completion_tokens") or rec.output_tokens)
        rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        rec.cached_tokens = int(details.get("cached_tokens") or 0)


@dataclass(slots=True)
class LoadGen:
    base_url: str
    items: list[Item]
    label: str = ""
    drain_timeout: float = 60.0
    request_timeout: float = 300.0
    progress: bool = True
    block_size: int = 16
    #: called (in a thread) once, ``warmup`` seconds after the start: the harness scrapes the
    #: pods' counters there so the measured window excludes the cold start
    warmup: float = 0.0
    on_warmup: Callable[[], Any] | None = None
    warmup_result: Any = None
    records: list[Record] = field(default_factory=list)
    _inflight: int = 0
    _done: int = 0
    _errors: int = 0
    _sent: int = 0
    _t0: float = 0.0

    async def _one(self, session: aiohttp.ClientSession, item: Item, rec: Record,
                   wait_for: asyncio.Event | None, done: asyncio.Event) -> None:
        try:
            now = time.perf_counter() - self._t0
            if item.at > now:
                await asyncio.sleep(item.at - now)
            if wait_for is not None:
                await wait_for.wait()
                prev = self.records[item.after]
                # a perfect router serves the whole previous prompt from cache
                rec.ideal_cached = max(rec.ideal_cached, prev.prompt_tokens // self.block_size * self.block_size)
            self._inflight += 1
            self._sent += 1
            t_send = time.perf_counter()
            rec.sent = t_send - self._t0
            marks: list[tuple[int, float]] = []
            chunks: list[bytes] = []
            size = 0
            try:
                async with session.post(self.base_url + item.path, data=item.body,
                                        headers={"content-type": "application/json"}) as resp:
                    rec.status = resp.status
                    rec.pod = resp.headers.get(PORT_HEADER) or resp.headers.get(POD_HEADER, "")
                    async for data in resp.content.iter_any():
                        size += len(data)
                        marks.append((size, time.perf_counter()))
                        chunks.append(data)
                end = time.perf_counter()
                rec.e2e = end - t_send
                body = b"".join(chunks)
                if rec.status == 200:
                    _parse_stream(body, marks, rec, t_send)
                    if rec.ttft is None and not rec.error:
                        rec.error = "no tokens"
                else:
                    rec.error = body[:200].decode(errors="replace")
            except (aiohttp.ClientError, TimeoutError) as exc:
                rec.error = f"{type(exc).__name__}: {exc}"[:200]
            finally:
                self._inflight -= 1
                self._done += 1
                if not rec.ok:
                    self._errors += 1
        finally:
            done.set()

    async def _progress(self, total: int, stats: Callable[[], str]) -> None:
        tty = sys.stderr.isatty()
        last = 0.0
        while True:
            await asyncio.sleep(0.5)
            t = time.perf_counter() - self._t0
            if not tty and t - last < 5.0:
                continue
            last = t
            line = (f"[{self.label}] t={t:5.1f}s sent={self._sent}/{total} done={self._done} "
                    f"inflight={self._inflight} errors={self._errors} {stats()}")
            sys.stderr.write(("\r" + line + "\x1b[K") if tty else line + "\n")
            sys.stderr.flush()

    def _live_stats(self) -> str:
        recent = [r.ttft for r in self.records[max(0, self._done - 200):] if r.ttft is not None]
        if not recent:
            return ""
        recent.sort()
        return f"ttft_p50(recent)={recent[len(recent) // 2]:.3f}s"

    async def _warmup(self) -> Any:
        await asyncio.sleep(max(0.0, self.warmup - (time.perf_counter() - self._t0)))
        assert self.on_warmup is not None
        return await asyncio.to_thread(self.on_warmup)

    async def run(self) -> tuple[list[Record], float]:
        """Send everything; returns the records and the wall time from first send to last end."""
        self.records = [Record(it.idx, it.at, ideal_cached=it.ideal_cached, group=it.group,
                               session=it.session, turn=it.turn) for it in self.items]
        done_events = [asyncio.Event() for _ in self.items]
        conn = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout,
                                         auto_decompress=False) as session:
            self._t0 = time.perf_counter()
            prog = asyncio.create_task(self._progress(len(self.items), self._live_stats)) if self.progress else None
            tasks = [
                asyncio.create_task(self._one(session, it, rec,
                                              done_events[it.after] if it.after >= 0 else None,
                                              done_events[it.idx]))
                for it, rec in zip(self.items, self.records, strict=True)
            ]
            warm = asyncio.create_task(self._warmup()) if self.on_warmup is not None else None
            last_at = self.items[-1].at if self.items else 0.0
            try:
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                       timeout=last_at + self.drain_timeout + 5.0)
            except TimeoutError:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for r in self.records:
                    if r.status == 0 and not r.error:
                        r.error = "not finished before the drain timeout"
            finally:
                if warm is not None:
                    self.warmup_result = await warm
                if prog is not None:
                    prog.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await prog
                    if sys.stderr.isatty():
                        sys.stderr.write("\n")
            wall = time.perf_counter() - self._t0
        return self.records, wall
