"""The wheel works on its own: what a container image (or a `pip install epp`) gets.

Builds the wheel the way the Containerfile does, installs it into a fresh virtualenv (not
editable; no source tree on the path; runtime dependencies resolved by pip), then runs that
installation's `epp serve` behind a real Envoy in front of simulated pods: a request is
routed, and the KEDA external scaler — whose gRPC code must be in the wheel, generated at
build time — answers IsActive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, Topology, free_port_block, grpc_serving, tcp_open

pytestmark = [pytest.mark.envoy, pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-w", str(out), str(ROOT)],
        check=True, timeout=240, capture_output=True,
    )
    (whl,) = out.glob("epp-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel and its runtime dependencies; returns its bin/."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-compile",
         "--disable-pip-version-check", "-q", str(wheel)],
        check=True, timeout=240, capture_output=True,
    )
    return venv / "bin"


def test_the_wheel_holds_the_generated_scaler_code_and_nothing_of_the_checkout(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "epp/_gen/externalscaler_pb2.py" in names
    assert "epp/_gen/externalscaler_pb2_grpc.py" in names
    tops = {n.split("/", 1)[0] for n in names if "/" in n and not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"epp"}, tops  # no benchmarks/, tests/ or protos/ as packages


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_the_installed_picker_routes_through_envoy_and_answers_keda(installed: Path, tmp_path: Path) -> None:
    python = installed / "python"
    probe = subprocess.run(
        [str(python), "-c",
         f"import epp, sys; print(epp.__file__); print(any(p.startswith({str(ROOT)!r}) for p in sys.path))"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60, check=True,
    )
    where, source_on_path = probe.stdout.split()
    assert where.startswith(str(installed.parent)) and source_on_path == "False", probe.stdout

    with Topology(tmp_path / "topo") as topo:
        base = free_port_block(2)
        topo.start_sim(2, base, kv_events_base_port=-1)
        grpc_port, health, metrics, keda = (free_port_block(4) + i for i in range(4))
        topo.start(
            "installed-picker",
            [str(installed / "epp"), "serve", "--endpoints", f"{HOST}:{base},{HOST}:{base + 1}",
             "--grpc-port", str(grpc_port), "--grpc-health-port", str(health), "--metrics-port", str(metrics),
             "--bind-address", HOST, "--keda-scaler-port", str(keda)],  # TLS ext_proc, as deployed
            ready=lambda: grpc_serving(HOST, health) and tcp_open(HOST, keda),
            timeout=60, env={**_clean_env(), "HOME": str(tmp_path)},
        )
        listen = free_port_block(2)
        topo.start_envoy(EnvoySpec(pool=[(HOST, base), (HOST, base + 1)], pickers=[(HOST, grpc_port)],
                                   listen=(HOST, listen), admin=(HOST, listen + 1)))
        req = urllib.request.Request(
            f"http://{HOST}:{listen}/v1/completions",
            data=json.dumps({"model": "sim-model", "prompt": "hello", "max_tokens": 2}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
            assert resp.headers["x-inference-pod"]
            assert json.loads(resp.read())["choices"]

        ask = (
            "import grpc\n"
            "from epp.flowcontrol import keda_proto\n"
            "pb2, pb2_grpc = keda_proto.load()\n"
            f"ch = grpc.insecure_channel('{HOST}:{keda}')\n"
            "stub = pb2_grpc.ExternalScalerStub(ch)\n"
            "print(stub.IsActive(pb2.ScaledObjectRef(name='pool'), timeout=10).result)\n"
        )
        out = subprocess.run([str(python), "-c", ask], cwd=tmp_path, env=_clean_env(), capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "False"  # nothing queued or in flight once the request ended
