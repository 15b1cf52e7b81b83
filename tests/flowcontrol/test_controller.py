"""The flow controller in-process: a deterministic pool (one endpoint, a concurrency limit), a
driver that plays the director (count in flight on admit, release with usage on completion),
and assertions on who got dispatched, in what order, with what outcome.

Time is a ``ManualClock``: TTLs, the empty-pool budget and the dispatcher's re-check fire
when a test advances it, never by sleeping."""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from typing import Any

import pytest

from epp.datalayer.datastore import Datastore
from epp.flowcontrol.clock import ManualClock
from epp.flowcontrol.config import parse_flow_control
from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.queues import TTL_HEADER
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.framework.flowcontrol import FairnessPolicy, OrderingPolicy
from epp.framework.requestcontrol import ResponseInfo
from epp.framework.scheduling import LLMRequest
from epp.metrics import EppMetrics
from epp.plugins.flowcontrol.concurrency_detector import ConcurrencyDetector
from epp.plugins.flowcontrol.edf_ordering_policy import EdfOrderingPolicy
from epp.plugins.flowcontrol.round_robin_fairness_policy import RoundRobinFairnessPolicy
from epp.plugins.flowcontrol.token_fair_share_policy import TierSpec, TokenFairShareParams, TokenFairSharePolicy


def request(fid: str, prompt: int = 100, out: int = 100, priority: int = 0, n: int = 0,
            ttl: str | None = None) -> LLMRequest:
    return LLMRequest(request_id=f"{fid}-{n}", target_model="m", incoming_model="m", max_tokens=out,
                      estimated_prompt_tokens=prompt, priority=priority, fairness_id=fid,
                      headers={TTL_HEADER: ttl} if ttl is not None else {})


async def settle(turns: int = 30) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


class Pool:
    """One endpoint that runs ``capacity`` requests at a time; the test completes them."""

    def __init__(self, ctl: FlowController, ep: Endpoint) -> None:
        self.ctl = ctl
        self.ep = ep
        self.running: deque[LLMRequest] = deque()
        self.order: list[LLMRequest] = []
        self.errors: dict[str, RequestError] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def submit(self, req: LLMRequest) -> asyncio.Task[None]:
        async def client() -> None:
            try:
                await self.ctl.admit(req, lambda: [self.ep] if self.ctl.datastore.endpoints() else [])
            except RequestError as exc:
                self.errors[req.request_id] = exc
                self.ctl.release(req, ResponseInfo())
                return
            self.ep.inflight += 1
            self.running.append(req)
            self.order.append(req)

        t = asyncio.get_running_loop().create_task(client())
        self.tasks.append(t)
        return t

    async def complete(self, n: int = 1, usage: tuple[int, int] | None = None) -> None:
        for _ in range(n):
            req = self.running.popleft()
            self.ep.inflight -= 1
            p, c = usage if usage is not None else (req.estimated_prompt_tokens, req.max_tokens or 0)
            self.ctl.release(req, ResponseInfo(status=200, prompt_tokens=p, completion_tokens=c))
            await settle()


def make(capacity: int = 2, fc: dict[str, Any] | None = None, policy: FairnessPolicy | None = None,
         empty_pool_wait: float = 120.0, with_endpoint: bool = True,
         ordering: OrderingPolicy | None = None) -> tuple[FlowController, Pool, EppMetrics]:
    """A controller on a ``ManualClock`` (``ctl.clock``); bands refer to the fairness policy
    as "p" and to the ordering policy as "o"."""
    ds = Datastore()
    ep = Endpoint("pod", "10.0.0.1", 8000)
    if with_endpoint:
        ds.replace_endpoints([ep])
    metrics = EppMetrics()
    cfg = parse_flow_control(fc or {"defaultPriorityBand": {"fairnessPolicyRef": "p"}})
    plugins = {"p": policy or TokenFairSharePolicy("p"), "o": ordering}
    ctl = FlowController(cfg, ConcurrencyDetector("cd", max_concurrency=capacity), ds, metrics,
                         plugins.get, empty_pool_wait=empty_pool_wait, clock=ManualClock())
    return ctl, Pool(ctl, ep), metrics


