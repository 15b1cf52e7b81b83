"""The scraper against real aiohttp model-server stand-ins on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from epp.datalayer.datastore import Datastore
from epp.datalayer.metric_mapping import ENGINE_TYPE_LABEL
from epp.datalayer.scraper import ABSENT_RECHECK, MetricsScraper
from epp.framework.datalayer import Endpoint
from epp.metrics import EppMetrics
from epp.plugins.datalayer.core_metrics_extractor import CoreMetricsExtractor
from epp.plugins.datalayer.metrics_data_source import MetricsDataSource, MetricsDataSourceParams
from tests.waiting import wait_until

SAMPLE = (Path(__file__).resolve().parents[2] / "data" / "vllm_metrics_sample.txt").read_text()
WAIT = 5.0  # upper bound for anything we wait on; tests normally finish far sooner


def page(queue: int, running: int, kv: float) -> str:
    return (f'vllm:num_requests_waiting{{engine="0"}} {queue}\n'
            f'vllm:num_requests_running{{engine="0"}} {running}\n'
            f'vllm:kv_cache_usage_perc{{engine="0"}} {kv}\n')


class FakePod:
    """A /metrics server whose page, status and latency the test controls."""

    def __init__(self) -> None:
        self.text = SAMPLE
        self.status = 200
        self.delay = 0.0
        self.requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(text=self.text, status=self.status, content_type="text/plain")

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def endpoint(self, name: str = "pod", **kw: object) -> Endpoint:
        return Endpoint(name=name, address="127.0.0.1", port=self.port, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def pods() -> AsyncIterator[Callable[[], Awaitable[FakePod]]]:
    started: list[FakePod] = []

    async def make() -> FakePod:
        pod = FakePod()
        await pod.start()
        started.append(pod)
        return pod

    yield make
    for pod in started:
        await pod.stop()


async def eventually(cond: Callable[[], bool]) -> None:
    """Wait until ``cond()`` holds, at most WAIT seconds."""
    async with asyncio.timeout(WAIT):
        while True:
            if cond():
                return
            await asyncio.sleep(0.01)


def scraper_for(ds: Datastore, *, extractor: CoreMetricsExtractor | None = None,
                source: MetricsDataSource | None = None, **kw: Any) -> MetricsScraper:
    """A scraper reading through GIE's default data source and extractor, as ``epp serve``
    wires it when the config has no ``dataLayer``."""
    return MetricsScraper(ds, source=source or MetricsDataSource("metrics-data-source"),
                          extractor=extractor or CoreMetricsExtractor("core-metrics-extractor"), **kw)


def error_count(metrics: EppMetrics, key: str) -> float:
    return metrics.registry.get_sample_value(
        "epp_metrics_scrape_errors_total", {"endpoint": key}) or 0.0


async def test_scrape_once_parses_the_real_page(pods: Callable[[], Awaitable[FakePod]]) -> None:
    pod = await pods()
    ds = Datastore()
    ep = pod.endpoint()
    scraper = scraper_for(ds)
    try:
        before = ep.metrics
        assert await scraper.scrape_once(ep)
        m = ep.metrics
        assert m is not before  # a new object, never mutated in place
        assert (m.waiting_queue_size, m.running_requests_size, m.cache_block_size) == (2, 4, 32)
        assert m.kv_cache_usage == 0.851063829787234
        assert m.updated_at > 0
    finally:
        await scraper.stop()


async def test_metrics_port_and_path_and_engine_type(pods: Callable[[], Awaitable[FakePod]]) -> None:
    pod = await pods()
    pod.text = "sglang:num_queue_reqs 3\nsglang:num_running_reqs 1\nsglang:token_usage 0.5\n"
    ep = Endpoint(name="sg", address="127.0.0.1", port=1, metrics_port=pod.port,
                  labels={ENGINE_TYPE_LABEL: "sglang"})
    scraper = scraper_for(Datastore())
    try:
        assert scraper.url_for(ep) == f"http://127.0.0.1:{pod.port}/metrics"
        assert await scraper.scrape_once(ep)
        assert (ep.metrics.waiting_queue_size, ep.metrics.kv_cache_usage) == (3, 0.5)
    finally:
        await scraper.stop()
    other = scraper_for(Datastore(), source=MetricsDataSource("m", MetricsDataSourceParams(path="/custom")))
    assert other.url_for(ep).endswith("/custom")


async def test_follows_updates_goes_stale_on_death_and_recovers(
        pods: Callable[[], Awaitable[FakePod]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="epp.datalayer.scraper")
    pod = await pods()
    pod.text = page(1, 1, 0.1)
    ds = Datastore()
    ep = pod.endpoint()
    ds.replace_endpoints([ep])
    metrics = EppMetrics()
    scraper = scraper_for(ds, interval=0.02, timeout=0.5, max_backoff=0.1, metrics=metrics)
    await scraper.start()
    try:
        await eventually(lambda: ep.metrics.waiting_queue_size == 1)
        pod.text = page(7, 3, 0.5)
        await eventually(lambda: ep.metrics.waiting_queue_size == 7)
        assert (ep.metrics.running_requests_size, ep.metrics.kv_cache_usage) == (3, 0.5)

        # the pod dies: metrics stop moving, the last values stay, errors are counted
        port = pod.port
        await pod.stop()
        await eventually(lambda: error_count(metrics, ep.key) >= 3)
        frozen = ep.metrics
        # "the metrics did not move" is shown after the collector has demonstrably tried
        # again: two more failed scrapes were counted after the values were read
        seen_errors = error_count(metrics, ep.key)
        await eventually(lambda: error_count(metrics, ep.key) >= seen_errors + 2)
        assert ep.metrics is frozen and ep.metrics.waiting_queue_size == 7
        assert not ep.is_fresh(frozen.updated_at + 10, 2.0)
        failing_logs = [r for r in caplog.records if r.getMessage() == "metrics scrape failing"]
        assert len(failing_logs) == 1  # once per failing streak, not every scrape

        # it comes back on the same port: the collector recovers and logs it once
        pod.text = page(2, 2, 0.2)
        await pod.start(port)
        await eventually(lambda: ep.metrics.waiting_queue_size == 2)
        assert ep.metrics.updated_at > frozen.updated_at
        await eventually(lambda: any(r.getMessage() == "metrics scrape recovered"
                                     for r in caplog.records))
        assert sum(r.getMessage() == "metrics scrape failing" for r in caplog.records) == 1
    finally:
        await scraper.stop()


async def test_http_error_keeps_old_metrics_and_backs_off(pods: Callable[[], Awaitable[FakePod]]) -> None:
    pod = await pods()
    ds = Datastore()
    ep = pod.endpoint()
    ds.replace_endpoints([ep])
    metrics = EppMetrics()
    scraper = scraper_for(ds, interval=0.01, max_backoff=0.2, metrics=metrics)
    try:
        assert await scraper.scrape_once(ep)
        good = ep.metrics
        pod.status = 500
        assert not await scraper.scrape_once(ep)
        assert ep.metrics is good
        assert error_count(metrics, ep.key) == 1

        # the collector keeps retrying the failing pod, but backs off: its n-th attempt
        # cannot start before the (jittered, >= 0.8x) delays 0.02, 0.04, 0.08, 0.16, 0.2 s
        # have passed, about 0.4 s; without backoff 6 attempts take ~0.05 s. A lower bound
        # on elapsed time, so a slow machine cannot fail it.
        pod.requests = 0
        started = time.monotonic()
        await scraper.start()
        await eventually(lambda: pod.requests >= 6)
        assert time.monotonic() - started >= 0.8 * (0.02 + 0.04 + 0.08 + 0.16 + 0.2)
        assert ep.metrics is good
    finally:
        await scraper.stop()


async def test_timeout_is_a_failure(pods: Callable[[], Awaitable[FakePod]]) -> None:
    pod = await pods()
    pod.delay = 0.3
    ep = pod.endpoint()
    metrics = EppMetrics()
    scraper = scraper_for(Datastore(), timeout=0.1, metrics=metrics)
    try:
        assert not await asyncio.wait_for(scraper.scrape_once(ep), WAIT)
        assert ep.metrics.updated_at == 0
        assert error_count(metrics, ep.key) == 1
    finally:
        await scraper.stop()


async def test_collectors_follow_the_datastore(pods: Callable[[], Awaitable[FakePod]]) -> None:
    a, b = await pods(), await pods()
    a.text, b.text = page(1, 0, 0.0), page(2, 0, 0.0)
    ds = Datastore()
    ep_a = a.endpoint("a")
    ds.replace_endpoints([ep_a])
    metrics = EppMetrics()
    scraper = scraper_for(ds, interval=0.02, metrics=metrics)
    await scraper.start()
    try:
        await eventually(lambda: ep_a.metrics.updated_at > 0)
        assert scraper.collector_keys() == {ep_a.key}

        ep_b = b.endpoint("b")
        ds.upsert_endpoint(ep_b)
        await eventually(lambda: ep_b.metrics.waiting_queue_size == 2)
        assert scraper.collector_keys() == {ep_a.key, ep_b.key}

        ds.remove_endpoint(ep_a.key)
        await eventually(lambda: scraper.collector_keys() == {ep_b.key})
        # "nobody scrapes a removed endpoint" is checked against b's collector, which keeps
        # scraping meanwhile: once b has answered a few more scrapes, any request to a that
        # was in flight at the removal has been served, and afterwards no new one may come
        # while b answers a few more
        seen_b = b.requests
        await eventually(lambda: b.requests >= seen_b + 3)
        seen = a.requests
        seen_b = b.requests
        await eventually(lambda: b.requests >= seen_b + 5)
        assert a.requests == seen

        # re-added as a new object with the same key: a fresh collector for the new object
        ep_a2 = a.endpoint("a")
        ds.upsert_endpoint(ep_a2)
        await eventually(lambda: ep_a2.metrics.updated_at > 0)

        ds.clear()
        await eventually(lambda: scraper.collector_keys() == frozenset())
    finally:
        await scraper.stop()
    assert scraper.collector_keys() == frozenset()


async def test_listener_called_from_another_thread(pods: Callable[[], Awaitable[FakePod]]) -> None:
    pod = await pods()
    ds = Datastore()
    scraper = scraper_for(ds, interval=0.02)
    await scraper.start()
    ep = pod.endpoint()
    try:
        t = threading.Thread(target=ds.replace_endpoints, args=([ep],))
        t.start()
        await asyncio.to_thread(t.join)
        await eventually(lambda: ep.metrics.updated_at > 0)
    finally:
        await scraper.stop()


async def test_missing_family_logged_once(pods: Callable[[], Awaitable[FakePod]],
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="epp.datalayer.scraper")
    pod = await pods()
    # no KV gauge (required); no lora / cache config families (optional, not reported)
    pod.text = "\n".join(line for line in page(1, 1, 0.1).splitlines() if "kv_cache_usage_perc" not in line)
    ep = pod.endpoint()
    scraper = scraper_for(Datastore())
    try:
        for _ in range(5):
            assert await scraper.scrape_once(ep)
        msgs = [r for r in caplog.records if r.getMessage().startswith("metric families missing")]
        assert len(msgs) == 1
        assert set(msgs[0].missing) == {"vllm:kv_cache_usage_perc"}  # type: ignore[attr-defined]
        pod.text = SAMPLE
        # an absent family is looked for again every ABSENT_RECHECK scrapes (~1 s at 50 ms)
        for _ in range(ABSENT_RECHECK):
            assert await scraper.scrape_once(ep)
        assert any(r.getMessage() == "metric families present again" for r in caplog.records)
        assert ep.metrics.kv_cache_usage == 0.851063829787234
    finally:
        await scraper.stop()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        scraper_for(Datastore(), interval=0)

    class BadExtractor(CoreMetricsExtractor):
        def engine_overrides(self) -> dict[str, dict[str, str]]:
            return {"vllm": {"nope": "x"}}

    with pytest.raises(ValueError, match="unknown field"):
        scraper_for(Datastore(), extractor=BadExtractor("bad"))


def test_scraping_does_not_need_the_callers_loop() -> None:
    """Metrics keep arriving while the loop that started the scraper (in ``epp serve``: the
    loop answering Envoy) is busy and never yields: fetching and parsing happen on the
    scraper's own thread, and the hot path only reads the published object."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = page(5, 1, 0.25).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ep = Endpoint(name="pod", address="127.0.0.1", port=server.server_address[1])
    ds = Datastore()
    ds.replace_endpoints([ep])
    scraper = scraper_for(ds, interval=0.02)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scraper.start())
        # the caller's loop is not running now: nothing is scheduled on it
        wait_until(lambda: ep.metrics.waiting_queue_size == 5, timeout=WAIT,
                   what="metrics scraped while the caller's loop is blocked")
        first = ep.metrics
        wait_until(lambda: ep.metrics is not first, timeout=WAIT, what="a second scrape")
        assert ep.metrics.kv_cache_usage == 0.25
        assert scraper.scrapes_done() >= 2
    finally:
        loop.run_until_complete(scraper.stop())
        loop.close()
        server.shutdown()
        server.server_close()


