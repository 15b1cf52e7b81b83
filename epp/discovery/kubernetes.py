"""Kubernetes discovery: one InferencePool (or a bare label selector) and its pods.

What is watched (all in the pool's namespace):

* the ``InferencePool`` named ``--pool-name`` (field selector on the name), v1
  (``inference.networking.k8s.io``) or the legacy v1alpha2 shape
  (``--pool-group inference.networking.x-k8s.io``);
* the ``Pod`` objects its selector matches (server-side label selector; re-listed whenever
  the selector changes);
* ``InferenceObjective``, ``InferenceModelRewrite`` and legacy ``InferenceModel``
  (``inference.networking.x-k8s.io/v1alpha2``) when those CRDs are installed and readable:
  a 404/403 (on the list, or on a watch: CRD deleted, RBAC revoked) counts as "none" and is
  retried slowly, so installing the CRDs later works and deleting them clears their objects.

In selector ("standalone") mode only pods are watched; the pool is synthetic and the CRD
watches are off, as in GIE.

Threads vs. the loop: each resource is listed/watched in its own thread
(:class:`~epp.discovery.k8s_watch.ResourceWatcher`); its reports are posted to the asyncio
loop with ``call_soon_threadsafe``, and every cache update and datastore write happens
there, because the datastore is not thread-safe.

Readiness: ``start()`` returns once the pool exists and it, its pods and the optional CRDs
have each been listed once (it waits, logging a warning, while the pool does not exist; the
runner cancels that wait on SIGTERM).
``datastore.synced`` is True only while the pool exists and its pods have been listed; a
deleted pool empties the datastore and turns it False, so readiness must follow
``datastore.synced``, not just "start() returned".

API server trouble never removes endpoints: a failing watch keeps the last known state (the
``stale`` property and a warning log say so) and resumes from its resourceVersion, or
re-lists after 410 Gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from epp.datalayer.datastore import Datastore, PoolInfo
from epp.discovery.base import Discovery
from epp.discovery.k8s_model import (
    LEGACY_POOL_GROUP,
    POOL_GROUP,
    POOL_PLURAL,
    POOL_VERSIONS,
    X_GROUP,
    X_VERSION,
    PoolSpec,
    build_endpoints,
    build_model_semantics,
    build_objectives,
    default_pool_namespace,
    label_selector_string,
    object_key,
    parse_endpoint_selector,
    parse_target_ports,
    pool_spec,
    standalone_pool_name,
)
from epp.discovery.k8s_watch import ResourceWatcher

__all__ = [
    "LEGACY_POOL_GROUP",
    "POOL_GROUP",
    "KubernetesDiscovery",
    "default_pool_namespace",
    "load_api_client",
    "parse_endpoint_selector",
    "parse_target_ports",
    "standalone_pool_name",
]

log = logging.getLogger(__name__)

_POOL, _PODS = "inferencepool", "pods"
_OBJECTIVES, _REWRITES, _MODELS = "inferenceobjectives", "inferencemodelrewrites", "inferencemodels"


def load_api_client() -> k8s_client.ApiClient:
    """In-cluster config (service account) first, then the local kubeconfig (``KUBECONFIG``,
    else ``~/.kube/config``)."""
    cfg = k8s_client.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=cfg)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(client_configuration=cfg)
    # The watchers and the leader elector retry with their own backoff; urllib3's default
    # retries would only add a WARNING line per attempt while the API server is down.
    cfg.retries = 0
    return k8s_client.ApiClient(cfg)


class KubernetesDiscovery(Discovery):
    """Discovery from the Kubernetes API (see the module docstring).

    Exactly one of ``pool_name`` / ``endpoint_selector`` must be given; ``target_ports`` is
    required with ``endpoint_selector`` and not allowed with ``pool_name``.
    """

    def __init__(
        self,
        *,
        pool_name: str | None = None,
        pool_namespace: str | None = None,
        pool_group: str = POOL_GROUP,
        endpoint_selector: Mapping[str, str] | None = None,
        target_ports: list[int] | None = None,
        api_client: k8s_client.ApiClient | None = None,
        watch_timeout: int = 300,
        backoff_max: float = 5.0,
        absent_retry: float = 30.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if bool(pool_name) == bool(endpoint_selector):
            raise ValueError("exactly one of --pool-name and --endpoint-selector is required")
        if endpoint_selector and not target_ports:
            raise ValueError("--endpoint-selector needs --endpoint-target-ports")
        if pool_name and target_ports:
            raise ValueError("--endpoint-target-ports only applies with --endpoint-selector "
                             "(the InferencePool's targetPorts are used otherwise)")
        if pool_group not in POOL_VERSIONS:
            raise ValueError(f"--pool-group {pool_group!r}: expected one of {sorted(POOL_VERSIONS)}")
        self.namespace = default_pool_namespace(pool_namespace)
        self.pool_group = pool_group
        self.standalone = bool(endpoint_selector)
        self.pool_name = pool_name or standalone_pool_name()
        self._selector = dict(endpoint_selector or {})
        self._ports = tuple(parse_target_ports(target_ports)) if target_ports else ()
        self._api_client = api_client
        self._watch_timeout = watch_timeout
        self._backoff_max = backoff_max
        self._absent_retry = absent_retry
        self._stop_timeout = stop_timeout

        self._loop: asyncio.AbstractEventLoop | None = None
        self._ds: Datastore | None = None
        self._watchers: dict[str, ResourceWatcher] = {}
        self._epochs: dict[str, int] = {}
        self._listed: set[str] = set()
        self._stale: set[str] = set()
        self._initial: asyncio.Future[None] | None = None
        self._waiting_logged = False
        # caches, touched on the loop only
        self._spec: PoolSpec | None = None
        self._pods: dict[str, dict[str, Any]] = {}
        self._crs: dict[str, dict[str, dict[str, Any]]] = {_OBJECTIVES: {}, _REWRITES: {}, _MODELS: {}}

    # ---- Discovery interface ----
    @property
    def description(self) -> str:
        if self.standalone:
            return (f"kubernetes pods {label_selector_string(self._selector)} in {self.namespace} "
                    f"ports {','.join(map(str, self._ports))}")
        return f"kubernetes InferencePool {self.namespace}/{self.pool_name} ({self.pool_group})"

    @property
    def stale(self) -> bool:
        """True while some list/watch is failing and the datastore shows the last known state."""
        return bool(self._stale)

    async def start(self, datastore: Datastore) -> None:
        self._loop = asyncio.get_running_loop()
        self._ds = datastore
        self._initial = self._loop.create_future()
        api = self._api_client or await asyncio.to_thread(load_api_client)
        self._api_client = api
        core = k8s_client.CoreV1Api(api)
        custom = k8s_client.CustomObjectsApi(api)
        ns = self.namespace

        def pods_call(**kw: Any) -> Any:
            return core.list_namespaced_pod(ns, **kw)

        def custom_call(group: str, version: str, plural: str) -> Any:
            def call(**kw: Any) -> Any:
                return custom.list_namespaced_custom_object(group, version, ns, plural, **kw)
            return call

        if self.standalone:
            self._spec = PoolSpec(selector=self._selector, target_ports=self._ports)
            datastore.pool = PoolInfo(name=self.pool_name, namespace=ns, target_ports=self._ports)
            self._add(_PODS, pods_call, {"label_selector": label_selector_string(self._selector)})
        else:
            datastore.pool = PoolInfo(name=self.pool_name, namespace=ns)
            version = POOL_VERSIONS[self.pool_group]
            self._add(_POOL, custom_call(self.pool_group, version, POOL_PLURAL),
                      {"field_selector": f"metadata.name={self.pool_name}"})
            self._add(_PODS, pods_call, None)  # idle until the pool tells us the selector
            for plural in (_OBJECTIVES, _REWRITES, _MODELS):
                self._add(plural, custom_call(X_GROUP, X_VERSION, plural), {}, optional=True)
        for w in self._watchers.values():
            w.start()
        log.info("kubernetes discovery started: %s", self.description)
        await self._initial

    async def stop(self) -> None:
        for w in self._watchers.values():
            w.stop()
        watchers = list(self._watchers.values())

        def join_all() -> list[str]:
            # one deadline for all: a thread stuck in a request cannot make stop() take
            # stop_timeout once per watched resource (they are daemon threads; exit proceeds)
            deadline = time.monotonic() + self._stop_timeout
            return [w.name for w in watchers if not w.join(max(0.0, deadline - time.monotonic()))]

        stuck = await asyncio.to_thread(join_all)
        if stuck:
            log.warning("kubernetes watch threads still running after stop: %s", stuck)
        if self._initial is not None and not self._initial.done():
            self._initial.cancel()

    # ---- plumbing ----
    def _add(self, name: str, call: Any, params: dict[str, Any] | None, optional: bool = False) -> None:
        loop = self._loop
        assert loop is not None

        def report(kind: str, payload: Any, epoch: int) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._on_report, name, kind, payload, epoch)

        self._watchers[name] = ResourceWatcher(
            name, call, report, params=params, optional=optional,
            watch_timeout=self._watch_timeout, backoff_max=self._backoff_max,
            absent_retry=self._absent_retry,
        )
        self._epochs[name] = 0

    def _on_report(self, name: str, kind: str, payload: Any, epoch: int) -> None:
        if epoch != self._epochs.get(name):
            return  # from a query we have since replaced (old pod selector)
        if kind == "stale":
            self._stale.add(name)
            return
        if kind == "fresh":
            self._stale.discard(name)
            return
        try:
            if name == _POOL:
                self._on_pool(kind, payload)
            elif name == _PODS:
                self._on_pods(kind, payload)
            else:
                self._on_cr(name, kind, payload)
        except Exception:  # one odd object must not kill discovery
            log.exception("kubernetes %s: failed to apply %s", name, kind)
        if kind in ("list", "absent"):
            self._listed.add(name)
        self._check_initial()

    def _check_initial(self) -> None:
        ds = self._ds
        assert ds is not None
        pods_ready = _PODS in self._listed and self._spec is not None
        ds.synced = pods_ready
        if self._initial is None or self._initial.done():
            return
        done = pods_ready and (self.standalone or all(
            n in self._listed for n in (_POOL, _OBJECTIVES, _REWRITES, _MODELS)))
        if done:
            self._initial.set_result(None)
            log.info("kubernetes discovery synced: %d endpoints", len(ds.endpoints()))
        elif _POOL in self._listed and self._spec is None and not self._waiting_logged:
            self._waiting_logged = True
            log.warning("InferencePool %s/%s (%s) not found; not ready until it exists",
                        self.namespace, self.pool_name, self.pool_group)

    # ---- pool ----
    def _on_pool(self, kind: str, payload: Any) -> None:
        if kind == "list":
            objs = [o for o in payload if (o.get("metadata") or {}).get("name") == self.pool_name]
            self._set_pool(objs[0] if objs else None)
        elif kind == "DELETED":
            self._set_pool(None)
        else:
            self._set_pool(payload)

    def _set_pool(self, obj: dict[str, Any] | None) -> None:
        ds = self._ds
        assert ds is not None
        if obj is None:
            if self._spec is not None:
                log.warning("InferencePool %s/%s deleted: clearing all endpoints", self.namespace,
                            self.pool_name)
            self._spec = None
            self._pods.clear()
            self._restart_pods(None)
            ds.pool = PoolInfo(name=self.pool_name, namespace=self.namespace)
            ds.clear()
            return
        spec = pool_spec(obj, self.pool_group)
        old = self._spec
        self._spec = spec
        ds.pool = PoolInfo(name=self.pool_name, namespace=self.namespace,
                           target_ports=spec.target_ports, app_protocol=spec.app_protocol)
        if old is None or dict(old.selector) != dict(spec.selector):
            log.info("InferencePool %s/%s selector %s, ports %s: (re)listing pods", self.namespace,
                     self.pool_name, label_selector_string(spec.selector), list(spec.target_ports))
            self._restart_pods({"label_selector": label_selector_string(spec.selector)})
        self._rebuild_endpoints()

    def _restart_pods(self, params: dict[str, Any] | None) -> None:
        self._listed.discard(_PODS)
        self._epochs[_PODS] = self._watchers[_PODS].set_params(params)
        self._stale.discard(_PODS)

    # ---- pods ----
    def _on_pods(self, kind: str, payload: Any) -> None:
        if kind == "list":
            self._pods = {object_key(p): p for p in payload}
        elif kind == "DELETED":
            self._pods.pop(object_key(payload), None)
        else:
            self._pods[object_key(payload)] = payload
        self._rebuild_endpoints()

    def _rebuild_endpoints(self) -> None:
        ds = self._ds
        assert ds is not None
        if self._spec is None:
            ds.clear()
            return
        ds.replace_endpoints(build_endpoints(self._pods.values(), self._spec))

    # ---- objectives / rewrites / legacy models ----
    def _on_cr(self, name: str, kind: str, payload: Any) -> None:
        cache = self._crs[name]
        if kind in ("list", "absent"):
            self._crs[name] = {object_key(o): o for o in payload}
        elif kind == "DELETED":
            cache.pop(object_key(payload), None)
        else:
            cache[object_key(payload)] = payload
        ds = self._ds
        assert ds is not None
        if name == _OBJECTIVES:
            ds.objectives = build_objectives(self._crs[_OBJECTIVES].values(), self.pool_name)
        else:
            ds.rewrites, ds.model_objectives = build_model_semantics(
                self._crs[_REWRITES].values(), self._crs[_MODELS].values(), self.pool_name)
