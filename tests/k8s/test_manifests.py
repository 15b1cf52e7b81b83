"""Every shipped manifest variant renders and every object in it is valid.

* kustomize: ``kubectl kustomize`` on manifests/crds, base, each overlay and each example;
* Helm: manifests/charts/epp rendered with ``helm_python`` (Helm v4 as a library) for every
  provider and mode, and linted;
* core kinds are validated against the Kubernetes OpenAPI schemas (``kubernetes-validate``,
  strict: unknown fields fail), our own CRs against the openAPIV3Schema of our own CRDs
  (``jsonschema``, strict as well: the API server would silently prune a misspelt field);
* the pieces are checked against each other (Service selects the picker pods, the pool points
  at the Service's gRPC port, the picker's --pool-name is the pool, RBAC covers what
  discovery reads, probes, grace period, ...), and HTTPRoutes target the InferencePool.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp.runner import cli as serve_cli
from tests.k8s.crdcheck import strict_json_schema

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
CHART = MANIFESTS / "charts" / "epp"
K8S_VERSION = "1.33"

KUSTOMIZE_DIRS = ["base", *(f"overlays/{p.name}" for p in sorted((MANIFESTS / "overlays").iterdir())),
                  "examples/vllm", "examples/sim"]
CORE_GROUPS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "apiextensions.k8s.io/v1"}
OUR_GROUPS = {"inference.networking.k8s.io", "inference.networking.x-k8s.io"}
THIRD_PARTY = {"gateway.networking.k8s.io/v1", "networking.istio.io/v1", "gateway.envoyproxy.io/v1alpha1"}


def _shutdown_grace_default() -> float:
    """What the picker drains for after SIGTERM when no --shutdown-grace is given."""
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    return float(p.get_default("shutdown_grace"))


SHUTDOWN_GRACE_DEFAULT = _shutdown_grace_default()

kubectl = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(kubectl is None, reason="kubectl not installed")


def kustomize(rel: str) -> list[dict[str, Any]]:
    assert kubectl is not None
    out = subprocess.run([kubectl, "kustomize", str(MANIFESTS / rel)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, f"kubectl kustomize {rel}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def load_crds() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> openAPIV3Schema, from manifests/crds."""
    schemas = {}
    for f in sorted((MANIFESTS / "crds").glob("*_*.yaml")):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            schemas[(crd["spec"]["group"], v["name"], crd["spec"]["names"]["kind"])] = \
                v["schema"]["openAPIV3Schema"]
    return schemas


CRD_SCHEMAS = load_crds()


