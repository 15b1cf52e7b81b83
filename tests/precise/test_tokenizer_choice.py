"""The precise scorer never guesses the tokenizer, tokenizes off the event loop, and says
when its tokens are not the engine's."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from epp.config import build_scheduling, load_config
from epp.config.loader import ConfigError
from epp.datalayer.datastore import Datastore
from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext
from epp.framework.scheduling import LLMRequest, ProfileRunResult, SchedulingResult
from epp.metrics import EppMetrics
from epp.requestcontrol.director import Director
from epp.sim.config import SimConfig
from epp.sim.pool import SimPool
from epp.tokenization import HFBackend, PrefixTokenCache, RequestTokenizer
from epp.tokenization.builtin import BuiltinTokenizer

from .conftest import chat_request, completion, eventually, make_scorer
from .faultkit import Relay, Router, endpoint
from .test_tokenization import hf_dir  # noqa: F401 - fixture

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters: {params}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
"""


def build(params: str) -> None:
    build_scheduling(load_config(CONFIG.format(params=params)), PluginContext(Datastore(), EppMetrics()))


def test_the_tokenizer_must_be_named() -> None:
    with pytest.raises(ConfigError, match=r"plugins\[0\].*tokenizer is required.*'builtin'.*simulated"):
        build("{kvEventsPort: 5557}")
    build("{tokenizer: builtin}")  # the simulator's, declared
    build("{tokenizer: model-server}")
    build("{tokenizers: {my-model: builtin}}")
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        build("{tokenizer: /nonexistent/dir}")


def test_a_model_without_a_tokenizer_is_not_guessed() -> None:
    scorer, _, _ = make_scorer([Endpoint("p", "127.0.0.1", 8000)], tokenizer=None, tokenizers={"sim-model": "builtin"})
    assert scorer.tokenizer.tokenize("completions", {"prompt": "hello there"}, "other-model") is None
    assert scorer.tokenizer.tokenize("completions", {"prompt": "hello there"}, "sim-model")


# ---------------------------------------------------------------- tokenizer: model-server


@pytest.fixture
async def tokenize_server() -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    """A model server's /tokenize (answering with the built-in tokenizer's ids)."""
    calls: list[dict[str, Any]] = []
    tok = BuiltinTokenizer()

    async def tokenize(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        calls.append(body)
        if body.get("model") == "broken":
            return web.Response(status=500)
        ids = tok.encode_chat(body["messages"]) if "messages" in body else tok.encode_prompt(body["prompt"])
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": 4096})

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield port, calls
    await runner.cleanup()


async def test_model_server_tokenizer(tokenize_server: tuple[int, list[dict[str, Any]]]) -> None:
    port, calls = tokenize_server
    scorer, _, metrics = make_scorer([Endpoint("p", "127.0.0.1", port)], tokenizer="model-server")
    try:
        msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]
        for _ in range(2):
            req = chat_request(msgs)
            await scorer.prepare_request(req)
            assert scorer._state(req).tokens == BuiltinTokenizer().encode_chat(msgs)
        assert len(calls) == 1 and calls[0]["messages"] == msgs  # the second one came from the cache
        assert metrics.precise_tokenizations.labels("server")._value.get() == 2
        bad = completion("some text", model="broken")
        await scorer.prepare_request(bad)
        assert scorer.score(bad, [Endpoint("p", "127.0.0.1", port)]) == [0.0]
        assert metrics.precise_tokenizations.labels("failed")._value.get() == 1
    finally:
        await scorer.close()


# ---------------------------------------------------------------- off the event loop


async def test_large_uncached_text_is_encoded_on_a_worker(hf_dir: Path) -> None:  # noqa: F811
    rt = RequestTokenizer(PrefixTokenCache(HFBackend(str(hf_dir))), offload_chars=1000)
    text = "alpha beta gamma delta, " * 400
    ids, outcome = await rt.tokenize_async("completions", {"prompt": text}, "m")
    assert outcome == "encoded" and ids == HFBackend(str(hf_dir)).encode(text, True)
    ids2, outcome2 = await rt.tokenize_async("completions", {"prompt": text + " omega"}, "m")
    assert outcome2 == "inline" and ids2 == HFBackend(str(hf_dir)).encode(text + " omega", True)  # prefix cached
    rt.max_queue = 0  # the worker queue is full: do not wait behind it
    assert await rt.tokenize_async("completions", {"prompt": "zeta " * 1000}, "m") == (None, "overloaded")
    await rt.close()


