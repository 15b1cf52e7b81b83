"""``epp serve --workers N``: N picker processes behind the same ports, so one pod uses all of
its cores (a Python process uses one: the ext_proc gRPC machinery is most of its CPU).

GIE's picker has no such flag (Go uses every core); this is epp's own. The parent process is a
supervisor only: it starts N workers (``epp serve`` with the same flags plus the hidden
``--worker-index``), serves the merged Prometheus endpoint, forwards SIGTERM/SIGINT (each
worker drains its own streams) and exits when they have; a worker that dies unexpectedly
stops the rest, so the pod restarts whole (what Kubernetes expects of one container).

* **One port**: every worker binds the ext_proc and health ports with ``SO_REUSEPORT``; the
  kernel spreads *connections* over them. Envoy multiplexes streams over few HTTP/2
  connections (one per Envoy worker thread by default), so workers share the load only when
  Envoy opens several: ``epp envoy-config`` caps streams per connection to the picker
  (``max_concurrent_streams`` 8), so a busy Envoy opens more connections and the kernel
  hashes them over the workers. (The workers do not refuse streams over a cap of their own:
  Envoy does not retry a refused ext_proc stream, the request would fail.) A gateway whose
  ext_proc connections are few (one per Envoy thread, not capped) spreads less evenly.
* **Consistent routing**: each worker has its own approximate prefix index, and tells the
  others what it learns (``epp.plugins.scheduling.prefix_sharing``: a datagram per routed
  request over Unix sockets in the supervisor's directory), so a prefix one worker routed is
  known to all within a millisecond. A prefix no worker has seen yet is placed by rendezvous
  hashing (the prefix scorer's ``coldPrefixAffinity``, on by default with several workers),
  which every worker computes alike. In-flight counts are per worker (as they are per
  replica); the scraped queue and KV gauges are shared truth.
* **Metrics**: workers serve on 127.0.0.1 ephemeral ports; ``/metrics`` on ``--metrics-port``
  is the supervisor's, the workers' expositions merged with a ``worker`` label on every
  sample (sum over it for pool totals).
* Not with ``--ha-enable-leader-election`` (a Lease per worker would make no sense) or
  ``--model-placement manage`` (adapters would be loaded once per worker): refused at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from epp.plugins.scheduling.prefix_sharing import WORKER_COUNT_ENV, WORKER_DIR_ENV, WORKER_INDEX_ENV

log = logging.getLogger("epp.serve")

#: environment a worker gets: where to report its bound ports once started (and, in
#: ``WORKER_COUNT_ENV``, how many workers there are: the prefix scorer's default cold affinity)
WORKER_REPORT_ENV = "EPP_WORKER_REPORT"


def report_started(bound_ports: dict[str, int]) -> None:
    """In a worker: tell the supervisor the ports it bound (its metrics port above all)."""
    path = os.environ.get(WORKER_REPORT_ENV)
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(bound_ports))
        tmp.replace(path)


def worker_argv(argv: Sequence[str], index: int) -> list[str]:
    """The supervisor's own ``epp serve`` arguments for worker ``index``: ``--workers``
    dropped, the worker index added."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        out.append(a)
    return [*out, "--worker-index", str(index)]


class MergedWorkerMetrics:
    """A collector whose ``collect`` reads every worker's exposition and returns the families
    merged, each sample labelled with its worker."""

    def __init__(self, ports: dict[int, int], timeout: float = 5.0) -> None:
        self.ports = ports  # worker index -> metrics port
        self.timeout = timeout

    def _fetch(self, port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=self.timeout) as r:
            return str(r.read().decode("utf-8", "replace"))

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for index, port in sorted(self.ports.items()):
            try:
                text = self._fetch(port)
            except OSError:
                continue  # a worker stopping: its series are missing from this scrape
            for fam in text_string_to_metric_families(text):
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp, s.exemplar)
        return list(merged.values())


def _wait_report(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} before it started")
        time.sleep(0.05)
    raise RuntimeError(f"worker did not start within {timeout:.0f}s")


def supervise(argv: Sequence[str], workers: int, *, metrics_port: int, bind_address: str,
              metrics_auth: bool, start_timeout: float = 300.0) -> int:
    """Run ``workers`` workers until a signal (or one dies); returns the exit code."""
    from epp.runner.metrics_http import start_metrics_server

    tmp = Path(tempfile.mkdtemp(prefix="epp-workers-"))
    procs: list[subprocess.Popen[bytes]] = []
    stopping = threading.Event()

    def forward(sig: int, _frame: Any) -> None:
        first = not stopping.is_set()
        stopping.set()
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)
        if not first:
            log.info("second signal: forwarded to the workers")

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    http = None
    died = False
    try:
        ports: dict[int, int] = {}
        for i in range(workers):
            env = {**os.environ, WORKER_COUNT_ENV: str(workers), WORKER_INDEX_ENV: str(i),
                   WORKER_DIR_ENV: str(tmp), WORKER_REPORT_ENV: str(tmp / f"worker-{i}.json")}
            procs.append(subprocess.Popen([sys.executable, "-m", "epp", *worker_argv(argv, i)], env=env))
        for i, p in enumerate(procs):
            if stopping.is_set():
                break
            ports[i] = _wait_report(tmp / f"worker-{i}.json", p, start_timeout).get("metrics", -1)
        log.info("workers started", extra={"workers": workers, "pids": [p.pid for p in procs]})
        if metrics_port >= 0 and not stopping.is_set():
            registry = CollectorRegistry(auto_describe=False)
            registry.register(MergedWorkerMetrics({i: p for i, p in ports.items() if p > 0}))
            auth = None
            if metrics_auth:
                from epp.runner.auth import load_metrics_auth

                auth = load_metrics_auth()
            http, _ = start_metrics_server(registry, metrics_port, bind_address, auth)
        # until a signal, or a worker exits on its own
        while not stopping.is_set():
            if any(p.poll() is not None for p in procs):
                log.error("a worker exited; stopping the others",
                          extra={"exit_codes": [p.returncode for p in procs]})
                died = True
                forward(signal.SIGTERM, None)
                break
            stopping.wait(0.5)
        codes = [p.wait() for p in procs]
        return 0 if all(c == 0 for c in codes) and not died else (max(codes) or 1)
    except RuntimeError as exc:
        print(f"epp serve: {exc}", file=sys.stderr)
        forward(signal.SIGTERM, None)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
        return 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if http is not None:
            http.shutdown()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
