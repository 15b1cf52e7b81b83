"""manifests/pd: renders, its picker config is the shipped pd-config.yaml, the sidecar's
arguments are ones `epp pd-sidecar` accepts, and the roles/ports line up with the pool."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp.config.loader import load_config
from epp.pd import cli as sidecar_cli

ROOT = Path(__file__).resolve().parents[2]
PD = ROOT / "manifests" / "pd"


def test_pd_manifest_config_is_the_shipped_pd_config() -> None:
    text = (PD / "epp-config.yaml").read_text()
    assert text == (ROOT / "manifests" / "config" / "pd-config.yaml").read_text()
    cfg = load_config(text)
    assert {p.name for p in cfg.profiles} == {"decode", "prefill"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_pd_kustomization_renders_roles_sidecar_and_pool() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(PD)], capture_output=True, text=True, timeout=60, check=True)
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(out.stdout) if d]
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    pool = next(d for d in docs if d["kind"] == "InferencePool")
    port = pool["spec"]["targetPorts"][0]["number"]
    selector = pool["spec"]["selector"]["matchLabels"]
    for name, role in (("vllm-prefill", "prefill"), ("vllm-decode", "decode")):
        labels = deps[name]["spec"]["template"]["metadata"]["labels"]
        assert labels["llm-d.ai/role"] == role
        assert all(labels.get(k) == v for k, v in selector.items())  # both are pool members
    pod = deps["vllm-decode"]["spec"]["template"]["spec"]
    side = next(c for c in pod["containers"] if c["name"] == "pd-sidecar")
    assert side["args"][0] == "pd-sidecar"
    parser = argparse.ArgumentParser()
    sidecar_cli.add_arguments(parser)
    args = parser.parse_args(side["args"][1:])
    assert args.port == port  # the pool's target port reaches the sidecar ...
    vllm = next(c for c in pod["containers"] if c["name"] == "vllm")
    assert f"--port={args.vllm_port}" in vllm["args"]  # ... which proxies to the local vLLM
    assert sidecar_cli.config_from_args(args).allowlist.enabled
    prefill = deps["vllm-prefill"]["spec"]["template"]["spec"]["containers"][0]
    assert f"--port={port}" in prefill["args"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert "disagg-profile-handler" in cm["data"]["config.yaml"]