def advance(ctl: FlowController, seconds: float) -> None:
    clock = ctl.clock
    assert isinstance(clock, ManualClock)
    clock.advance(seconds)


def outcome_count(metrics: EppMetrics, outcome: str) -> float:
    total = 0.0
    for fam in metrics.registry.collect():
        if fam.name == "inference_extension_flow_control_request_queue_duration_seconds":
            for s in fam.samples:
                if s.name.endswith("_count") and s.labels.get("outcome") == outcome:
                    total += s.value
    return total


def tokens(reqs: list[LLMRequest]) -> Counter[str]:
    c: Counter[str] = Counter()
    for r in reqs:
        c[r.fairness_id] += r.estimated_prompt_tokens + (r.max_tokens or 0)
    return c


async def backlog(pool: Pool, pattern: list[tuple[str, int]], rounds: int) -> None:
    """Arrivals in rounds: per round, each tenant sends its count (5:1 = the noisy one 5x)."""
    n = 0
    for _ in range(rounds):
        for fid, k in pattern:
            for _ in range(k):
                n += 1
                pool.submit(request(fid, n=n))
    await settle()


async def test_equal_weights_split_tokens_evenly_while_both_are_backlogged() -> None:
    ctl, pool, _ = make(capacity=2)
    await ctl.start()
    await backlog(pool, [("noisy", 5), ("quiet", 1)], rounds=20)  # 100 vs 20 requests
    assert ctl.queued == 118  # 2 running
    await pool.complete(36)  # the quiet tenant still has requests queued throughout
    assert ctl.band_counter(0, "quiet") > 0
    share = tokens(pool.order[2:])  # after the 2 that took the idle pool at once
    assert abs(share["noisy"] / (share["noisy"] + share["quiet"]) - 0.5) <= 0.1, share
    # the quiet tenant runs out: the noisy one gets all the capacity (work-conserving)
    await pool.complete(30)
    tail = tokens(pool.order[-20:])
    assert tail["quiet"] == 0 and tail["noisy"] > 0
    assert not pool.errors
    await ctl.stop()


async def test_weights_three_to_one_give_three_quarters() -> None:
    policy = TokenFairSharePolicy("p", TokenFairShareParams(tiers=(
        TierSpec(name="gold", weight=3, fairness_ids=("city-*",)),
        TierSpec(name="basic", weight=1, fairness_ids=("dept-a",)),
    )))
    ctl, pool, _ = make(capacity=1, policy=policy)
    await ctl.start()
    await backlog(pool, [("city-utrecht", 1), ("dept-a", 1)], rounds=60)
    await pool.complete(80)
    share = tokens(pool.order[1:81])
    gold = share["city-utrecht"] / (share["city-utrecht"] + share["dept-a"])
    assert abs(gold - 0.75) <= 0.05, share
    await ctl.stop()


async def test_real_usage_corrects_the_estimate() -> None:
    """A tenant whose requests turn out short (real usage << max_tokens) gets more of them."""
    ctl, pool, _ = make(capacity=1)
    await ctl.start()
    await backlog(pool, [("short", 1), ("long", 1)], rounds=40)
    for _ in range(40):
        req = pool.running[0]
        await pool.complete(1, usage=(100, 10) if req.fairness_id == "short" else (100, 100))
    counts = Counter(r.fairness_id for r in pool.order[1:41])
    # tokens per request: short 110, long 200 → short gets ~200/110 times the requests
    assert counts["short"] > counts["long"] * 1.5, counts
    await ctl.stop()


async def test_returning_tenant_is_lifted_not_punished_and_banks_no_credit() -> None:
    ctl, pool, _ = make(capacity=1)
    await ctl.start()
    await backlog(pool, [("busy", 1)], rounds=30)
    await pool.complete(10)  # busy alone: its counter grows
    assert ctl.band_counter(0, "busy") > 0
    await backlog(pool, [("back", 1)], rounds=10)
    # lifted to the busy tenant's counter: neither a head start of 10 requests nor starved
    assert ctl.band_counter(0, "back") == pytest.approx(ctl.band_counter(0, "busy"), rel=0.2)
    await pool.complete(10)
    counts = Counter(r.fairness_id for r in pool.order[11:21])
    assert 4 <= counts["back"] <= 6, counts
    await ctl.stop()