def validate_objects(objs: list[dict[str, Any]], where: str) -> None:
    import jsonschema
    import kubernetes_validate

    for obj in objs:
        av, kind = obj["apiVersion"], obj["kind"]
        name = f"{where}: {kind}/{obj.get('metadata', {}).get('name')}"
        assert obj.get("metadata", {}).get("name"), f"{name}: no metadata.name"
        group, _, version = av.rpartition("/")
        if av in CORE_GROUPS:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{name}: {exc.message} at {list(exc.path)}") from None
        elif group in OUR_GROUPS:
            schema = CRD_SCHEMAS.get((group, version, kind))
            assert schema is not None, f"{name}: no CRD of ours serves {av} {kind}"
            try:
                jsonschema.validate(obj, strict_json_schema(schema))
            except jsonschema.ValidationError as exc:
                raise AssertionError(f"{name}: {exc.message} at {list(exc.absolute_path)}") from None
        else:
            assert av in THIRD_PARTY, f"{name}: unexpected apiVersion {av}"


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def check_picker(objs: list[dict[str, Any]], *, standalone: bool = False, ha: bool = False) -> None:
    """The picker's pieces fit together and match what discovery and the gateway need."""
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    c = spec["containers"][0]
    args = c["args"]
    assert args[0] == "serve"
    # HA: a standby is never ready, so only Recreate can roll; one picker: the new one is ready
    # before the old one drains (never zero pickers during a restart)
    if ha:
        assert dep["spec"]["strategy"] == {"type": "Recreate"}
    else:
        assert dep["spec"]["strategy"] == {"type": "RollingUpdate",
                                           "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    # SIGTERM drains for --shutdown-grace after the preStop sleep; the kubelet must not SIGKILL first
    grace = float(next((a.split("=")[1].rstrip("s") for a in args if a.startswith("--shutdown-grace=")),
                       SHUTDOWN_GRACE_DEFAULT))
    assert spec["terminationGracePeriodSeconds"] >= c["lifecycle"]["preStop"]["sleep"]["seconds"] + grace + 5
    assert {p["containerPort"] for p in c["ports"]} >= {9002, 9003, 9090}
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert "--log-format=json" in args
    assert {e["name"] for e in c["env"]} >= {"NAMESPACE", "POD_NAME"}
    cfg_arg = next(a for a in args if a.startswith("--config-file="))
    mount = next(m for m in c["volumeMounts"] if cfg_arg.split("=", 1)[1].startswith(m["mountPath"] + "/"))
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    cm = next(o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == vol["configMap"]["name"])
    cfg_file = cfg_arg.rsplit("/", 1)[1]
    assert cfg_file in cm["data"], f"{cfg_file} not in ConfigMap {cm['metadata']['name']}"
    cfg = yaml.safe_load(cm["data"][cfg_file])
    assert cfg["kind"] == "EndpointPickerConfig"

    sa = one(objs, "ServiceAccount")
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    svc = one(objs, "Service")
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc-ext-proc"]["appProtocol"] == "http2"
    assert "http-metrics" in ports and ports["http-metrics"]["port"] == 9090

    roles = {r["metadata"]["name"]: r for r in by_kind(objs, "Role")}
    granted: set[tuple[str, str]] = set()
    for rb in by_kind(objs, "RoleBinding"):
        assert rb["roleRef"]["name"] in roles
        assert any(s["name"] == sa["metadata"]["name"] for s in rb["subjects"])
        for rule in roles[rb["roleRef"]["name"]]["rules"]:
            if {"get", "list", "watch"} <= set(rule["verbs"]):
                granted |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    needed = {("", "pods"), ("inference.networking.k8s.io", "inferencepools"),
              ("inference.networking.x-k8s.io", "inferenceobjectives"),
              ("inference.networking.x-k8s.io", "inferencemodelrewrites"),
              ("inference.networking.x-k8s.io", "inferencemodels")}
    assert needed <= granted, needed - granted
    assert ("--ha-enable-leader-election" in args) == ha
    parser = argparse.ArgumentParser(exit_on_error=False)
    serve_cli.add_arguments(parser)
    parsed, unknown = parser.parse_known_args(args[1:])  # every flag is one `epp serve` knows
    assert not unknown, f"flags epp serve does not know: {unknown}"
    assert parsed.ha_enable_leader_election == ha
    if ha:
        assert dep["spec"]["replicas"] > 1
        assert ("coordination.k8s.io", "leases") in granted
        lease_verbs = {v for rb in by_kind(objs, "RoleBinding")
                       for rule in roles[rb["roleRef"]["name"]]["rules"]
                       if "coordination.k8s.io" in rule["apiGroups"] and "leases" in rule["resources"]
                       for v in rule["verbs"]}
        assert {"get", "create", "update"} <= lease_verbs  # what epp.discovery.leader calls

    pools = by_kind(objs, "InferencePool")
    if standalone:
        assert not pools
        assert any(a.startswith("--endpoint-selector=") for a in args)
        assert any(a.startswith("--endpoint-target-ports=") for a in args)
        return
    pool = one(objs, "InferencePool")
    assert f"--pool-name={pool['metadata']['name']}" in args
    group = pool["apiVersion"].rpartition("/")[0]
    assert f"--pool-group={group}" in args or (group == "inference.networking.k8s.io"
                                              and not any(a.startswith("--pool-group") for a in args))
    ref = pool["spec"].get("endpointPickerRef") or pool["spec"].get("extensionRef")
    assert ref["name"] == svc["metadata"]["name"]
    port = ref.get("port", {}).get("number") or ref.get("portNumber")
    assert port == ports["grpc-ext-proc"]["port"]
    for route in by_kind(objs, "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            for b in rule["backendRefs"]:
                assert (b["group"], b["kind"], b["name"]) == (group, "InferencePool", pool["metadata"]["name"])
        gw_names = {g["metadata"]["name"] for g in by_kind(objs, "Gateway")}
        if gw_names:
            assert {p["name"] for p in route["spec"]["parentRefs"]} <= gw_names


def test_crds_are_valid_and_complete() -> None:
    objs = [yaml.safe_load(f.read_text()) for f in sorted((MANIFESTS / "crds").glob("*_*.yaml"))]
    validate_objects(objs, "crds")
    assert set(CRD_SCHEMAS) == {
        ("inference.networking.k8s.io", "v1", "InferencePool"),
        ("inference.networking.x-k8s.io", "v1alpha2", "InferencePool"),
        ("inference.networking.x-k8s.io", "v1alpha2", "InferenceObjective"),
        ("inference.networking.x-k8s.io", "v1alpha2", "InferenceModelRewrite"),
        ("inference.networking.x-k8s.io", "v1alpha2", "InferenceModel"),
    }


def test_crd_schemas_reject_bad_objects() -> None:
    """The schemas carry the API's rules: a sample of what must fail."""
    import jsonschema

    from tests.k8s.fakeapi import inference_model, objective, pool, rewrite

    def rejects(obj: dict[str, Any]) -> bool:
        group, _, version = obj["apiVersion"].rpartition("/")
        try:
            jsonschema.validate(obj, strict_json_schema(CRD_SCHEMAS[(group, version, obj["kind"])]))
        except jsonschema.ValidationError:
            return True
        return False

    good = [pool("p", {"a": "b"}, [8000, 8001]), pool("p", {"a": "b"}, [8000], legacy=True),
            objective("o", "p", -1), rewrite("r", "p", [(["m"], [("t", 5)]), ([], [("u", 1)])]),
            inference_model("m", "p", "llama", "Critical", [("llama-v2", 100)])]
    for obj in good:
        assert not rejects(obj), obj
    bad_pool_ports = pool("p", {"a": "b"}, range(8000, 8009))  # 9 > maxItems 8
    no_labels = pool("p", {}, [8000])
    bad_mode = copy.deepcopy(good[0])
    bad_mode["spec"]["endpointPickerRef"]["failureMode"] = "Sometimes"
    typo = copy.deepcopy(good[0])
    typo["spec"]["targetPort"] = [{"number": 1}]
    bad_weight = rewrite("r", "p", [(["m"], [("t", 0)])])
    no_targets = rewrite("r", "p", [(["m"], [])])
    bad_crit = inference_model("m", "p", "llama", "VeryImportant")
    eleven = inference_model("m", "p", "llama", None, [(f"t{i}", 1) for i in range(11)])
    no_ref = objective("o", "p")
    del no_ref["spec"]["poolRef"]
    for obj in (bad_pool_ports, no_labels, bad_mode, typo, bad_weight, no_targets, bad_crit, eleven, no_ref):
        assert rejects(obj), obj


@needs_kubectl
def test_crds_kustomization() -> None:
    objs = kustomize("crds")
    assert len(by_kind(objs, "CustomResourceDefinition")) == 5
    validate_objects(objs, "crds")


@needs_kubectl
@pytest.mark.parametrize("rel", KUSTOMIZE_DIRS)
def test_kustomize_variant(rel: str) -> None:
    objs = kustomize(rel)
    validate_objects(objs, rel)
    if rel.startswith("examples/"):
        dep = one(objs, "Deployment")
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert dep["spec"]["template"]["metadata"]["labels"]["app"] == "vllm"  # the base pool's selector
        assert 8000 in {p["containerPort"] for p in c["ports"]}
        if rel == "examples/vllm":
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert "--enable-prefix-caching" in c["args"]
            assert any(a.startswith("--kv-events-config=") for a in c["args"])
        else:
            assert c["args"][0] == "sim" and c["image"].startswith("ghcr.io/epp-project/epp:")
        return
    name = rel.rpartition("/")[2]
    check_picker(objs, standalone=name == "standalone", ha=name == "ha")
    if name in ("envoy-gateway", "envoy-gateway-patch-policy", "kgateway", "agentgateway", "istio"):
        gw = one(objs, "Gateway")
        assert gw["spec"]["gatewayClassName"] == {"envoy-gateway": "eg", "envoy-gateway-patch-policy": "eg"}.get(
            name, name)
        one(objs, "HTTPRoute")
    if name == "istio":
        dr = one(objs, "DestinationRule")
        assert dr["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}
        assert dr["spec"]["host"] == one(objs, "Service")["metadata"]["name"]
    if name == "envoy-gateway-patch-policy":
        check_patch_policy(objs, "default")
        assert "--secure-serving=false" in one(objs, "Deployment")["spec"]["template"]["spec"][
            "containers"][0]["args"]
    if name == "legacy-v1alpha2":
        assert one(objs, "InferencePool")["apiVersion"] == "inference.networking.x-k8s.io/v1alpha2"


def check_patch_policy(objs: list[dict[str, Any]], namespace: str) -> None:
    ext = one(objs, "EnvoyExtensionPolicy")
    svc = one(objs, "Service")
    ref = ext["spec"]["extProc"][0]["backendRefs"][0]
    assert (ref["kind"], ref["name"], ref["port"]) == ("Service", svc["metadata"]["name"], 9002)
    assert ext["spec"]["extProc"][0]["processingMode"]["request"]["body"] == "FullDuplexStreamed"
    route = one(objs, "HTTPRoute")
    assert ext["spec"]["targetRefs"][0]["name"] == route["metadata"]["name"]
    patch = one(objs, "EnvoyPatchPolicy")
    cluster, rc = patch["spec"]["jsonPatches"]
    value = cluster["operation"]["value"]
    assert value["type"] == "ORIGINAL_DST" and value["lb_policy"] == "CLUSTER_PROVIDED"
    assert value["original_dst_lb_config"] == {"use_http_header": True,
                                               "http_header_name": "x-gateway-destination-endpoint"}
    gw = one(objs, "Gateway") if by_kind(objs, "Gateway") else None
    gw_name = patch["spec"]["targetRef"]["name"]
    if gw is not None:
        assert gw_name == gw["metadata"]["name"]
        listener = gw["spec"]["listeners"][0]["name"]
        assert rc["name"] == f"{namespace}/{gw_name}/{listener}"
    assert rc["operation"]["value"] == cluster["name"]


# ---- Helm ----

HELM_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "istio": {"provider": {"name": "istio"}, "experimentalHttpRoute": {"enabled": True}},
    "envoy-gateway": {"provider": {"name": "envoy-gateway"}, "experimentalHttpRoute": {"enabled": True}},
    "envoy-gateway-patch-policy": {"provider": {"name": "envoy-gateway-patch-policy"},
                                   "inferenceExtension": {"secureServing": False},
                                   "experimentalHttpRoute": {"enabled": True}},
    "kgateway": {"provider": {"name": "kgateway"}, "experimentalHttpRoute": {"enabled": True}},
    "agentgateway": {"provider": {"name": "agentgateway"}, "experimentalHttpRoute": {"enabled": True},
                     "inferenceExtension": {"secureServing": False}},
    "ha": {"inferenceExtension": {"replicas": 2}},
    "standalone": {"inferencePool": {"standalone": True, "targetPorts": [{"number": 8000}, {"number": 8001}]}},
    "legacy": {"inferencePool": {"apiVersion": "inference.networking.x-k8s.io/v1alpha2"},
               "experimentalHttpRoute": {"enabled": True}},
    "objectives-dp-h2c": {"inferencePool": {"targetPorts": [{"number": 8000}, {"number": 8001}],
                                            "appProtocol": "kubernetes.io/h2c"},
                          "inferenceObjectives": [{"name": "premium", "priority": 10},
                                                  {"name": "batch", "priority": -1}, {"name": "plain"}],
                          "inferenceExtension": {"flags": {"refresh-metrics-interval": "100ms"},
                                                 "pluginsConfigFile": "custom.yaml",
                                                 "pluginsCustomConfig": {"custom.yaml": (
                                                     "apiVersion: inference.networking.x-k8s.io/v1alpha1\n"
                                                     "kind: EndpointPickerConfig\n"
                                                     "plugins:\n- type: queue-scorer\n")}}},
}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def helm_render(values: dict[str, Any], name: str = "qwen", namespace: str = "llm") -> list[dict[str, Any]]:
    hp = pytest.importorskip("helm_python", reason="helm-python-sdk not installed")
    base = {"inferencePool": {"modelServers": {"matchLabels": {"app": "vllm-qwen"}}}}
    rendered = hp.Chart.load(str(CHART)).render(_merge(base, values), name=name, namespace=namespace)
    objs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            objs += [d for d in yaml.safe_load_all(text) if d]
    return objs


@pytest.mark.parametrize("variant", sorted(HELM_VARIANTS))
def test_helm_variant(variant: str) -> None:
    objs = helm_render(HELM_VARIANTS[variant])
    validate_objects(objs, f"helm {variant}")
    assert all(o["metadata"].get("namespace") == "llm" for o in objs
               if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"))  # cluster-scoped: metrics auth RBAC
    check_picker(objs, standalone=variant == "standalone", ha=variant == "ha")
    args = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    if variant == "standalone":
        assert "--endpoint-selector=app=vllm-qwen" in args and "--endpoint-target-ports=8000,8001" in args
        return
    pool = one(objs, "InferencePool")
    assert pool["metadata"]["name"] == "qwen" and "--pool-namespace=llm" in args
    assert bool(by_kind(objs, "DestinationRule")) == (variant == "istio")
    assert bool(by_kind(objs, "EnvoyPatchPolicy")) == (variant == "envoy-gateway-patch-policy")
    if variant == "istio":
        dr = one(objs, "DestinationRule")
        assert dr["spec"]["host"] == "qwen-epp.llm.svc.cluster.local"
        assert dr["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}
    if variant == "envoy-gateway-patch-policy":
        check_patch_policy(objs, "llm")
    if variant == "legacy":
        assert pool["apiVersion"] == "inference.networking.x-k8s.io/v1alpha2"
        assert "--pool-group=inference.networking.x-k8s.io" in args
    if variant == "objectives-dp-h2c":
        assert {o["metadata"]["name"]: o["spec"].get("priority") for o in by_kind(objs, "InferenceObjective")} \
            == {"premium": 10, "batch": -1, "plain": None}
        assert pool["spec"]["appProtocol"] == "kubernetes.io/h2c"
        assert [p["number"] for p in pool["spec"]["targetPorts"]] == [8000, 8001]
        assert "--refresh-metrics-interval=100ms" in args and "--config-file=/config/custom.yaml" in args


def test_helm_lint_and_required_values() -> None:
    hp = pytest.importorskip("helm_python", reason="helm-python-sdk not installed")
    result = hp.lint(str(CHART), {"inferencePool": {"modelServers": {"matchLabels": {"app": "x"}}}})
    assert result["errors"] == [], result
    assert not [m for m in result["messages"] if m["severity"] > 1], result["messages"]
    with pytest.raises(hp.HelmError, match="matchLabels"):
        hp.Chart.load(str(CHART)).render({}, name="x", namespace="y")


def test_picker_config_loads() -> None:
    """The EndpointPickerConfig we ship in the base ConfigMap is accepted by the picker."""
    loader = pytest.importorskip("epp.config.loader")
    text = (MANIFESTS / "base" / "epp-config.yaml").read_text()
    try:
        loader.load_config(text)
    except loader.ConfigError as exc:
        if "unknown" in str(exc).lower() and "type" in str(exc).lower():
            pytest.skip(f"plugin not implemented yet: {exc}")
        raise


def test_keda_overlay_turns_the_scaler_on_and_exposes_it() -> None:
    objs = kustomize("keda")
    validate_objects([o for o in objs if o["kind"] != "ScaledObject"], "keda")
    check_picker([o for o in objs if o["kind"] != "ScaledObject"])  # base args kept, all known flags
    container = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    parser = argparse.ArgumentParser(exit_on_error=False)
    serve_cli.add_arguments(parser)
    parsed, _ = parser.parse_known_args(container["args"][1:])
    assert parsed.keda_scaler_port == 9004 and parsed.pool_name  # scaler on, pool flags intact
    assert {"name": "keda-scaler", "containerPort": 9004, "protocol": "TCP"} in container["ports"]
    assert any(p["port"] == 9004 for p in one(objs, "Service")["spec"]["ports"])
    scaled = one(objs, "ScaledObject")
    assert scaled["spec"]["triggers"][0]["metadata"]["scalerAddress"].endswith(":9004")