async def test_chat_renders_are_cached(hf_dir: Path) -> None:  # noqa: F811
    backend = HFBackend(str(hf_dir))
    renders = 0
    real = backend.render_chat

    def counting(messages: list[Any], body: dict[str, Any]) -> tuple[str, bool]:
        nonlocal renders
        renders += 1
        return real(messages, body)

    backend.render_chat = counting  # type: ignore[method-assign]
    rt = RequestTokenizer(PrefixTokenCache(backend))
    msgs = [{"role": "system", "content": "Be brief. " * 50}, {"role": "user", "content": "why?"}]
    first = await rt.tokenize_async("chat/completions", {"messages": msgs}, "m")
    again = await rt.tokenize_async("chat/completions", {"messages": msgs}, "m")
    assert first[0] == again[0] and renders == 1  # (the text's unanchored tail is encoded again)
    other = await rt.tokenize_async("chat/completions", {"messages": msgs, "add_generation_prompt": False}, "m")
    assert renders == 2 and other[0] != first[0]


# ---------------------------------------------------------------- the engine's verdict


@pytest.mark.parametrize("which", ["builtin", "hf"])
async def test_a_tokenizer_that_is_not_the_engines_is_reported(which: str, hf_dir: Path) -> None:  # noqa: F811
    cfg = SimConfig(block_size=16, num_gpu_blocks=256, time_scale=0.01)
    async with SimPool(cfg, replicas=1, kv_events_base_port=0, kv_replay_base_port=0) as pool, \
            aiohttp.ClientSession() as session:
        relay = Relay(pool.pods[0].kv_events_endpoint or "")
        relay.start()
        eps = [endpoint(pool.pods[0], relay)]
        scorer, _, metrics = make_scorer(eps, blockSizeTokens=16,
                                         tokenizer="builtin" if which == "builtin" else str(hf_dir))
        scorer.check_delay = 60.0  # settled below, once the engine's events are in
        await scorer.start()
        try:
            router = Router(scorer, pool, eps)
            for i in range(4):
                await router.send(session, f"Document {i}: " + " ".join(f"word{j}" for j in range(80)))
            engine = pool.pods[0].engine
            assert engine is not None
            assert await eventually(lambda: scorer.index.engine_hashes(eps[0].key) == engine.kv.published_hashes())
            scorer.settle_checks(now=time.monotonic() + 120)
            expected = "match" if which == "builtin" else "mismatch"
            assert scorer.checks[expected] == 4
            assert metrics.precise_tokenizer_checks.labels(expected)._value.get() == 4
        finally:
            await scorer.close()
            await relay.close()


async def test_the_director_awaits_tokenization_before_scheduling() -> None:
    cfg = load_config(CONFIG.format(params="{tokenizer: builtin}"))
    ds = Datastore()
    ds.replace_endpoints([Endpoint("a", "10.0.0.1", 8000)])
    bundle = build_scheduling(cfg, PluginContext(ds, EppMetrics()))
    scorer = bundle.plugins["precise-prefix-cache-scorer"]
    assert bundle.prepare_request == (scorer,)
    seen: list[bool] = []

    class Scheduler:
        def schedule(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
            seen.append(scorer._state_key in request.state)  # type: ignore[attr-defined]
            return SchedulingResult({"default": ProfileRunResult([candidates[0]])}, "default")

    d = Director(datastore=ds, scheduler=Scheduler(), prepare_request=bundle.prepare_request)
    await d.route(d.new_context({":path": "/v1/completions"}), orjson.dumps({"model": "m", "prompt": "hi " * 40}))
    assert seen == [True]
