"""Several picker workers, one pool: what one worker learns reaches the others' approximate
prefix indexes, and a prefix none has seen is placed alike by every worker."""

from __future__ import annotations

import os
from pathlib import Path

from epp.datalayer.datastore import Datastore
from epp.framework.plugin import PluginContext
from epp.plugins.scheduling.prefix_cache import PrefixCacheScorer, PrefixIndexParams
from epp.plugins.scheduling.prefix_index import PrefixIndex, chain_hashes
from epp.plugins.scheduling.prefix_sharing import PrefixPeers
from epp.runner.workers import worker_argv
from tests.unit.scheduling._helpers import ep, req
from tests.waiting import eventually


async def test_a_learning_reaches_the_other_worker(tmp_path: Path) -> None:
    pool = Datastore()
    a, b = ep("a"), ep("b")
    pool.replace_endpoints([a, b])
    idx0, idx1 = PrefixIndex(), PrefixIndex()
    w0 = PrefixPeers(idx0, pool, str(tmp_path), 0, 2)
    w1 = PrefixPeers(idx1, pool, str(tmp_path), 1, 2)
    await w0.start()
    await w1.start()
    try:
        hashes = [11, 12, 13]
        idx0.add(b, hashes)
        w0.publish(b, hashes)
        await eventually(lambda: idx1.match(hashes) == {b.key: 3}, timeout=5, what="worker 1 learned it")
        # an endpoint the receiving worker's pool does not have is ignored
        w1.publish(ep("stranger"), [99])
        w1.publish(a, [21])
        await eventually(lambda: idx0.match([21]) == {a.key: 1}, timeout=5, what="worker 0 learned the second")
        assert idx0.match([99]) == {}
    finally:
        await w0.close()
        await w1.close()
    assert not os.listdir(tmp_path)  # sockets removed


def test_a_cold_prefix_is_placed_alike_whatever_the_endpoint_order() -> None:
    eps = [ep(f"e{i}") for i in range(7)]
    text = b"You are a careful assistant for the city archive. " * 20 + b"question"
    scorer = PrefixCacheScorer("p", PrefixIndex(), cold_affinity=0.5)
    other = PrefixCacheScorer("p", PrefixIndex(), cold_affinity=0.5)

    def chosen(s: PrefixCacheScorer, order: list) -> str:  # type: ignore[type-arg]
        scores = s.score(req(text), order)
        assert sorted(scores) == [0.0] * (len(order) - 1) + [0.5]
        return str(order[scores.index(0.5)].key)

    assert chosen(scorer, eps) == chosen(other, list(reversed(eps)))
    # different prefixes spread over the pool
    picks = set()
    for k in range(40):
        s = PrefixCacheScorer("p", PrefixIndex(), cold_affinity=0.5)
        picks.add(str(eps[s.score(req(f"prompt {k} ".encode() * 80), eps).index(0.5)].key))
    assert len(picks) >= 4, picks
    # off by default in a single process: no endpoint is preferred
    single = PrefixCacheScorer.from_config("p", PrefixIndexParams(), PluginContext(Datastore()))
    assert single.score(req(text), eps) == [0.0] * 7
    assert chain_hashes(text, "m", 64, 256)  # (the request has blocks to anchor on)


def test_worker_argv_drops_workers_and_adds_the_index() -> None:
    assert worker_argv(["serve", "--workers", "3", "--endpoints", "x", "--workers=3"], 2) == [
        "serve", "--endpoints", "x", "--worker-index", "2"]
