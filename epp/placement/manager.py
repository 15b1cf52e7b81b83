"""``ModelPlacement``: the director's ``Placement`` and the KEDA scaler's ``ModelDemand``.

On the request path (no I/O, no logging above debug):

* ``ensure``: a model loaded on some pod passes at once (dict lookups). An unknown model —
  in no catalogue, on no pod, once every pod has reported — is a 404. A catalogue model
  loaded nowhere holds the request: the first such request starts one load (or asks the
  model's owner replica to), every other request for that model waits for the same load,
  and all of them go on when it finishes — or get a 503 saying why, at the latest after
  ``holdTimeout``. An empty pool is left to admission (scale from zero holds there).
* ``candidates``: the endpoints holding the model (minus copies being drained or unloaded).
* ``routed`` / ``release``: per-copy in-flight counts and last use (LRU, idle unloads).

In the background: ``GET /v1/models`` on every pod (``modelsRefreshInterval``, and at once
for a new pod), a reconcile tick (``reconcileInterval``) that smooths demand and runs the
policy's plan, and the loads and unloads themselves (``epp.placement.client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from epp.datalayer.datastore import CatalogueModel, Datastore
from epp.framework import errors
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.framework.plugin import StateKey
from epp.framework.scheduling import LLMRequest
from epp.placement.actions import Actions, pod_url
from epp.placement.client import PodClient
from epp.placement.config import PlacementConfig
from epp.placement.fleet import Copy, Fleet, ModelState
from epp.placement.metrics import PlacementMetrics
from epp.placement.peers import Ownership, PeerUnreachable, ask_owner, peer_app
from epp.placement.policy import Action, choose_pod, loadable, plan

log = logging.getLogger(__name__)

#: the ModelState a request was counted in by ``ensure`` (``release`` undoes exactly that)
_COUNTED: StateKey[ModelState] = StateKey("placement.counted")
#: the copy a request was routed to
_ROUTED: StateKey[Copy] = StateKey("placement.routed")
_NO_VICTIM_RETRY = 0.05
#: slots of a scraped pod whose ``vllm:lora_requests_info`` has no sample yet: a real vLLM
#: publishes none until its first request has run, so an idle new pod would never get the load
#: its first (held) adapter request waits for. vLLM's default ``--max-loras``; the reported
#: ``max_lora`` replaces it as soon as there is one. Before the first scrape: 0 (wait for it,
#: or a guess of 1 would evict what the real slots had room for).
UNREPORTED_SLOTS = 1


@dataclass(slots=True)
class ModelPlacement:
    cfg: PlacementConfig
    datastore: Datastore
    ownership: Ownership = field(default_factory=Ownership)
    metrics: PlacementMetrics | None = None
    clock: Callable[[], float] = time.monotonic
    #: address the peer API listens on (port: that of ``ownership.self_url``), with peers
    peer_bind: str = "0.0.0.0"
    fleet: Fleet = field(default_factory=Fleet)
    models: dict[str, ModelState] = field(default_factory=dict)
    #: requests held for a load right now, all models (counted as queued pool demand)
    held: int = 0
    _client: PodClient | None = None
    _actions: Actions | None = None
    _session: aiohttp.ClientSession | None = None
    _waiters: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    _cold: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _listeners: list[Callable[[], None]] = field(default_factory=list)
    _catalogue: dict[str, CatalogueModel] = field(default_factory=dict)
    _catalogue_src: tuple[object, object] = (None, None)
    _base: dict[str, CatalogueModel] = field(default_factory=dict)
    _peer_runner: web.AppRunner | None = None
    _ticked: float = 0.0

    def __post_init__(self) -> None:
        self._base = self.cfg.catalogue()
        self.fleet.sync(ep.key for ep in self.datastore.endpoints())

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._client = PodClient(self._session)
            self._actions = Actions(self.fleet, self._client, self.cfg, self.catalogue, self._wake, self._spawn,
                                    self.metrics, self.clock)
        self.datastore.add_listener(self._endpoints_changed)
        self._spawn(self._poll_loop())
        self._spawn(self._reconcile_loop())
        me = self.ownership.self_url
        if self.ownership.peers and me is not None and self._peer_runner is None:
            runner = web.AppRunner(peer_app(self.ensure_for_peer, self.state), access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, self.peer_bind, urlsplit(me).port).start()
            except OSError:
                await runner.cleanup()
                raise
            self._peer_runner = runner

    async def close(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._peer_runner is not None:
            await self._peer_runner.cleanup()
            self._peer_runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def actions(self) -> Actions:
        assert self._actions is not None, "ModelPlacement.start() first"
        return self._actions

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "ModelPlacement.start() first"
        return self._session

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ catalogue
    def catalogue(self) -> dict[str, CatalogueModel]:
        """The config's models, overridden by the pool file's (re-merged when it changes)."""
        src = (self.datastore.catalogue, self._base)
        if src[0] is not self._catalogue_src[0]:
            self._catalogue = {**self._base, **self.datastore.catalogue}
            self._catalogue_src = src
        return self._catalogue

    def _known(self, model: str) -> bool:
        if model in self.catalogue() or model in self.fleet.holders:
            return True
        ds = self.datastore
        return model in ds.model_objectives or any(t.model == model for r in ds.rewrites for t in r.targets)

    # ------------------------------------------------------------------ request path
    async def ensure(self, request: LLMRequest) -> None:
        model = request.target_model
        st = self.models.get(model)
        if st is None:
            if not self._known(model):
                if self.fleet.all_reported():
                    if self.metrics is not None:
                        self.metrics.not_found.labels(self.metrics.pool()).inc()
                    raise RequestError(errors.NOT_FOUND, f"model {model!r} is not served by this inference pool")
                return  # the pods have not all reported yet: cannot tell, let it through
            st = self.models[model] = ModelState(model)
        st.inflight += 1
        st.arrivals += 1
        st.last_request = self.clock()
        request.state.set(_COUNTED, st)
        if st.inflight == 1:
            self._notify()
        if self.fleet.routable.get(model):
            return
        if not self.fleet.pods and not loadable(model, self.catalogue()):
            return  # a base model and an empty pool: admission holds it (scale from zero)
        try:
            await self._hold(st)
        except BaseException:
            request.state.pop(_COUNTED)
            self._uncount(st)
            raise

    def candidates(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        model = request.target_model
        keys = self.fleet.routable.get(model) or self.fleet.holders.get(model)
        if not keys:
            return endpoints
        picked = [ep for ep in endpoints if ep.key in keys]
        return picked or endpoints

    def routed(self, request: LLMRequest, endpoint: Endpoint) -> None:
        pod = self.fleet.pods.get(endpoint.key)
        c = pod.adapters.get(request.target_model) if pod is not None else None
        if c is not None:
            c.inflight += 1
            c.last_used = self.clock()
            request.state.set(_ROUTED, c)

    def release(self, request: LLMRequest, endpoint: Endpoint | None) -> None:
        c = request.state.pop(_ROUTED)
        if c is not None:
            c.inflight -= 1
            c.last_used = self.clock()
        st = request.state.pop(_COUNTED)
        if st is not None:
            self._uncount(st)

    def _uncount(self, st: ModelState) -> None:
        st.inflight -= 1
        if st.inflight == 0:
            self._notify()

    async def _hold(self, st: ModelState) -> None:
        """Wait until ``st``'s model is loaded somewhere; RequestError (503) past the budget
        or when the load failed."""
        model = st.name
        deadline = self.clock() + self.cfg.hold_timeout
        st.held += 1
        self.held += 1
        self._set_held(model, st.held)
        self._notify()
        outcome = "loaded"
        try:
            while not self.fleet.routable.get(model):
                now = self.clock()
                if st.failed_until > now:
                    outcome = "failed"
                    raise errors.unavailable(f"model {model!r} could not be loaded: {st.failure}")
                if now >= deadline:
                    outcome = "timeout"
                    raise errors.unavailable(
                        f"model {model!r} is not loaded on any pod yet and did not become ready within "
                        f"{self.cfg.hold_timeout:g}s; retry later")
                waiter = self._waiters.get(model)
                if waiter is None or waiter.done():
                    waiter = self._waiters[model] = asyncio.get_running_loop().create_future()
                self._kick(model)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), deadline - now)
        finally:
            st.held -= 1
            self.held -= 1
            self._set_held(model, st.held)
            if self.metrics is not None:
                self.metrics.held_total.labels(self.metrics.pool(), model, outcome).inc()
            self._notify()

    def _set_held(self, model: str, n: int) -> None:
        if self.metrics is not None:
            self.metrics.held.labels(self.metrics.pool(), model).set(n)

    def _wake(self) -> None:
        """Something changed (a copy appeared, a load failed): held requests re-check."""
        for model, fut in list(self._waiters.items()):
            if not fut.done():
                fut.set_result(None)
            del self._waiters[model]

    def _kick(self, model: str) -> None:
        """Start getting ``model`` loaded, unless that is under way or not ours to do."""
        if model in self._cold or not self.cfg.manages or not loadable(model, self.catalogue()):
            return  # observe mode, or a base model: wait for a pod to report it
        if not self.ownership.acting():
            return
        owner = self.ownership.owner(model)
        coro = self._cold_load(model) if owner is None else self._ask_owner(owner, model)
        task = self._spawn(coro)
        self._cold[model] = task
        task.add_done_callback(lambda _t: self._cold.pop(model, None))

    # ------------------------------------------------------------------ loads
    async def _cold_load(self, model: str) -> None:
        """Load a model nobody holds, on the policy's choice; while no slot can be freed (every
        copy busy), retry until no request waits for it anymore."""
        st = self.models[model]
        while not self.fleet.routable.get(model) and st.held > 0:
            load = choose_pod(model, self.fleet, self.models, self.catalogue(), self.cfg, self.clock(), cold=True)
            if load is None:
                await asyncio.sleep(_NO_VICTIM_RETRY)
                continue
            result = await self.actions.load(load)
            if not result.present:
                st.failed_until = self.clock() + self.cfg.failure_backoff
                st.failure = f"{result.outcome} on {load.pod}: {result.message}"
                log.warning("model load failed", extra={"model": model, "pod": load.pod, "outcome": result.outcome,
                                                        "error": result.message})
                self._wake()
                return

    async def _ask_owner(self, owner: str, model: str) -> None:
        st = self.models[model]
        try:
            keys = await ask_owner(self.session, owner, model, self.cfg.hold_timeout + 5.0)
        except PeerUnreachable as exc:
            log.warning("placement owner unreachable; deciding without it", extra={"peer": owner, "error": str(exc)})
            self.ownership.unreachable(owner)
        except RequestError as exc:
            st.failed_until = self.clock() + min(self.cfg.failure_backoff, 1.0)
            st.failure = exc.message
        else:
            now = self.clock()
            for key in keys:
                self.fleet.loaded(key, model, now)
        self._wake()

    async def ensure_for_peer(self, model: str) -> list[str]:
        """A peer replica asks us, the owner, to have ``model`` loaded (``peers.peer_app``)."""
        if not self._known(model):
            raise RequestError(errors.NOT_FOUND, f"model {model!r} is not served by this inference pool")
        st = self.models.setdefault(model, ModelState(model))
        st.inflight += 1
        try:
            if not self.fleet.routable.get(model):
                await self._hold(st)
        finally:
            self._uncount(st)
        return sorted(self.fleet.holders.get(model, ()))

    # ------------------------------------------------------------------ background
    def _endpoints_changed(self, added: tuple[Endpoint, ...], removed: tuple[Endpoint, ...]) -> None:
        self.fleet.sync(ep.key for ep in self.datastore.endpoints())
        if self._session is not None:
            for ep in added:
                self._spawn(self._poll_pod(ep.key))

    async def _poll_loop(self) -> None:
        while True:
            self.fleet.sync(ep.key for ep in self.datastore.endpoints())
            await asyncio.gather(*(self._poll_pod(k) for k in list(self.fleet.pods)))
            await asyncio.sleep(self.cfg.models_refresh_interval)

    async def _poll_pod(self, key: str) -> None:
        pod = self.fleet.pods.get(key)
        if pod is None or self._client is None:
            return
        version = pod.version
        report = await self._client.models(pod_url(key), min(2.0, self.cfg.models_refresh_interval * 2))
        if report is not None and self.fleet.apply_report(key, version, report.adapters, report.bases, self.clock()):
            self._wake()

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reconcile_interval)
            try:
                self.reconcile()
            except Exception:  # a bug in one tick must not stop placement
                log.exception("placement reconcile failed")

    def reconcile(self) -> list[Action]:
        """One tick: refresh the pods' figures, smooth demand, run the plan (if we act)."""
        now = self.clock()
        slots = self.cfg.slots_per_pod
        changed = False
        for ep in self.datastore.endpoints():
            pod = self.fleet.pods.get(ep.key)
            if pod is None:
                continue
            m = ep.metrics
            pod.slots = slots or m.max_adapters or (UNREPORTED_SLOTS if m.updated_at > 0 >= m.adapters_at else 0)
            pod.observe_load(m.running_requests_size, m.waiting_queue_size, ep.inflight)
            before = len(pod.adapters)
            seen = now - max(0.0, time.time() - m.adapters_at) if m.adapters_at > 0 else now
            self.fleet.observe_active(ep.key, m.active_adapters | m.waiting_adapters, now, seen)
            changed |= len(pod.adapters) != before
        if changed:
            self._wake()
        dt = max(1e-3, now - self._ticked) if self._ticked else self.cfg.reconcile_interval
        self._ticked = now
        fast = 1.0 - math.exp(-dt / self.cfg.scale_window)
        slow = 1.0 - math.exp(-dt / self.cfg.demand_window)
        for name in list(self.models):
            st = self.models[name]
            arrived = st.arrivals / dt
            st.arrivals = 0
            st.concurrency += fast * (st.inflight - st.concurrency)
            st.recent_rate += fast * (arrived - st.recent_rate)
            st.rate += slow * (arrived - st.rate)
            if (st.inflight == 0 and st.rate < 0.001 and name not in self.fleet.holders
                    and now - st.last_request > self.cfg.idle_unload_after):
                del self.models[name]  # forgotten: its next request starts over
        actions: list[Action] = []
        if self.cfg.manages and self.ownership.acting():
            actions = plan(self.fleet, self.models, self.catalogue(), self.cfg, now, self.ownership.owns)
            for action in actions:
                self.actions.start(action)
            self.fleet.reindex()
        self._export()
        return actions

    def _export(self) -> None:
        if self.metrics is None:
            return
        self.metrics.set_copies((m, len(k)) for m, k in self.fleet.holders.items())
        self.metrics.set_demand((m, st.held, st.inflight) for m, st in self.models.items())

    # ------------------------------------------------------------------ demand (KEDA)
    def model_demand(self, model: str) -> tuple[int, int] | None:
        st = self.models.get(model)
        if st is not None:
            return st.held, st.inflight
        return (0, 0) if self._known(model) else None

    def add_activity_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _notify(self) -> None:
        for cb in self._listeners:
            try:
                cb()
            except Exception:  # pragma: no cover - listeners are ours and trivial
                log.exception("placement activity listener failed")

    def state(self) -> dict[str, object]:
        """Copies and demand as this replica sees them (``GET /placement/v1/state``)."""
        return {
            "models": {m: sorted(k) for m, k in sorted(self.fleet.holders.items())},
            "demand": {m: {"held": st.held, "inflight": st.inflight, "rate": round(st.recent_rate, 3)}
                       for m, st in sorted(self.models.items())},
        }