async def test_round_robin_alternates_dispatches() -> None:
    ctl, pool, _ = make(capacity=1, policy=RoundRobinFairnessPolicy("p"))
    await ctl.start()
    await backlog(pool, [("a", 3), ("b", 1)], rounds=4)
    await pool.complete(6)
    assert [r.fairness_id for r in pool.order[1:7]] == ["a", "b", "a", "b", "a", "b"]
    await ctl.stop()


async def test_priority_bands_are_strict() -> None:
    ctl, pool, _ = make(capacity=1, fc={"priorityBands": [{"priority": 10}, {"priority": 0}]})
    await ctl.start()
    pool.submit(request("x", n=0))
    await settle()
    for i in range(5):
        pool.submit(request("low", n=i))
    await settle()
    for i in range(3):
        pool.submit(request("high", priority=10, n=i))
    await settle()
    await pool.complete(8)
    assert [r.fairness_id for r in pool.order[1:]] == ["high"] * 3 + ["low"] * 5
    await ctl.stop()


async def test_sheddable_request_gets_429_when_saturated() -> None:
    ctl, pool, metrics = make(capacity=1)
    await ctl.start()
    pool.submit(request("a"))
    await settle()
    await pool.submit(request("batch", priority=-1, n=1))
    err = pool.errors["batch-1"]
    assert err.status == 429
    assert outcome_count(metrics, "RejectedSheddable") == 1
    await ctl.stop()


async def test_queue_limits_reject_with_429() -> None:
    ctl, pool, metrics = make(capacity=1, fc={"defaultPriorityBand": {"maxRequests": 2}})
    await ctl.start()
    for i in range(4):
        pool.submit(request("a", n=i))
    await settle()
    assert ctl.queued == 2
    assert pool.errors["a-3"].status == 429
    assert outcome_count(metrics, "RejectedCapacity") == 1
    await ctl.stop()


async def test_global_byte_limit_accepts_kubernetes_quantities() -> None:
    ctl, pool, _ = make(capacity=1, fc={"maxBytes": "1Ki"})
    await ctl.start()
    for i in range(4):
        r = request("a", n=i)
        r.headers = {"content-length": "600"}
        pool.submit(r)
    await settle()
    assert ctl.queued == 1 and pool.errors["a-2"].status == 429
    await ctl.stop()


async def test_ttl_expiry_gives_503() -> None:
    ctl, pool, metrics = make(capacity=1, fc={"defaultRequestTTL": "50ms"})
    await ctl.start()
    pool.submit(request("a", n=0))
    task = pool.submit(request("a", n=1))
    await settle()
    advance(ctl, 0.049)
    await settle()
    assert not task.done() and ctl.queued == 1  # not a moment early
    advance(ctl, 0.001)
    await settle()
    assert task.done() and pool.errors["a-1"].status == 503
    assert ctl.queued == 0
    assert outcome_count(metrics, "EvictedTTL") == 1
    await ctl.stop()


async def test_request_ttl_header_shortens_the_default_but_cannot_extend_it() -> None:
    ctl, pool, _ = make(capacity=1, fc={"defaultRequestTTL": "10s"})
    await ctl.start()
    pool.submit(request("a", n=0))  # runs
    short = pool.submit(request("a", n=1, ttl="2s"))
    long = pool.submit(request("a", n=2, ttl="1h"))  # capped at the 10 s default
    typo = pool.submit(request("a", n=3, ttl="soon"))  # ignored: the default applies
    await settle()
    advance(ctl, 2)
    await settle()
    assert short.done() and pool.errors["a-1"].status == 503
    assert not long.done() and not typo.done()
    advance(ctl, 8)
    await settle()
    assert long.done() and typo.done() and set(pool.errors) == {"a-1", "a-2", "a-3"}
    await ctl.stop()


