"""Background metric collection: one asyncio task per endpoint polling its ``/metrics``.

Why one task per endpoint (as GIE's collectors): a slow or dead pod only delays its own
updates, never the others'. The tasks share one aiohttp session with keep-alive, so a 50 ms
poll reuses its TCP connection instead of opening one per scrape.

On success the endpoint gets a *new* ``EndpointMetrics`` object (readers on the hot path
hold the old one without locks and never see a half-written update). On failure the old
object stays, so the endpoint goes stale by age (``updated_at`` stops moving) and the
staleness-aware parts (saturation detector, pool gauges) stop trusting it; the collector backs
off exponentially (capped) so a dead pod is not hammered. A failing endpoint is logged once
at warning when it starts failing and once at info when it recovers.

The set of collectors follows the datastore: a listener starts one for each added endpoint
and cancels the one of each removed endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from epp.datalayer.metrics_parser import MetricsParser, ParserSet
from epp.framework.datalayer import DataSource, Endpoint, MetricsExtractor

if TYPE_CHECKING:

    from epp.datalayer.datastore import Datastore
    from epp.metrics import EppMetrics

log = logging.getLogger(__name__)


class ScrapeError(Exception):
    """A scrape that did not produce metrics (HTTP status, connection, timeout)."""


@dataclass(slots=True)
class _Collector:
    endpoint: Endpoint
    task: asyncio.Task[None] | None = None
    failing: bool = False
    failures: int = 0
    last_error: str = ""
    logged_missing: frozenset[str] = frozenset()
    warned_engine: bool = False


class MetricsScraper:
    """Keeps every endpoint's ``metrics`` fresh.

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
        max_connections_per_host: int = 2,
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
        self.max_connections_per_host = max_connections_per_host
        self.parsers = ParserSet(extractor.engine_overrides(), default_engine=extractor.default_engine,
                                 engine_label_key=extractor.engine_label_key)
        self._collectors: dict[str, _Collector] = {}
        self._adhoc: dict[str, _Collector] = {}  # scrape_once state for endpoints without a task
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._running = False
        self._listening = False

    # ---- lifecycle ----
    async def start(self) -> None:
        """Start collectors for the current endpoints and follow the datastore from now on."""
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._ensure_session()
        self._running = True
        if not self._listening:
            self.datastore.add_listener(self._on_endpoints_changed)
            self._listening = True
        self._reconcile()

    async def stop(self) -> None:
        """Cancel every collector and close the HTTP session. Safe to call twice."""
        self._running = False
        tasks = [c.task for c in self._collectors.values() if c.task is not None]
        for c in self._collectors.values():
            if c.task is not None:
                c.task.cancel()
        self._collectors.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def collector_keys(self) -> frozenset[str]:
        """Keys of the endpoints that currently have a running collector (tests, debugging)."""
        return frozenset(k for k, c in self._collectors.items() if c.task is not None and not c.task.done())

    # ---- datastore following ----
    def _on_endpoints_changed(self, added: tuple[Endpoint, ...], removed: tuple[Endpoint, ...]) -> None:
        if not self._running or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._reconcile()
        else:  # discovery running in another thread (e.g. a sync Kubernetes watch)
            self._loop.call_soon_threadsafe(self._reconcile)

    def _reconcile(self) -> None:
        """Make the collectors match the datastore's endpoints (idempotent)."""
        if not self._running:
            return
        current = {ep.key: ep for ep in self.datastore.endpoints()}
        for key in list(self._collectors):
            col = self._collectors[key]
            ep = current.get(key)
            if ep is None or ep is not col.endpoint:
                if col.task is not None:
                    col.task.cancel()
                del self._collectors[key]
                if ep is None:
                    self._forget_endpoint_series(key)
        for key, ep in current.items():
            if key not in self._collectors:
                col = _Collector(ep)
                self._collectors[key] = col
                col.task = asyncio.get_running_loop().create_task(
                    self._run(col), name=f"metrics-collector {key}")

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

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=0,  # no global cap: one collector per endpoint, bounded per host below
                limit_per_host=self.max_connections_per_host,
                keepalive_timeout=30.0,
                ssl=True if self.source.verify_tls else False,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,  # never route pod scrapes through an HTTP(S)_PROXY
                headers={"Accept": "text/plain;version=0.0.4"},
            )
        return self._session

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
        """Scrape one endpoint now; True when ``endpoint.metrics`` was replaced.

        Failures are counted and logged (once per failing streak), never raised.
        """
        col = self._collectors.get(endpoint.key)
        if col is None or col.endpoint is not endpoint:
            col = self._adhoc.get(endpoint.key)
            if col is None or col.endpoint is not endpoint:
                col = self._adhoc[endpoint.key] = _Collector(endpoint)
        return await self._scrape(col)

    async def _fetch(self, endpoint: Endpoint) -> str:
        session = self._ensure_session()
        url = self.url_for(endpoint)
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=self.timeout),
                                   allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ScrapeError(f"HTTP {resp.status}")
                body = await resp.read()
        except TimeoutError:
            raise ScrapeError(f"timed out after {self.timeout}s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise ScrapeError(f"{type(e).__name__}: {e}") from None
        return body.decode("utf-8", "replace")

    async def _scrape(self, col: _Collector) -> bool:
        ep = col.endpoint
        try:
            text = await self._fetch(ep)
            parser = self._parser_for(col)
            new, missing = parser.parse(text)
        except ScrapeError as e:
            self._record_failure(col, str(e))
            return False
        new.updated_at = time.monotonic()
        ep.metrics = new
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
