"""Pure translation of Kubernetes objects (plain JSON dicts) into datastore values.

Kept free of I/O and threads so every rule (pod eligibility, ranks per target port, the
active-ports annotation, rewrite precedence, legacy criticality) is testable on literals and
so the watcher code in :mod:`epp.discovery.kubernetes` only moves dicts around.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from epp.datalayer.datastore import Objective, RewriteRule, RewriteTarget
from epp.framework.datalayer import Endpoint

log = logging.getLogger(__name__)

#: InferencePool API groups and the version we read of each.
POOL_GROUP = "inference.networking.k8s.io"
LEGACY_POOL_GROUP = "inference.networking.x-k8s.io"
POOL_VERSIONS: dict[str, str] = {POOL_GROUP: "v1", LEGACY_POOL_GROUP: "v1alpha2"}
POOL_PLURAL = "inferencepools"

#: InferenceObjective / InferenceModelRewrite / legacy InferenceModel live here.
X_GROUP = "inference.networking.x-k8s.io"
X_VERSION = "v1alpha2"

ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"

#: Legacy InferenceModel criticality -> priority. Higher is served first; negative means
#: sheddable (dropped with 429 when the pool is saturated), matching InferenceObjective's
#: "priority < 0 is sheddable" rule. Critical sits well above the default 0 so an explicit
#: InferenceObjective can still be placed between Standard and Critical.
CRITICALITY_PRIORITY: dict[str, int] = {"Critical": 100, "Standard": 0, "Sheddable": -1}

MAX_TARGET_PORTS = 8


# ---------------------------------------------------------------------------------------------
# flag helpers (the runner calls these)
# ---------------------------------------------------------------------------------------------
def parse_endpoint_selector(value: str) -> dict[str, str]:
    """Parse ``--endpoint-selector`` (``k=v,k2=v2``) into a label map.

    Only equality matches are allowed (the pool selector is ``matchLabels``); errors name the
    offending part so a typo fails at start.
    """
    if value is None or not value.strip():
        raise ValueError("--endpoint-selector is empty; expected key=value[,key=value...]")
    labels: dict[str, str] = {}
    for raw in value.split(","):
        part = raw.strip()
        if not part:
            raise ValueError(f"--endpoint-selector {value!r}: empty entry")
        if "!=" in part or part.startswith("!") or " in " in part or " notin " in part:
            raise ValueError(
                f"--endpoint-selector {value!r}: only key=value matches are supported, got {part!r}")
        key, sep, val = part.partition("==" if "==" in part else "=")
        key, val = key.strip(), val.strip()
        if not sep or not key:
            raise ValueError(f"--endpoint-selector {value!r}: {part!r} is not key=value")
        if key in labels and labels[key] != val:
            raise ValueError(f"--endpoint-selector {value!r}: label {key!r} given twice")
        labels[key] = val
    return labels


def parse_target_ports(value: str | Iterable[int | str]) -> list[int]:
    """Parse ``--endpoint-target-ports`` (``8000,8001`` or a list): 1-8 unique ports."""
    parts: list[int | str] = (
        [p for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
    )
    ports: list[int] = []
    for p in parts:
        try:
            port = int(str(p).strip())
        except ValueError:
            raise ValueError(f"--endpoint-target-ports: {p!r} is not a port number") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"--endpoint-target-ports: {port} is out of range 1-65535")
        if port in ports:
            raise ValueError(f"--endpoint-target-ports: {port} given twice")
        ports.append(port)
    if not 1 <= len(ports) <= MAX_TARGET_PORTS:
        raise ValueError(f"--endpoint-target-ports: need 1-{MAX_TARGET_PORTS} ports, got {len(ports)}")
    return ports


def default_pool_namespace(flag: str | None = None) -> str:
    """``--pool-namespace``, else env ``NAMESPACE`` (downward API), else ``default`` (as GIE)."""
    return flag or os.environ.get("NAMESPACE") or "default"


def standalone_pool_name(pod_name: str | None = None) -> str:
    """The synthetic pool's name in selector mode: the picker's Deployment name.

    GIE derives it from env ``POD_NAME`` (``<deployment>-<rs-hash>-<pod-hash>``): drop the two
    generated suffixes. Without ``POD_NAME`` the pool is called ``standalone``.
    """
    name = pod_name if pod_name is not None else os.environ.get("POD_NAME", "")
    if not name:
        return "standalone"
    parts = name.split("-")
    return "-".join(parts[:-2]) if len(parts) >= 3 else name


def label_selector_string(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# ---------------------------------------------------------------------------------------------
# object helpers
# ---------------------------------------------------------------------------------------------
def meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def object_key(obj: Mapping[str, Any]) -> str:
    m = meta(obj)
    return str(m.get("uid") or f"{m.get('namespace', '')}/{m.get('name', '')}")


def created_at(obj: Mapping[str, Any]) -> float:
    """creationTimestamp as epoch seconds (0 when absent or unparsable: sorts first)."""
    ts = meta(obj).get("creationTimestamp")
    if not ts:
        return 0.0
    try:
        return datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _age_key(obj: Mapping[str, Any]) -> tuple[float, str]:
    return created_at(obj), str(meta(obj).get("name", ""))


@dataclass(slots=True, frozen=True)
class PoolSpec:
    """The part of an InferencePool the picker acts on."""

    selector: Mapping[str, str]
    target_ports: tuple[int, ...]
    app_protocol: str = "http"


def pool_spec(obj: Mapping[str, Any], group: str = POOL_GROUP) -> PoolSpec:
    """Read either shape: v1 (``selector.matchLabels``, ``targetPorts[].number``) or legacy
    v1alpha2 (flat ``selector`` map, single ``targetPortNumber``)."""
    spec = obj.get("spec") or {}
    sel = spec.get("selector") or {}
    if group == LEGACY_POOL_GROUP or "targetPortNumber" in spec:
        labels = sel.get("matchLabels", sel) if isinstance(sel.get("matchLabels"), dict) else sel
        port = spec.get("targetPortNumber")
        ports: tuple[int, ...] = (int(port),) if port else ()
    else:
        labels = sel.get("matchLabels") or {}
        ports = tuple(int(p["number"]) for p in spec.get("targetPorts") or [] if p.get("number"))
    return PoolSpec(
        selector={str(k): str(v) for k, v in labels.items()},
        target_ports=ports,
        app_protocol=str(spec.get("appProtocol") or "http"),
    )


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """Eligible as GIE defines it: Ready=True, not being deleted, has an IP."""
    if meta(pod).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def active_ports(pod: Mapping[str, Any], target_ports: tuple[int, ...]) -> list[tuple[int, int]]:
    """(rank, port) pairs served by this pod.

    The rank is the port's index in ``targetPorts`` whatever the annotation says, so an
    endpoint keeps its name when other ranks come and go. The annotation
    ``inference.networking.k8s.io/active-ports`` (comma list) limits the ranks; unknown or
    malformed entries are ignored.
    """
    ann = (meta(pod).get("annotations") or {}).get(ACTIVE_PORTS_ANNOTATION)
    ranks = list(enumerate(target_ports))
    if ann is None:
        return ranks
    wanted: set[int] = set()
    for part in str(ann).split(","):
        part = part.strip()
        if part.isdigit():
            wanted.add(int(part))
        elif part:
            log.debug("ignoring bad %s entry %r on pod %s", ACTIVE_PORTS_ANNOTATION, part,
                      meta(pod).get("name"))
    return [(i, p) for i, p in ranks if p in wanted]


def pod_endpoints(pod: Mapping[str, Any], spec: PoolSpec) -> list[Endpoint]:
    """One endpoint per active target port of a ready pod matching the selector."""
    m = meta(pod)
    if not pod_is_ready(pod) or not selector_matches(spec.selector, m.get("labels")):
        return []
    ip = str(pod["status"]["podIP"])
    name = str(m.get("name", ""))
    labels = {str(k): str(v) for k, v in (m.get("labels") or {}).items()}
    return [
        Endpoint(name=f"{name}-rank-{rank}", address=ip, port=port, labels=dict(labels))
        for rank, port in active_ports(pod, spec.target_ports)
    ]


def build_endpoints(pods: Iterable[Mapping[str, Any]], spec: PoolSpec) -> list[Endpoint]:
    """All endpoints of the pool, de-duplicated by ``ip:port`` (oldest pod wins a clash,
    which only happens transiently when a deleted pod's IP is reused)."""
    out: dict[str, Endpoint] = {}
    for pod in sorted(pods, key=_age_key):
        for ep in pod_endpoints(pod, spec):
            out.setdefault(ep.key, ep)
    return list(out.values())


def refers_to_pool(obj: Mapping[str, Any], pool_name: str) -> bool:
    ref = (obj.get("spec") or {}).get("poolRef") or {}
    return ref.get("name") == pool_name and ref.get("kind", "InferencePool") == "InferencePool"


def build_objectives(objs: Iterable[Mapping[str, Any]], pool_name: str) -> dict[str, Objective]:
    """InferenceObjectives of our pool, by metadata.name (what the objective header names)."""
    out: dict[str, Objective] = {}
    for obj in sorted(objs, key=_age_key):
        if not refers_to_pool(obj, pool_name):
            continue
        name = str(meta(obj).get("name", ""))
        prio = (obj.get("spec") or {}).get("priority")
        out[name] = Objective(name=name, priority=int(prio or 0), created=created_at(obj))
    return out


def _targets(raw: Iterable[Mapping[str, Any]], model_key: str) -> tuple[RewriteTarget, ...]:
    out = []
    for t in raw:
        model = t.get(model_key)
        if model:
            w = t.get("weight")
            out.append(RewriteTarget(model=str(model), weight=1 if w is None else int(w)))
    return tuple(out)


def build_model_semantics(
    rewrites: Iterable[Mapping[str, Any]],
    models: Iterable[Mapping[str, Any]],
    pool_name: str,
) -> tuple[tuple[RewriteRule, ...], dict[str, Objective]]:
    """Rewrite rules in precedence order, and legacy criticality by model name.

    Precedence (GIE InferenceModelRewrite): every rule with exact matches comes before every
    generic (empty ``matches``) rule; within each class the oldest resource
    (creationTimestamp, then name) first, and a resource's rules keep their order. A legacy
    InferenceModel's ``targetModels`` become an exact rule for its ``modelName`` sorted among
    the exact rules by the same age key. On a ``modelName`` clash the oldest InferenceModel
    wins (the others are ignored whole, as GIE marks them ``ModelNameInUse``).
    """
    exact: list[tuple[tuple[float, str], int, RewriteRule]] = []
    generic: list[tuple[tuple[float, str], int, RewriteRule]] = []
    for obj in rewrites:
        if not refers_to_pool(obj, pool_name):
            continue
        age = _age_key(obj)
        name = str(meta(obj).get("name", ""))
        for idx, rule in enumerate((obj.get("spec") or {}).get("rules") or []):
            matches = tuple(
                str(m["model"]["value"])
                for m in rule.get("matches") or []
                if (m.get("model") or {}).get("value") and m["model"].get("type", "Exact") == "Exact"
            )
            targets = _targets(rule.get("targets") or [], "modelRewrite")
            if not targets or (rule.get("matches") and not matches):
                # no usable target, or only unsupported match types: skipping is safer than
                # turning the rule into a generic one that would catch every model
                continue
            r = RewriteRule(source=name, matches=matches, targets=targets, created=age[0])
            (exact if matches else generic).append((age, idx, r))

    model_objectives: dict[str, Objective] = {}
    for obj in sorted(models, key=_age_key):
        if not refers_to_pool(obj, pool_name):
            continue
        spec = obj.get("spec") or {}
        model_name = spec.get("modelName")
        if not model_name or model_name in model_objectives:
            if model_name:
                log.debug("InferenceModel %s: modelName %r already claimed by an older one",
                          meta(obj).get("name"), model_name)
            continue
        crit = spec.get("criticality") or "Standard"
        model_objectives[model_name] = Objective(
            name=str(meta(obj).get("name", model_name)),
            priority=CRITICALITY_PRIORITY.get(crit, 0),
            created=created_at(obj),
        )
        targets = _targets(spec.get("targetModels") or [], "name")
        if targets:
            age = _age_key(obj)
            exact.append((age, 0, RewriteRule(source=str(meta(obj).get("name", "")),
                                                matches=(str(model_name),), targets=targets,
                                                created=age[0])))
    exact.sort(key=lambda t: (t[0], t[1]))
    generic.sort(key=lambda t: (t[0], t[1]))
    return tuple(r for _, _, r in exact) + tuple(r for _, _, r in generic), model_objectives