@pytest.mark.parametrize("ordering", ["edf", "fcfs"])
async def test_edf_dispatches_the_earliest_deadline_not_the_oldest_request(ordering: str) -> None:
    """A later request with a shorter TTL overtakes an earlier one with the default TTL under
    EDF; FCFS keeps arrival order."""
    fc = {"defaultRequestTTL": "60s", "defaultPriorityBand": {"fairnessPolicyRef": "p", "orderingPolicyRef": "o"}}
    ctl, pool, _ = make(capacity=1, fc=fc, ordering=EdfOrderingPolicy("o") if ordering == "edf" else None)
    await ctl.start()
    pool.submit(request("a", n=0))  # takes the only slot
    await settle()
    pool.submit(request("a", n=1))  # deadline t+60
    await settle()
    advance(ctl, 1)
    pool.submit(request("a", n=2, ttl="5s"))  # arrives later, deadline t+6
    await settle()
    await pool.complete(2)
    order = [r.request_id for r in pool.order]
    assert order == (["a-0", "a-2", "a-1"] if ordering == "edf" else ["a-0", "a-1", "a-2"])
    await ctl.stop()


async def test_client_disconnect_removes_the_queued_request() -> None:
    ctl, pool, metrics = make(capacity=1)
    await ctl.start()
    pool.submit(request("a", n=0))
    task = pool.submit(request("a", n=1))
    pool.submit(request("a", n=2))
    await settle()
    assert ctl.queued == 2
    task.cancel()
    await settle()
    assert ctl.queued == 1
    assert outcome_count(metrics, "EvictedContextCancelled") == 1
    await pool.complete(2)
    assert [r.request_id for r in pool.order] == ["a-0", "a-2"]
    await ctl.stop()


async def test_empty_pool_holds_then_dispatches_everything_in_fair_order() -> None:
    ctl, pool, metrics = make(capacity=100, with_endpoint=False)
    events: list[str] = []
    ctl.add_activity_listener(lambda: events.append("activity"))
    await ctl.start()
    await backlog(pool, [("a", 3), ("b", 1)], rounds=3)
    assert ctl.queued == 12 and events  # the KEDA scaler was told at once
    ctl.datastore.replace_endpoints([pool.ep])
    await settle(200)
    assert len(pool.order) == 12 and not pool.errors
    assert outcome_count(metrics, "Dispatched") == 12
    await ctl.stop()


async def test_empty_pool_wait_expires_with_503_scaling_message() -> None:
    ctl, pool, metrics = make(with_endpoint=False, empty_pool_wait=30)
    await ctl.start()
    task = pool.submit(request("a"))
    await settle()
    advance(ctl, 29.9)
    await settle()
    assert not task.done()
    advance(ctl, 0.1)
    await settle()
    assert task.done()
    err = pool.errors["a-0"]
    assert err.status == 503 and b"scaling up from zero" in err.body()
    assert outcome_count(metrics, "EvictedNoEndpoints") == 1
    await ctl.stop()


async def test_empty_pool_wait_zero_fails_fast() -> None:
    _ctl, pool, _ = make(with_endpoint=False, empty_pool_wait=0)
    await pool.submit(request("a"))
    assert pool.errors["a-0"].status == 503


async def test_time_waiting_for_an_empty_pool_does_not_count_against_the_ttl() -> None:
    ctl, pool, _ = make(capacity=1, with_endpoint=False, fc={"defaultRequestTTL": "100ms"}, empty_pool_wait=5)
    await ctl.start()
    pool.submit(request("a", n=0))
    pool.submit(request("a", n=1))
    await settle()
    advance(ctl, 0.2)  # longer than the TTL, but the pool was empty
    await settle()
    assert not pool.errors
    ctl.datastore.replace_endpoints([pool.ep])
    await settle()
    assert [r.request_id for r in pool.order] == ["a-0"] and not pool.errors
    await pool.complete(1)
    assert [r.request_id for r in pool.order] == ["a-0", "a-1"]
    await ctl.stop()


