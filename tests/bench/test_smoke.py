"""A short run of the benchmark harness: 2 simulated pods, a few seconds per router.

Checks what a user of ``epp bench`` relies on: every router under test is brought up, actually
serves the request stream (each pod sees traffic through it), and the report has the table,
JSON and plots. Timing results are not asserted here (they live in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from benchmarks.routers import DEFAULT_ROUTERS

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

SUMMARY_KEYS = {"rps", "ttft_p50", "ttft_p90", "ttft_p99", "itl_p50", "itl_p90", "e2e_p90", "hit_rate_pods",
                "hit_rate_ideal", "hit_vs_ideal", "spread", "errors", "ok", "goodput_rps", "output_tps"}


@pytest.mark.timeout(150)
def test_harness_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks", "--pods", "2", "--rate", "6", "--duration", "3",
           "--groups", "2", "--system-prompt-len", "300", "--question-len", "30", "--output-len", "6",
           "--num-gpu-blocks", "1000", "--time-scale", "0.5", "--drain-timeout", "15", "--no-progress",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=140, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    res = orjson.loads((out / "results.json").read_bytes())
    assert [r["router"] for r in res["runs"]] == list(DEFAULT_ROUTERS)
    assert res["workload"]["kind"] == "shared-prefix"
    for run in res["runs"]:
        s = run["summary"]
        assert SUMMARY_KEYS <= s.keys(), run["router"]
        assert s["ok"] > 0 and s["errors"] == 0, (run["router"], s["error_kinds"])
        assert s["ok"] == s["requests"]
        # every response came from a pod of the pool, and the pods' own counters saw the prompts
        assert len(s["spread"]["per_pod"]) == 2 and sum(s["spread"]["per_pod"].values()) == s["ok"], run["router"]
        assert s["prompt_tokens"] > 0 and 0 < s["hit_rate_ideal"] < 1
        assert 0 < s["ttft_p50"] <= s["ttft_p90"] <= s["ttft_p99"]
        assert (Path(run["logs"]) / "requests.jsonl").is_file()
    for name in res["plots"]:
        assert (out / name).stat().st_size > 1000
    # the table printed at the end has a row per router
    for router in DEFAULT_ROUTERS:
        assert f"| {router} |" in proc.stdout
