"""Every CRD we ship is one a real kube-apiserver accepts (see tests/k8s/crdcheck.py for what that means).

The mutation tests prove each check can fail: a CRD stripped of its approval annotation, a schema
node without a type, a map list whose key is optional, a CEL rule that does not compile, ...
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.crdcheck import (
    APPROVAL_ANNOTATION,
    apply_defaults,
    approval_problems,
    crd_problems,
    failing_rules,
    is_protected_group,
)

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"


def shipped_crds() -> dict[str, dict[str, Any]]:
    """Every CRD in a plain YAML file under manifests/ (kustomize dirs, a chart's crds/ folder)."""
    found: dict[str, dict[str, Any]] = {}
    for f in sorted(MANIFESTS.rglob("*.yaml")):
        if "templates" in f.relative_to(MANIFESTS).parts:
            continue  # Helm templates are not YAML until rendered; charts ship CRDs in crds/
        for i, doc in enumerate(yaml.safe_load_all(f.read_text())):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                found[f"{f.relative_to(MANIFESTS)}#{i}"] = doc
    return found


CRDS = shipped_crds()


def crd_file(name: str) -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load((MANIFESTS / "crds" / name).read_text()))


V1_POOL = "inference.networking.k8s.io_inferencepools.yaml"
REWRITES = "inference.networking.x-k8s.io_inferencemodelrewrites.yaml"
MODELS = "inference.networking.x-k8s.io_inferencemodels.yaml"


def v1_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_all_crds_are_found() -> None:
    assert len(CRDS) == 5, sorted(CRDS)
    assert any(is_protected_group(c["spec"]["group"]) for c in CRDS.values())


@pytest.mark.parametrize("where", sorted(CRDS))
def test_crd_is_accepted_by_an_api_server(where: str) -> None:
    pytest.importorskip("cel", reason="common-expression-language not installed")
    problems = crd_problems(CRDS[where])
    assert not problems, "\n".join(problems)


def test_chart_crds_if_any_are_the_kustomize_ones() -> None:
    """A chart that ships CRDs (crds/) must ship the same ones as manifests/crds."""
    chart_crds = {c["metadata"]["name"]: c for w, c in CRDS.items() if w.startswith("charts/")}
    ours = {c["metadata"]["name"]: c for w, c in CRDS.items() if w.startswith("crds/")}
    for name, crd in chart_crds.items():
        assert crd["spec"] == ours[name]["spec"], name
        assert crd["metadata"].get("annotations") == ours[name]["metadata"].get("annotations"), name


# ---- the approval annotation ----

@pytest.mark.parametrize(("group", "protected"), [
    ("inference.networking.k8s.io", True), ("k8s.io", True), ("apps.kubernetes.io", True),
    ("inference.networking.x-k8s.io", False), ("gateway.envoyproxy.io", False), ("notk8s.io", False),
])
def test_protected_groups(group: str, protected: bool) -> None:
    assert is_protected_group(group) == protected


def test_crd_without_the_approval_annotation_is_rejected() -> None:
    crd = crd_file(V1_POOL)
    assert approval_problems(crd) == []
    del crd["metadata"]["annotations"][APPROVAL_ANNOTATION]
    problems = crd_problems(crd, cel=False)
    assert any("protected groups must have approval annotation" in p for p in problems), problems
    crd["metadata"].pop("annotations")
    assert approval_problems(crd)


@pytest.mark.parametrize(("value", "ok"), [
    ("https://github.com/kubernetes-sigs/gateway-api-inference-extension/pull/1173", True),
    ("unapproved, experimental-only", True),
    ("approved", False), ("github.com/x/y/pull/1", False), ("", False),
])
def test_approval_annotation_values(value: str, ok: bool) -> None:
    crd = crd_file(V1_POOL)
    crd["metadata"]["annotations"][APPROVAL_ANNOTATION] = value
    assert (approval_problems(crd) == []) == ok


def test_unprotected_groups_need_no_annotation() -> None:
    crd = crd_file(REWRITES)
    assert "annotations" not in crd["metadata"]
    assert approval_problems(crd) == []


# ---- every other check can fail ----

def _props(crd: dict[str, Any], *path: str) -> dict[str, Any]:
    node = v1_schema(crd)
    for p in path:
        node = node["properties"][p] if p != "items" else node["items"]
    return node


def _two_storage(c: dict[str, Any]) -> None:
    c["spec"]["versions"].append({**copy.deepcopy(c["spec"]["versions"][0]), "name": "v2"})


def _no_storage(c: dict[str, Any]) -> None:
    c["spec"]["versions"][0]["storage"] = False


def _untyped(c: dict[str, Any]) -> None:
    del _props(c, "spec", "appProtocol")["type"]