async def test_a_held_request_expires_one_ttl_after_the_pool_comes_up() -> None:
    """The TTL starts when the pool comes up, and is enforced from then on even though the
    request was admitted (and its wait-budget timer armed) while the pool was empty."""
    ctl, pool, metrics = make(capacity=1, with_endpoint=False, fc={"defaultRequestTTL": "1s"}, empty_pool_wait=60)
    await ctl.start()
    pool.submit(request("a", n=0))
    waiting = pool.submit(request("a", n=1))
    await settle()
    advance(ctl, 2.5)  # held longer than the TTL: does not count
    await settle()
    ctl.datastore.replace_endpoints([pool.ep])  # a-0 runs, a-1 waits for capacity
    await settle()
    advance(ctl, 0.99)
    await settle()
    assert not waiting.done()
    advance(ctl, 0.01)
    await settle()
    assert waiting.done() and pool.errors["a-1"].status == 503
    assert outcome_count(metrics, "EvictedTTL") == 1
    await ctl.stop()


async def test_blocked_dispatcher_rechecks_saturation_every_poll_interval() -> None:
    """Saturation can drop without any event of ours (a scrape): the dispatcher re-checks
    after ``dispatchPollInterval`` on the controller's clock."""
    ctl, pool, _ = make(capacity=1, fc={"dispatchPollInterval": "50ms",
                                        "defaultPriorityBand": {"fairnessPolicyRef": "p"}})
    await ctl.start()
    pool.submit(request("a", n=0))
    await settle()
    pool.submit(request("a", n=1))
    await settle()
    pool.ep.inflight -= 1  # capacity freed behind the controller's back
    await settle()
    assert len(pool.order) == 1
    advance(ctl, 0.05)
    await settle()
    assert [r.request_id for r in pool.order] == ["a-0", "a-1"]
    await ctl.stop()


async def test_stop_fails_queued_requests_with_503() -> None:
    ctl, pool, _ = make(capacity=1)
    await ctl.start()
    pool.submit(request("a", n=0))
    t = pool.submit(request("a", n=1))
    await settle()
    await ctl.stop()
    await t
    assert pool.errors["a-1"].status == 503


async def test_metrics_track_queue_size_and_tokens() -> None:
    ctl, pool, metrics = make(capacity=1)
    await ctl.start()
    for i in range(3):
        pool.submit(request("tenant", n=i))
    await settle()
    size = metrics.registry.get_sample_value(
        "inference_extension_flow_control_queue_size",
        {"fairness_id": "tenant", "priority": "0", "inference_pool": "default", "model_name": "m",
         "target_model_name": "m"})
    assert size == 2
    await pool.complete(1)
    served = metrics.registry.get_sample_value(
        "epp_flow_control_tokens_served_total",
        {"fairness_id": "tenant", "priority": "0", "inference_pool": "default", "type": "completion"})
    assert served == 100
    await ctl.stop()


async def test_flow_control_series_stay_bounded_under_model_and_tenant_churn(monkeypatch):
    """Label sets beyond the cache bound are forgotten in /metrics too, not only in the cache."""
    from prometheus_client import generate_latest

    from epp.flowcontrol import series as series_mod

    monkeypatch.setattr(series_mod, "MAX_SERIES", 50)
    m = EppMetrics()
    ds = Datastore()
    ds.replace_endpoints([Endpoint("pod", "10.0.0.1", 8000)])
    fm = series_mod.FlowMetrics(m, ds)
    for i in range(2000):
        req = LLMRequest(f"r{i}", f"model-{i}", f"model-{i}", fairness_id=f"tenant-{i}")
        s = fm.series(req)
        assert s is not None
        s.enqueued(10)
        s.dequeued(10)
        s.outcome("Dispatched", 0.0)
    page = generate_latest(m.registry).decode()
    assert page.count("inference_extension_flow_control_queue_size{") <= 52
    assert page.count("inference_extension_flow_control_request_queue_duration_seconds_count{") <= 52