def test_only_the_wanted_families_reach_the_parser_wherever_they_move() -> None:
    """The scraper hands the parser only the families it reads, found where they were on
    the pod's previous page: a family at the top of the page, a longer name sharing the
    prefix before it, a page whose layout changed, a family that disappears."""
    from epp.datalayer.metrics_parser import parse_metrics
    from epp.datalayer.scraper import _LineFinder

    finder = _LineFinder.for_names(("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"))
    page = (b'vllm:num_requests_waiting{engine="0"} 3\n'
            b'vllm:num_requests_waiting{engine="1"} 4\n'
            b"# TYPE other gauge\nother 1\n"
            b'vllm:kv_cache_usage_perc{engine="0"} 0.5\n')
    assert finder.lines(page) == ('vllm:num_requests_waiting{engine="0"} 3\nvllm:num_requests_waiting{engine="1"} 4\n'
                                  'vllm:kv_cache_usage_perc{engine="0"} 0.5')
    moved = (b"# a much longer preamble " * 100 + b"\n" + b'vllm:num_requests_waiting_by_reason{r="x"} 9\n'
             b'vllm:kv_cache_usage_perc{engine="0"} 0.25\nvllm:num_requests_waiting 5\n')
    lines = finder.lines(moved)
    assert lines == 'vllm:num_requests_waiting 5\nvllm:kv_cache_usage_perc{engine="0"} 0.25'
    m, _ = parse_metrics(lines)
    assert (m.waiting_queue_size, m.kv_cache_usage) == (5, 0.25)
    assert finder.lines(b"vllm:num_requests_waiting 1\n") == "vllm:num_requests_waiting 1"
