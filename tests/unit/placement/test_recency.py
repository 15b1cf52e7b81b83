"""LRU under slot pressure follows real use: a pod's adapter report is dated by the pod (vLLM's
``lora_requests_info`` value is the time it set the series), so a report taken before this
picker's own last use of another adapter does not make the reported one look more recent."""

from __future__ import annotations

from epp.datalayer.datastore import CatalogueModel
from epp.datalayer.metrics_parser import parse_metrics
from epp.placement.config import parse_placement_config
from epp.placement.fleet import Fleet
from epp.placement.policy import COLD, Load, choose_pod

CFG = parse_placement_config("idleUnloadAfter: 60s\nminChurnAge: 0s\n")
CATALOGUE = {m: CatalogueModel(m, f"/adapters/{m}") for m in ("a", "b", "c")}


def _fleet() -> Fleet:
    f = Fleet()
    f.sync({"p1": ["a", "b"]})
    f.pods["p1"].slots = 2
    f.apply_report("p1", 0, ["a", "b"], ["base"], 0.0)
    return f


def test_a_stale_report_of_use_does_not_outrank_the_pickers_own_later_use() -> None:
    f = _fleet()
    f.pods["p1"].adapters["b"].last_used = 8.0  # b served, released at t=8
    f.pods["p1"].adapters["a"].last_used = 10.0  # then a, released at t=10
    # the tick at t=12 reads a report the pod made at t=9, while b was still running
    f.observe_active("p1", frozenset({"b"}), now=12.0, seen=9.0)
    f.observe_active("p1", frozenset(), now=12.0, seen=12.0)  # b has finished since
    assert choose_pod("c", f, {}, CATALOGUE, CFG, 12.0, cold=True) == Load("c", "p1", COLD, evict="b")
    # a report made after the picker's last use does count
    f.observe_active("p1", frozenset({"b"}), now=13.0, seen=11.0)
    f.observe_active("p1", frozenset(), now=13.0, seen=13.0)
    assert choose_pod("c", f, {}, CATALOGUE, CFG, 13.0, cold=True) == Load("c", "p1", COLD, evict="a")


def test_the_parser_keeps_the_time_of_the_latest_adapter_report() -> None:
    page = ('vllm:lora_requests_info{max_lora="2",running_lora_adapters="b",waiting_lora_adapters=""} 1700000009.5\n'
            'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1700000012.0\n')
    m, _ = parse_metrics(page)
    assert m.adapters_at == 1700000012.0 and m.active_adapters == frozenset()
