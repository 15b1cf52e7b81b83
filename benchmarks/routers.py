"""The routers under test and how each is brought up in front of the same simulated pods.

Router names on the command line:

* ``envoy-rr`` — Envoy round robin straight to the pods (a Kubernetes Service).
* ``epp`` — Envoy + ``epp serve`` with its built-in default config.
* ``epp:LABEL=PATH`` — Envoy + ``epp serve --config-file PATH``, reported as ``epp:LABEL``
  (``epp=PATH`` is reported as ``epp:<file stem>``).
* ``vllm-router:POLICY`` — the vllm-router PyPI package (Rust) with ``--policy POLICY``; it
  is itself an HTTP proxy, so the client talks to it directly (no Envoy). ``kv_aware`` is
  fed the pods' ZMQ KV-event publishers (``--kv-event-source``).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, ManagedProcess, Topology, TopologyError, free_port_block, http_ok

DEFAULT_ROUTERS = ("envoy-rr", "epp", "vllm-router:cache_aware", "vllm-router:kv_aware")
VLLM_ROUTER_POLICIES = ("random", "round_robin", "cache_aware", "kv_aware", "power_of_two",
                        "consistent_hash", "sticky_least_loaded")


@dataclass(slots=True)
class RouterSpec:
    label: str
    kind: str  # envoy-rr | epp | vllm-router
    config_path: str | None = None
    config_text: str | None = None
    policy: str | None = None

    def describe(self) -> dict[str, str | None]:
        return {"label": self.label, "kind": self.kind, "config": self.config_path, "policy": self.policy}


def parse_router(text: str) -> RouterSpec:
    """One ``--routers`` entry (see the module docstring)."""
    t = text.strip()
    if t == "envoy-rr":
        return RouterSpec("envoy-rr", "envoy-rr")
    if t == "epp":
        return RouterSpec("epp", "epp")
    if t.startswith("epp=") or t.startswith("epp:"):
        rest = t[4:]
        if t.startswith("epp="):
            label, path = Path(rest).stem, rest
        elif "=" in rest:
            label, path = rest.split("=", 1)
        else:
            raise ValueError(f"router {t!r}: write epp:LABEL=PATH or epp=PATH")
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"router {t!r}: config file {path} not found")
        return RouterSpec(f"epp:{label}", "epp", config_path=str(p), config_text=p.read_text())
    if t.startswith("vllm-router"):
        policy = t.split(":", 1)[1] if ":" in t else "cache_aware"
        if policy not in VLLM_ROUTER_POLICIES:
            raise ValueError(f"router {t!r}: policy must be one of {', '.join(VLLM_ROUTER_POLICIES)}")
        return RouterSpec(f"vllm-router:{policy}", "vllm-router", policy=policy)
    raise ValueError(f"unknown router {t!r}: envoy-rr, epp, epp:LABEL=PATH, vllm-router:POLICY")


def vllm_router_binary() -> str:
    cand = Path(sys.executable).parent / "vllm-router"
    if cand.is_file():
        return str(cand)
    found = shutil.which("vllm-router")
    if not found:
        raise TopologyError("vllm-router not installed: pip install 'epp[bench]'")
    return found


@dataclass(slots=True)
class Pool:
    """The simulated pods: HTTP ports and KV-event ports."""

    http_ports: list[int]
    kv_ports: list[int]
    block_size: int = 16
    model: str = "sim-model"

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(HOST, p) for p in self.http_ports]

    @property
    def urls(self) -> list[str]:
        return [f"http://{HOST}:{p}" for p in self.http_ports]


def start_router(topo: Topology, spec: RouterSpec, pool: Pool, extra_vllm_router: list[str] | None = None
                 ) -> tuple[str, list[ManagedProcess]]:
    """Start ``spec`` in ``topo`` in front of ``pool``; returns the client base URL and the
    router's own processes (for CPU accounting)."""
    if spec.kind == "envoy-rr":
        base = free_port_block(2)
        envoy = topo.start_envoy(EnvoySpec(pool=pool.endpoints, pickers=[], listen=(HOST, base),
                                           admin=(HOST, base + 1), routing="direct"))
        return f"http://{HOST}:{base}", [envoy]
    if spec.kind == "epp":
        base = free_port_block(5)
        picker = topo.start_picker(pool.endpoints, grpc_port=base, health_port=base + 1, metrics_port=base + 2,
                                   config_text=spec.config_text, secure=True)
        envoy = topo.start_envoy(EnvoySpec(pool=pool.endpoints, pickers=[(HOST, base)], listen=(HOST, base + 3),
                                           admin=(HOST, base + 4), routing="override-host", picker_tls=True))
        return f"http://{HOST}:{base + 3}", [picker, envoy]
    if spec.kind == "vllm-router":
        base = free_port_block(2)
        argv = [vllm_router_binary(), "--host", HOST, "--port", str(base), "--worker-urls", *pool.urls,
                "--policy", spec.policy or "cache_aware", "--prometheus-host", HOST,
                "--prometheus-port", str(base + 1), "--log-level", "warning"]
        if spec.policy == "kv_aware":
            for url, kv in zip(pool.urls, pool.kv_ports, strict=True):
                argv += ["--kv-event-source", f"{url}=tcp://{HOST}:{kv}"]
            argv += ["--kv-event-block-size", str(pool.block_size), "--kv-event-model", pool.model]
        argv += list(extra_vllm_router or [])
        proc = topo.start("vllm-router", argv, ready=lambda: http_ok(f"http://{HOST}:{base}/readiness"),
                          timeout=60.0)
        return f"http://{HOST}:{base}", [proc]
    raise ValueError(spec.kind)
