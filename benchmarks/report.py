"""Summaries, tables, JSON and plots for the routing benchmark."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.loadgen import Record

POD_COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                "vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total")


def parse_counters(text: str) -> dict[str, float]:
    """Sum every series of the counters we need from one pod's /metrics page."""
    out = dict.fromkeys(POD_COUNTERS, 0.0)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            try:
                out[name] += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                pass
    return out


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


def summarize(records: list[Record], pods_before: dict[str, dict[str, float]],
              pods_after: dict[str, dict[str, float]], offered_rate: float, slo_ttft: float,
              warmup: float = 0.0) -> dict[str, Any]:
    """Statistics over the requests scheduled after ``warmup`` seconds (``pods_before`` must be
    scraped at that moment too)."""
    all_records = records
    records = [r for r in records if r.scheduled >= warmup]
    ok = [r for r in records if r.ok]
    sent = [r for r in records if r.sent > 0 or r.status]
    errors = Counter((r.error.split(":", 1)[0] if r.error else f"HTTP {r.status}") for r in records if not r.ok)
    start = min((r.sent for r in sent), default=0.0)
    end = max((r.sent + (r.e2e or 0.0) for r in sent), default=0.0)
    window = max(1e-9, end - start)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [g for r in ok for g in r.itl]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    ideal = sum(min(r.ideal_cached, r.prompt_tokens) for r in ok)
    # pods' own counters (deltas over the run)
    q = sum(pods_after[p]["vllm:prefix_cache_queries_total"] - pods_before[p]["vllm:prefix_cache_queries_total"]
            for p in pods_after)
    h = sum(pods_after[p]["vllm:prefix_cache_hits_total"] - pods_before[p]["vllm:prefix_cache_hits_total"]
            for p in pods_after)
    preempt = sum(pods_after[p]["vllm:num_preemptions_total"] - pods_before[p]["vllm:num_preemptions_total"]
                  for p in pods_after)
    per_pod = Counter(r.pod for r in ok)
    # every pod of the pool counts, also the ones that served nothing
    counts = [per_pod.get(p, 0) for p in sorted(set(pods_after) | set(per_pod)) if p]
    spread = {
        "per_pod": {p: per_pod.get(p, 0) for p in sorted(set(pods_after) | set(per_pod)) if p},
        "min": min(counts) if counts else 0,
        "max": max(counts) if counts else 0,
        "cv": (statistics.pstdev(counts) / statistics.mean(counts)) if counts and statistics.mean(counts) else 0.0,
    }
    good = sum(1 for r in ok if r.ttft is not None and r.ttft <= slo_ttft)
    ideal_rate = ideal / prompt if prompt else 0.0
    hit_rate_pods = h / q if q else 0.0
    hit_rate_usage = cached / prompt if prompt else 0.0
    return {
        "offered_rps": offered_rate,
        "warmup_s": warmup,
        "warmup_requests": len(all_records) - len(records),
        "requests": len(records),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "window_s": window,
        "rps": len(ok) / window,
        "output_tps": out_tokens / window,
        "goodput_rps": good / window,
        "slo_ttft_s": slo_ttft,
        "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
        "ttft_mean": statistics.fmean(ttft) if ttft else None,
        "itl_p50": pct(itl, 50), "itl_p90": pct(itl, 90),
        "e2e_p50": pct(e2e, 50), "e2e_p90": pct(e2e, 90),
        "prompt_tokens": prompt, "cached_tokens": cached, "ideal_cached_tokens": ideal,
        "hit_rate_pods": hit_rate_pods,
        "hit_rate_usage": hit_rate_usage,
        "hit_rate_ideal": ideal_rate,
        "hit_vs_ideal": (hit_rate_pods / ideal_rate) if ideal_rate else None,
        "preemptions": preempt,
        "spread": spread,
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _pc(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


COLUMNS = ("router", "offered r/s", "req/s", "out tok/s", "goodput r/s", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms",
           "ITL p50 ms", "ITL p90 ms", "e2e p90 ms", "hit rate", "hit/ideal", "pod load min/max (cv)", "preempt",
           "errors")


def table(runs: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per (router, rate)."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for run in runs:
        s = run["summary"]
        sp = s["spread"]
        rows.append("| " + " | ".join([
            run["router"], f"{s['offered_rps']:g}", f"{s['rps']:.2f}", f"{s['output_tps']:.0f}",
            f"{s['goodput_rps']:.2f}",
            _ms(s["ttft_p50"]), _ms(s["ttft_p90"]), _ms(s["ttft_p99"]), _ms(s["itl_p50"]), _ms(s["itl_p90"]),
            _ms(s["e2e_p90"]), _pc(s["hit_rate_pods"]),
            "-" if s["hit_vs_ideal"] is None else f"{s['hit_vs_ideal'] * 100:.0f}%",
            f"{sp['min']}/{sp['max']} ({sp['cv']:.2f})", f"{s['preemptions']:.0f}", str(s["errors"]),
        ]) + " |")
    return "\n".join(rows)


def cpu_table(runs: list[dict[str, Any]]) -> str:
    names = sorted({k for r in runs for k in r.get("cpu", {})})
    rows = ["| router | offered r/s | " + " | ".join(f"{n} CPU %" for n in names) + " |",
            "|" + "---|" * (len(names) + 2)]
    for r in runs:
        cpu = r.get("cpu", {})
        rows.append(f"| {r['router']} | {r['summary']['offered_rps']:g} | "
                    + " | ".join("-" if n not in cpu else f"{cpu[n]:.0f}" for n in names) + " |")
    return "\n".join(rows)


def plots(runs: list[dict[str, Any]], ttfts: dict[tuple[str, float], list[float]], out: Path) -> list[str]:
    """TTFT CDF per router (one figure per offered rate) and TTFT p90 vs offered load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    rates = sorted({r["summary"]["offered_rps"] for r in runs})
    routers = list(dict.fromkeys(r["router"] for r in runs))
    for rate in rates:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for router in routers:
            vals = sorted(ttfts.get((router, rate), []))
            if not vals:
                continue
            n = len(vals)
            ax.plot(vals, [(i + 1) / n for i in range(n)], label=router)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"TTFT CDF at {rate:g} req/s offered")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        name = f"ttft_cdf_{rate:g}rps.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for router in routers:
        pts = sorted((r["summary"]["offered_rps"], r["summary"]) for r in runs if r["router"] == router)
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1]["ttft_p90"] or float("nan") for p in pts], marker="o", label=router)
        axes[1].plot(xs, [p[1]["rps"] for p in pts], marker="o", label=router)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("offered load (req/s)")
    axes[0].set_ylabel("TTFT p90 (s, log)")
    axes[0].set_title("TTFT p90 vs offered load")
    axes[1].set_xlabel("offered load (req/s)")
    axes[1].set_ylabel("completed req/s")
    axes[1].set_title("throughput vs offered load")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ttft_p90_vs_load.png", dpi=110)
    plt.close(fig)
    files.append("ttft_p90_vs_load.png")
    return files
