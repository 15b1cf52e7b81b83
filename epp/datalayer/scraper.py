"""Background metric collection, off the request loop: one thread with its own event loop,
one collector task per endpoint polling its ``/metrics``.

Why a thread of its own: the loop that answers Envoy must not spend its time fetching and
parsing pages. Scraping every endpoint every 50 ms on that loop took 4-5 % of a core for 4
pods and most of a core for 100 (``python -m benchmarks.scraping``), and every scrape
delayed the ext_proc messages queued behind it. Here the request loop never fetches or
parses; it only reads ``endpoint.metrics``.

Why that is safe without locks: a scrape builds a *new* ``EndpointMetrics`` and publishes it
with one attribute assignment (``endpoint.metrics = new``), which is atomic in CPython.
Readers on the request loop hold either the old object or the new one, never a half-written
one (they read ``ep.metrics`` once and use that object). On failure the old object stays, so
the endpoint goes stale by age (``updated_at`` stops moving) and the staleness-aware parts
(saturation detector, pool gauges) stop trusting it.

Why one task per endpoint (as GIE's collectors): a slow or dead pod only delays its own
updates, never the others'. Each collector keeps one keep-alive connection to its pod
(``epp.datalayer.scrape_http``: a pre-built GET, a response framed by content-length or
chunks; far cheaper per scrape than a general HTTP client). A failing collector backs off
exponentially (capped, jittered) so a dead pod is not hammered, and is logged once at
warning when it starts failing and once at info when it recovers. Only the lines of the
families the extractor reads reach the parser (``_LineFinder``: found where they were in the
pod's previous page, so a 57 KB page costs a few short searches instead of a split into 600
lines); when those lines are the same as at the last scrape (a steady pod) the last result is
published again without parsing.

The set of collectors follows the datastore: a listener (called from any thread) asks the
scraper's loop to start one for each added endpoint and cancel the one of each removed one.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from epp.datalayer.metrics_parser import MetricsParser, ParserSet
from epp.datalayer.scrape_http import Connection, HttpError, Target
from epp.framework.datalayer import DataSource, Endpoint, EndpointMetrics, MetricsExtractor

if TYPE_CHECKING:

    from epp.datalayer.datastore import Datastore
    from epp.metrics import EppMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")


class ScrapeError(Exception):
    """A scrape that did not produce metrics (HTTP status, connection, timeout)."""


@dataclass(slots=True)
class _Collector:
    endpoint: Endpoint
    task: asyncio.Task[None] | None = None
    conn: Connection | None = None
    failing: bool = False
    failures: int = 0
    last_error: str = ""
    logged_missing: frozenset[str] = frozenset()
    warned_engine: bool = False
    #: the wanted lines of the last page and what they parsed to: a page whose wanted lines
    #: did not change (an idle or steady pod) is not parsed again
    last_lines: str | None = None
    last_parsed: EndpointMetrics | None = None
    last_missing: frozenset[str] = frozenset()
    finder: _LineFinder | None = None
    finder_parser: MetricsParser | None = None


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


#: a family absent from a pod's page is looked for again only every this many scrapes
#: (~1 s at 50 ms): a full search of a 57 KB page per absent family per scrape was a
#: visible share of the scrape
ABSENT_RECHECK = 20


@dataclass(slots=True)
class _LineFinder:
    """Pulls the sample lines of a few families out of a page, remembering where each family
    was in this pod's previous page (a pod's page keeps its layout from scrape to scrape, so
    the search starts right there instead of scanning 57 KB per family). Works on the raw
    bytes: only the lines found are decoded."""

    names: tuple[bytes, ...]
    hints: dict[bytes, int]  # family -> where its first sample line started last time
    absent: dict[bytes, int]  # family -> scrapes since it was last looked for and not found

    @classmethod
    def for_names(cls, names: tuple[str, ...]) -> _LineFinder:
        return cls(tuple(n.encode() for n in names), {}, {})

    def lines(self, page: bytes | bytearray) -> str:
        """Only the sample lines of the families (what the parser reads anyway). A family's
        samples are one contiguous group (the exposition format requires it), so the search
        stops at the end of that group."""
        n = len(page)
        out: list[bytes | bytearray] = []
        for name in self.names:
            skipped = self.absent.get(name)
            if skipped is not None:
                if skipped + 1 < ABSENT_RECHECK:
                    self.absent[name] = skipped + 1
                    continue
                del self.absent[name]
            hint = self.hints.get(name)
            at = -1 if hint is None else _find(page, name, max(0, hint - 1024))
            if at < 0:
                at = _find(page, name, 0)  # from the top: first time, or the page changed shape
            if at < 0:
                self.hints.pop(name, None)
                self.absent[name] = 0
                continue
            self.hints[name] = at
            while at >= 0:  # the group: consecutive lines of exactly this family
                end = page.find(b"\n", at)
                if end < 0:
                    end = n
                out.append(page[at:end])
                at = end + 1
                if not (page.startswith(name, at) and _exact(page, at + len(name))):
                    at = -1
        return b"\n".join(out).decode("utf-8", "replace")


def _find(page: bytes | bytearray, name: bytes, start: int) -> int:
    """Where the family's first sample line starts, at or after ``start``; -1 when none. A
    longer name sharing the prefix (``..._by_reason``) does not count."""
    if start == 0 and page.startswith(name) and _exact(page, len(name)):
        return 0
    needle = b"\n" + name
    k = page.find(needle, max(0, start - 1))
    while k >= 0 and not _exact(page, k + len(needle)):
        k = page.find(needle, k + len(needle))
    return k + 1 if k >= 0 else -1


def _exact(page: bytes | bytearray, i: int) -> bool:
    """The family name ended at ``page[i]`` (labels, or the value after a space)."""
    return i < len(page) and page[i] in _AFTER_NAME


_AFTER_NAME = frozenset(b"{ ")


class MetricsScraper:
    """Keeps every endpoint's ``metrics`` fresh, from a thread of its own.

    ``source``: the configured data source (``dataLayer.sources[0]``, GIE's
    ``metrics-data-source``): each endpoint's URL and whether https verifies certificates.
    ``extractor``: its metrics extractor (``core-metrics-extractor``): which engine mapping an
    endpoint gets by its labels, and the configured ``engineConfigs``. Both are plugin objects
    typed by the framework's interfaces (the data layer does not import plugins).
    ``interval``: seconds between scrapes of one endpoint (``--refresh-metrics-interval``).
    ``timeout``: per-scrape budget. ``max_backoff``: cap of the failure backoff.
    """

    def __init__(
        self,
        datastore: Datastore,
        *,
        source: DataSource,
        extractor: MetricsExtractor,
        interval: float = 0.05,
        timeout: float = 1.0,
        metrics: EppMetrics | None = None,
        max_backoff: float = 1.0,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.datastore = datastore
        self.interval = interval
        self.timeout = timeout
        self.source = source
        self.metrics = metrics
        self.max_backoff = max(max_backoff, interval)
        self.parsers = ParserSet(extractor.engine_overrides(), default_engine=extractor.default_engine,
                                 engine_label_key=extractor.engine_label_key)
        self._collectors: dict[str, _Collector] = {}  # owned by the scraper loop
        self._adhoc: dict[str, _Collector] = {}  # scrape_once state for endpoints without a task
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._running = False
        self._listening = False
        self._scrapes = 0

    # ---- lifecycle ----
    async def start(self) -> None:
        """Start the scraper thread, collectors for the current endpoints, and follow the
        datastore from now on."""
        if self._running:
            return
        self._ensure_thread()
        self._running = True
        if not self._listening:
            self.datastore.add_listener(self._on_endpoints_changed)
            self._listening = True
        await self._call(self._reconcile_async())

    async def stop(self) -> None:
        """Cancel every collector, close their connections, end the thread. Safe to call
        twice."""
        self._running = False
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            try:
                await self._call(self._shutdown())
            except RuntimeError:  # the loop already stopped
                pass
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join, 10.0)
        with self._thread_lock:
            self._loop = None
            self._thread = None
        if not loop.is_running() and not loop.is_closed():
            loop.close()

    def collector_keys(self) -> frozenset[str]:
        """Keys of the endpoints that currently have a running collector (tests, debugging)."""
        return frozenset(k for k, c in list(self._collectors.items()) if c.task is not None and not c.task.done())

    def scrapes_done(self) -> int:
        """Scrapes attempted since start (benchmarks)."""
        return self._scrapes

    # ---- the thread ----
    def _ensure_thread(self) -> asyncio.AbstractEventLoop:
        with self._thread_lock:
            if self._loop is not None and self._thread is not None and self._thread.is_alive():
                return self._loop
            loop = _new_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                try:
                    loop.run_forever()
                finally:
                    loop.run_until_complete(loop.shutdown_asyncgens())

            thread = threading.Thread(target=run, name="epp-metrics-scraper", daemon=True)
            thread.start()
            ready.wait(10.0)
            self._loop, self._thread = loop, thread
            return loop

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the scraper's loop and await its result from the caller's loop."""
        loop = self._ensure_thread()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    async def _shutdown(self) -> None:
        tasks = [c.task for c in self._collectors.values() if c.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for c in (*self._collectors.values(), *self._adhoc.values()):
            if c.conn is not None:
                c.conn.close()
                c.conn = None
        self._collectors.clear()
        self._adhoc.clear()

    # ---- datastore following ----
    def _on_endpoints_changed(self, added: tuple[Endpoint, ...], removed: tuple[Endpoint, ...]) -> None:
        loop = self._loop
        if not self._running or loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._reconcile)
        except RuntimeError:  # the scraper loop closed meanwhile (stopping)
            pass

    async def _reconcile_async(self) -> None:
        self._reconcile()

    def _reconcile(self) -> None:
        """Make the collectors match the datastore's endpoints (idempotent; scraper loop)."""
        if not self._running:
            return
        current = {ep.key: ep for ep in self.datastore.endpoints()}
        for key in list(self._collectors):
            col = self._collectors[key]
            ep = current.get(key)
            if ep is None or ep is not col.endpoint:
                if col.task is not None:
                    col.task.cancel()
                if col.conn is not None:
                    col.conn.close()
                    col.conn = None
                del self._collectors[key]
                if ep is None:
                    self._forget_endpoint_series(key)
        loop = asyncio.get_running_loop()
        for key, ep in current.items():
            if key not in self._collectors:
                col = _Collector(ep)
                self._collectors[key] = col
                col.task = loop.create_task(self._run(col), name=f"metrics-collector {key}")

    def _forget_endpoint_series(self, key: str) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.scrape_errors.remove(key)
        except KeyError:
            pass

    # ---- collection ----
    def url_for(self, endpoint: Endpoint) -> str:
        return self.source.metrics_url(endpoint)

    def _parser_for(self, col: _Collector) -> MetricsParser:
        parser, known = self.parsers.for_labels(col.endpoint.labels)
        if not known and not col.warned_engine:
            col.warned_engine = True
            log.warning(
                "unknown engine type, using the vllm metrics mapping",
                extra={"endpoint": col.endpoint.key,
                       "engine_type": col.endpoint.labels.get(self.parsers.engine_label_key),
                       "known": list(self.parsers.engine_types())},
            )
        return parser

    async def scrape_once(self, endpoint: Endpoint) -> bool:
        """Scrape one endpoint now (on the scraper's thread); True when ``endpoint.metrics``
        was replaced. Failures are counted and logged (once per failing streak), never raised.
        """
        return await self._call(self._scrape_once(endpoint))

    async def _scrape_once(self, endpoint: Endpoint) -> bool:
        col = self._collectors.get(endpoint.key)
        if col is None or col.endpoint is not endpoint:
            col = self._adhoc.get(endpoint.key)
            if col is None or col.endpoint is not endpoint:
                if col is not None and col.conn is not None:
                    col.conn.close()
                col = self._adhoc[endpoint.key] = _Collector(endpoint)
        return await self._scrape(col)

    async def _fetch(self, col: _Collector) -> bytes | bytearray:
        conn = col.conn
        if conn is None:
            try:
                target = Target.from_url(self.url_for(col.endpoint))
            except ValueError as e:
                raise ScrapeError(str(e)) from None
            conn = col.conn = Connection(target, verify_tls=self.source.verify_tls)
        try:
            async with asyncio.timeout(self.timeout):
                status, body = await conn.get()
        except TimeoutError:
            conn.close()
            raise ScrapeError(f"timed out after {self.timeout}s") from None
        except (HttpError, OSError) as e:
            conn.close()
            raise ScrapeError(f"{type(e).__name__}: {e}") from None
        if status != 200:
            raise ScrapeError(f"HTTP {status}")
        return body

    async def _scrape(self, col: _Collector) -> bool:
        self._scrapes += 1
        ep = col.endpoint
        try:
            body = await self._fetch(col)
        except ScrapeError as e:
            self._record_failure(col, str(e))
            return False
        parser = self._parser_for(col)
        finder = col.finder
        if finder is None or col.finder_parser is not parser:
            finder = col.finder = _LineFinder.for_names(parser.family_names())
            col.finder_parser = parser
        lines = finder.lines(body)
        if lines == col.last_lines and col.last_parsed is not None:
            new, missing = copy.copy(col.last_parsed), col.last_missing
        else:
            new, missing = parser.parse(lines)
            col.last_lines, col.last_parsed, col.last_missing = lines, copy.copy(new), missing
        new.updated_at = time.monotonic()
        ep.metrics = new  # one atomic publication; readers see the old or the new object
        self._record_success(col, missing)
        return True

    def _record_failure(self, col: _Collector, error: str) -> None:
        col.failures += 1
        col.last_error = error
        if self.metrics is not None:
            self.metrics.scrape_errors.labels(endpoint=col.endpoint.key).inc()
        if not col.failing:
            col.failing = True
            log.warning("metrics scrape failing", extra={
                "endpoint": col.endpoint.key, "url": self.url_for(col.endpoint), "error": error})

    def _record_success(self, col: _Collector, missing: frozenset[str]) -> None:
        if col.failing:
            log.info("metrics scrape recovered", extra={
                "endpoint": col.endpoint.key, "failed_scrapes": col.failures})
        col.failing = False
        col.failures = 0
        if missing != col.logged_missing:
            newly = missing - col.logged_missing
            back = col.logged_missing - missing
            if newly:
                log.warning("metric families missing on endpoint; fields keep defaults",
                            extra={"endpoint": col.endpoint.key, "missing": sorted(newly)})
            if back:
                log.info("metric families present again",
                         extra={"endpoint": col.endpoint.key, "families": sorted(back)})
            col.logged_missing = missing

    def _next_delay(self, col: _Collector) -> float:
        if col.failures == 0:
            return self.interval
        # exponential from 2x interval, capped; jitter so many dead pods don't sync up
        delay = min(self.max_backoff, self.interval * (2 ** min(col.failures, 30)))
        return delay * random.uniform(0.8, 1.0)

    async def _run(self, col: _Collector) -> None:
        loop = asyncio.get_running_loop()
        # spread the collectors over one interval so they don't all fire together
        await asyncio.sleep(random.uniform(0, self.interval))
        try:
            while True:
                started = loop.time()
                try:
                    await self._scrape(col)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug in parsing must not kill the collector
                    log.exception("metrics collector error", extra={"endpoint": col.endpoint.key})
                    col.failures += 1
                delay = self._next_delay(col)
                await asyncio.sleep(max(0.0, started + delay - loop.time()))
        finally:
            if col.conn is not None:
                col.conn.close()
                col.conn = None