def _both_props(c: dict[str, Any]) -> None:
    _props(c, "spec")["additionalProperties"] = {"type": "string"}


def _additional_false(c: dict[str, Any]) -> None:
    _props(c, "spec", "selector", "matchLabels")["additionalProperties"] = False


def _metadata_constraint(c: dict[str, Any]) -> None:
    _props(c, "metadata")["properties"] = {"labels": {"type": "object"}}


def _metadata_name_default(c: dict[str, Any]) -> None:
    _props(c, "metadata")["properties"] = {"name": {"type": "string", "default": "x"}}


def _map_without_keys(c: dict[str, Any]) -> None:
    _props(c, "spec", "targetPorts")["x-kubernetes-list-type"] = "map"


def _map_optional_key(c: dict[str, Any]) -> None:
    tp = _props(c, "spec", "targetPorts")
    tp.update({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["number"]})
    tp["items"]["required"] = []


def _map_unknown_key(c: dict[str, Any]) -> None:
    _props(c, "spec", "targetPorts").update({"x-kubernetes-list-type": "map",
                                              "x-kubernetes-list-map-keys": ["port"]})


def _keys_without_map(c: dict[str, Any]) -> None:
    _props(c, "spec", "targetPorts")["x-kubernetes-list-map-keys"] = ["number"]


def _bad_enum_default(c: dict[str, Any]) -> None:
    _props(c, "spec", "appProtocol")["default"] = "grpc"


def _bad_type_default(c: dict[str, Any]) -> None:
    _props(c, "spec", "endpointPickerRef", "port", "number")["default"] = "9002"


def _pruned_default(c: dict[str, Any]) -> None:
    _props(c, "spec", "endpointPickerRef", "port")["default"] = {"number": 9002, "nmuber": 1}


def _unique_items(c: dict[str, Any]) -> None:
    _props(c, "spec", "targetPorts")["uniqueItems"] = True


def _no_items(c: dict[str, Any]) -> None:
    del _props(c, "spec", "targetPorts")["items"]


def _ref(c: dict[str, Any]) -> None:
    _props(c, "spec")["properties"]["other"] = {"$ref": "#/definitions/x"}


def _type_in_anyof(c: dict[str, Any]) -> None:
    _props(c, "spec", "appProtocol")["anyOf"] = [{"type": "string"}]


def _cel_syntax(c: dict[str, Any]) -> None:
    _props(c, "spec", "targetPorts")["x-kubernetes-validations"][0]["rule"] = "self.all(p, p.number >)"


def _cel_unknown_field(c: dict[str, Any]) -> None:
    _props(c, "spec", "endpointPickerRef")["x-kubernetes-validations"][0]["rule"] = "has(self.prot)"


def _cel_unknown_variable(c: dict[str, Any]) -> None:
    _props(c, "spec", "targetPorts")["x-kubernetes-validations"][0]["rule"] = "self.size() <= maxPorts"


def _cel_unknown_function(c: dict[str, Any]) -> None:
    _props(c, "spec", "targetPorts")["x-kubernetes-validations"][0]["rule"] = "self.distinct().size() > 0"


def _cel_old_self_in_atomic_list(c: dict[str, Any]) -> None:
    _props(c, "spec", "targetPorts", "items")["x-kubernetes-validations"] = [{"rule": "self == oldSelf"}]


def _cel_bad_message_expression(c: dict[str, Any]) -> None:
    _props(c, "spec", "targetPorts")["x-kubernetes-validations"][0]["messageExpression"] = "'ports: ' +"


def _cel_bad_reason(c: dict[str, Any]) -> None:
    _props(c, "spec", "targetPorts")["x-kubernetes-validations"][0]["reason"] = "Nope"


def _bad_printer_column(c: dict[str, Any]) -> None:
    c["spec"]["versions"][0]["additionalPrinterColumns"][0]["type"] = "int"


def _bad_name(c: dict[str, Any]) -> None:
    c["metadata"]["name"] = "pools.inference.networking.k8s.io"


def _non_object_root(c: dict[str, Any]) -> None:
    del v1_schema(c)["type"]


MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "two storage versions": (_two_storage, "exactly one version marked as storage"),
    "no storage version": (_no_storage, "exactly one version marked as storage"),
    "node without type": (_untyped, "properties[appProtocol].type: Required value"),
    "additionalProperties with properties": (_both_props, "mutual exclusive"),
    "additionalProperties false": (_additional_false, "cannot be set to false"),
    "metadata labels restricted": (_metadata_constraint, "only name and generateName"),
    "metadata name defaulted": (_metadata_name_default, "only string restrictions"),
    "map list without keys": (_map_without_keys, "must not be empty if x-kubernetes-list-type is map"),
    "map key neither required nor defaulted": (_map_optional_key, "must be required or have a default"),
    "map key not an item field": (_map_unknown_key, "names of item properties"),
    "map keys on a non-map list": (_keys_without_map, "only be used with x-kubernetes-list-type map"),
    "default outside the enum": (_bad_enum_default, "default: Invalid value 'grpc'"),
    "default of the wrong type": (_bad_type_default, "default: Invalid value '9002'"),
    "default with a pruned field": (_pruned_default, "nmuber"),
    "uniqueItems": (_unique_items, "uniqueItems cannot be set to true"),
    "array without items": (_no_items, "must be specified for arrays"),
    "$ref": (_ref, "$ref: Forbidden"),
    "type inside anyOf": (_type_in_anyof, "anyOf[0].type: Forbidden"),
    "CEL syntax error": (_cel_syntax, "compilation failed"),
    "CEL unknown field": (_cel_unknown_field, "undefined field 'prot'"),
    "CEL unknown variable": (_cel_unknown_variable, "undeclared reference to ['maxPorts']"),
    "CEL unknown function": (_cel_unknown_function, "undeclared function(s) ['distinct']"),
    "CEL oldSelf in atomic list items": (_cel_old_self_in_atomic_list, "uncorrelatable"),
    "CEL bad messageExpression": (_cel_bad_message_expression, "messageExpression: compilation failed"),
    "CEL bad reason": (_cel_bad_reason, "reason: Unsupported value"),
    "printer column type": (_bad_printer_column, "additionalPrinterColumns[0].type"),
    "name not plural.group": (_bad_name, 'must be spec.names.plural+"."+spec.group'),
    "root without type object": (_non_object_root, "must be object at the root"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_broken_crd_is_rejected(mutation: str) -> None:
    pytest.importorskip("cel", reason="common-expression-language not installed")
    mutate, expected = MUTATIONS[mutation]
    crd = crd_file(V1_POOL)
    assert crd_problems(crd) == []
    mutate(crd)
    problems = crd_problems(crd)
    assert any(expected in p for p in problems), f"{mutation}: expected {expected!r} in {problems}"


def test_transition_rule_on_a_scalar_field_is_allowed() -> None:
    """InferenceModel's immutable modelName (self == oldSelf) is correlatable: it sits under objects only."""
    pytest.importorskip("cel", reason="common-expression-language not installed")
    crd = crd_file(MODELS)
    assert "oldSelf" in str(_props(crd, "spec", "modelName")["x-kubernetes-validations"])
    assert crd_problems(crd) == []


# ---- the CEL rules do what their messages say ----

def _schema_for(obj: dict[str, Any]) -> dict[str, Any]:
    group, _, version = obj["apiVersion"].rpartition("/")
    for crd in CRDS.values():
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == obj["kind"]:
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    schema: dict[str, Any] = v["schema"]["openAPIV3Schema"]
                    return schema
    raise AssertionError(f"no CRD for {obj['apiVersion']} {obj['kind']}")


def rule_failures(obj: dict[str, Any]) -> list[str]:
    schema = _schema_for(obj)
    return failing_rules(apply_defaults(obj, schema), schema)


def test_cel_rules_accept_valid_objects_and_reject_bad_ones() -> None:
    pytest.importorskip("cel", reason="common-expression-language not installed")
    from tests.k8s.fakeapi import inference_model, objective, pool, rewrite

    for obj in (pool("p", {"a": "b"}, [8000, 8001]), pool("p", {"a": "b"}, [8000], legacy=True),
                objective("o", "p", -1), rewrite("r", "p", [(["m"], [("t", 5)])]),
                inference_model("m", "p", "llama", "Critical", [("a", 1), ("b", 2)])):
        assert rule_failures(obj) == [], obj

    dup_ports = pool("p", {"a": "b"}, [8000, 8000])
    assert rule_failures(dup_ports) == [".spec.targetPorts: port numbers must be unique"]
    no_port = pool("p", {"a": "b"}, [8000])
    del no_port["spec"]["endpointPickerRef"]["port"]  # kind defaults to Service, which needs a port
    assert rule_failures(no_port) == [".spec.endpointPickerRef: port is required when kind is Service (the default)"]
    no_port["spec"]["endpointPickerRef"]["kind"] = "Backend"
    assert rule_failures(no_port) == []
    mixed = inference_model("m", "p", "llama", None, [("a", 1)])
    mixed["spec"]["targetModels"].append({"name": "b"})
    assert rule_failures(mixed) == [".spec.targetModels: set weights on all targetModels or on none"]
