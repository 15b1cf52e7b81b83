"""Leader election on a ``coordination.k8s.io/v1`` Lease, for active-passive HA.

Several picker replicas each keep their own datastore warm (discovery, scraping), but only
the leader reports ready, so the gateway sends ext_proc traffic to one picker at a time and
its prefix index and queues stay whole (GIE's HA model). The Lease is named
``epp-<namespace>-<pool>.gateway-api-inference-extension.sigs.k8s.io`` in the pool's
namespace, as in GIE, so an epp replica and a GIE replica would even share one election.

Why our own loop and not ``kubernetes.leaderelection``: that module blocks a thread in
``time.sleep`` loops, has no way to stop or release, and exits leading for good after one
failed renewal. The algorithm here is client-go's (what controller-runtime, hence GIE, uses):

* **candidate**: every ``retry_period`` (jittered), GET the Lease. Absent → create it with us
  as holder. Held by someone else → the lease counts as valid while the *record* we observe
  keeps changing: it expires ``leaseDurationSeconds`` after we last saw it change, measured on
  our own monotonic clock (no cross-node clock comparison). Expired, released (empty holder)
  or ours → write it with us as holder, conditional on the ``resourceVersion`` we read; a
  409 means someone else won that round.
* **leader**: renew every ``retry_period``. If no renewal succeeded for ``renew_deadline``,
  or the Lease names another holder, step down (``is_leader`` turns False at once; the runner's
  readiness follows within 0.5 s) and go back to being a candidate. Because
  ``renew_deadline < lease_duration`` a leader always gives up before any other replica may
  take over, so two replicas are never ready at the same time.
* **stop**: if leader, release the Lease (empty holder, ``leaseDurationSeconds: 1``) so a
  standby takes over after one retry period instead of a whole lease duration.

Unlike controller-runtime we do not exit the process when leadership is lost: the replica
just turns not-ready and campaigns again (its datastore is still warm).

The client is synchronous; every API call runs in a worker thread with a request timeout,
so the asyncio loop never blocks on the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

LEASE_SUFFIX = ".gateway-api-inference-extension.sigs.k8s.io"
DEFAULT_LEASE_DURATION = 15.0
DEFAULT_RENEW_DEADLINE = 10.0
DEFAULT_RETRY_PERIOD = 2.0
_JITTER = 1.2  # client-go's JitterFactor: a candidate waits retry_period x [1, 1.2)


def lease_name(namespace: str, pool_name: str) -> str:
    """GIE's Lease name for a pool (``epp-<ns>-<pool>.gateway-api-inference-extension...``)."""
    return f"epp-{namespace}-{pool_name}{LEASE_SUFFIX}"


def default_identity() -> str:
    """``POD_NAME`` (downward API, unique per pod), else ``<hostname>_<random>``.

    The random suffix keeps two processes on one host (tests, a laptop) distinct; a pod that
    restarts keeps its ``POD_NAME`` and so renews its own lease at once instead of waiting
    for it to expire.
    """
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_time(dt: datetime) -> str:
    """Kubernetes MicroTime (RFC 3339 with exactly six fractional digits)."""
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaign for one Lease in the background; ``is_leader`` says whether we hold it.

    ``on_change(is_leader)`` (optional) is called on the loop at every transition.
    """

    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        identity: str | None = None,
        api_client: k8s_client.ApiClient | None = None,
        lease_duration: float = DEFAULT_LEASE_DURATION,
        renew_deadline: float = DEFAULT_RENEW_DEADLINE,
        retry_period: float = DEFAULT_RETRY_PERIOD,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not lease_duration > renew_deadline:
            raise ValueError(f"leader election: lease duration ({lease_duration}s) must be greater "
                             f"than the renew deadline ({renew_deadline}s)")
        if not renew_deadline > _JITTER * retry_period:
            raise ValueError(f"leader election: renew deadline ({renew_deadline}s) must be greater "
                             f"than {_JITTER} x the retry period ({retry_period}s)")
        if retry_period <= 0:
            raise ValueError("leader election: retry period must be positive")
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._api_client = api_client
        self._on_change = on_change
        # CoordinationV1Api, used with raw JSON both ways (dict bodies, _preload_content=False)
        # so MicroTime fields keep the exact format the API server parses; hence Any.
        self._api: Any = None
        self._task: asyncio.Task[None] | None = None
        self._leader = False
        # what we last saw in the Lease, and when (monotonic) it last changed
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._holder = ""
        self._request_timeout = max(0.2, min(retry_period, renew_deadline / 2))
        self._failures = _FailureLog(self.description)

    # ---- public ----
    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def holder(self) -> str:
        """The holder named in the Lease when we last read it ("" = none/released)."""
        return self._holder

    @property
    def description(self) -> str:
        return f"Lease {self.namespace}/{self.name} as {self.identity}"

    async def start(self) -> None:
        """Start campaigning in the background (returns at once, leader or not)."""
        if self._task is not None:
            return
        if self._api_client is None:
            from epp.discovery.kubernetes import load_api_client

            self._api_client = await asyncio.to_thread(load_api_client)
        self._api = k8s_client.CoordinationV1Api(self._api_client)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="leader-election")
        log.info("leader election started: %s (lease %.1fs, renew deadline %.1fs, retry %.1fs)",
                 self.description, self.lease_duration, self.renew_deadline, self.retry_period)

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; if leader (and ``release``), release the Lease for a fast failover.
        Idempotent and safe before ``start``."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        was_leader = self._leader
        self._set_leader(False, "stopping")
        if was_leader and release and self._api is not None:
            try:
                released = await asyncio.wait_for(asyncio.to_thread(self._release), self.renew_deadline)
            except Exception as exc:  # the lease then simply expires
                log.warning("leader election: could not release %s (%s); it expires in %.0fs",
                            self.description, _brief(exc), self.lease_duration)
            else:
                if released:
                    log.info("leader election: released %s", self.description)

    # ---- the loop ----
    async def _run(self) -> None:
        while True:
            # candidate
            if not await self._attempt(self._request_timeout):
                await asyncio.sleep(self.retry_period * random.uniform(1.0, _JITTER))
                continue
            self._set_leader(True, "acquired the lease")
            # leader
            last_ok = time.monotonic()
            while True:
                await asyncio.sleep(self.retry_period)
                left = last_ok + self.renew_deadline - time.monotonic()
                ok = left > 0 and await self._attempt(min(self._request_timeout, left))
                now = time.monotonic()
                if ok:
                    last_ok = now
                    continue
                if self._holder and self._holder != self.identity:
                    self._set_leader(False, f"the lease is now held by {self._holder}")
                    break
                if now - last_ok >= self.renew_deadline:
                    self._set_leader(False, f"could not renew it for {self.renew_deadline:.1f}s")
                    break

    async def _attempt(self, budget: float) -> bool:
        """One try_acquire_or_renew; each HTTP call gets ``budget`` seconds."""
        try:
            ok = await asyncio.wait_for(asyncio.to_thread(self._try_acquire_or_renew, budget),
                                        2 * budget + 0.5)
        except TimeoutError:
            self._failures.failed("timed out")
        except Exception as exc:
            self._failures.failed(_brief(exc), forbidden=isinstance(exc, ApiException) and exc.status == 403)
        else:
            self._failures.succeeded()
            return ok
        finally:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Python 3.11's wait_for returns the result of a call that completed while the
                # task was being cancelled and drops the cancellation: stop() would wait forever
                raise asyncio.CancelledError
        return False

    def _set_leader(self, leader: bool, why: str) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        if leader:
            log.info("leader election: became leader of %s (%s); this replica may now report ready",
                     self.description, why)
        elif why == "stopping":
            log.info("leader election: stepping down from %s (stopping)", self.description)
        else:
            log.warning("leader election: lost leadership of %s (%s); readiness turns NOT_SERVING",
                        self.description, why)
        if self._on_change is not None:
            self._on_change(leader)

    # ---- API calls (worker thread) ----
    def _try_acquire_or_renew(self, timeout: float) -> bool:
        api = self._api
        assert api is not None
        now = datetime.now(UTC)
        try:
            resp = api.read_namespaced_lease(self.name, self.namespace, _preload_content=False,
                                             _request_timeout=timeout)
            lease = json.loads(resp.data)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = self._body(None, now, transitions=0, acquire=now)
            try:
                api.create_namespaced_lease(self.namespace, body, _preload_content=False,
                                            _request_timeout=timeout)
            except ApiException as exc2:
                if exc2.status == 409:  # another candidate created it first
                    return False
                raise
            self._observe(body["spec"])
            return True

        spec = lease.get("spec") or {}
        self._observe(spec)
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and time.monotonic() < self._observed_at + duration:
            return False  # held by someone else and not expired
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            body = self._body(lease, now, transitions, spec.get("acquireTime") or _micro_time(now))
        else:
            body = self._body(lease, now, transitions + 1, now)
        try:
            api.replace_namespaced_lease(self.name, self.namespace, body, _preload_content=False,
                                         _request_timeout=timeout)
        except ApiException as exc:
            if exc.status == 409:  # someone wrote it since our read
                return False
            raise
        self._observe(body["spec"])
        return True

    def _release(self) -> bool:
        api = self._api
        assert api is not None
        resp = api.read_namespaced_lease(self.name, self.namespace, _preload_content=False,
                                         _request_timeout=self._request_timeout)
        lease = json.loads(resp.data)
        spec = lease.get("spec") or {}
        if spec.get("holderIdentity") != self.identity:
            return False
        now = datetime.now(UTC)
        body = self._body(lease, now, int(spec.get("leaseTransitions") or 0), now)
        body["spec"]["holderIdentity"] = ""
        body["spec"]["leaseDurationSeconds"] = 1
        api.replace_namespaced_lease(self.name, self.namespace, body, _preload_content=False,
                                     _request_timeout=self._request_timeout)
        return True

    def _body(self, current: dict[str, Any] | None, now: datetime, transitions: int,
              acquire: datetime | str) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if current is not None:
            cur_meta = current.get("metadata") or {}
            meta = {**cur_meta, **meta}  # keeps labels/annotations/uid; resourceVersion = conditional
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, math.ceil(self.lease_duration)),
                "acquireTime": acquire if isinstance(acquire, str) else _micro_time(acquire),
                "renewTime": _micro_time(now),
                "leaseTransitions": transitions,
            },
        }

    def _observe(self, spec: dict[str, Any]) -> None:
        record = (spec.get("holderIdentity") or "", spec.get("renewTime"), spec.get("acquireTime"),
                  spec.get("leaseDurationSeconds"), spec.get("leaseTransitions"))
        if record != self._observed:
            holder = record[0]
            if self._observed is not None and holder != self._holder and holder != self.identity:
                log.info("leader election: %s is now held by %s", self.name, holder or "nobody")
            self._observed = record
            self._observed_at = time.monotonic()
            self._holder = holder


class _FailureLog:
    """Warnings for failing Lease calls, at most one per ``every`` seconds.

    A replica that cannot read or write its Lease (no RBAC for ``leases``, API server down)
    never becomes leader, hence never ready: that must be visible at the default log level,
    but a retry every ``retry_period`` must not flood the log. The first failure of a spell
    warns at once; later ones are counted and summarised in the next warning; the first
    success after a warning says so.
    """

    __slots__ = ("every", "last", "suppressed", "warned", "what")

    def __init__(self, what: str, every: float = 60.0) -> None:
        self.what = what
        self.every = every
        self.last = -math.inf
        self.suppressed = 0
        self.warned = False

    def failed(self, why: str, forbidden: bool = False) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.suppressed += 1
            log.debug("leader election: %s failed: %s", self.what, why)
            return
        hint = (" (RBAC: the service account needs get, create and update on leases in "
                "coordination.k8s.io)" if forbidden else "")
        more = f"; {self.suppressed} more failures since the last warning" if self.suppressed else ""
        log.warning("leader election: %s failed: %s%s; no leadership (hence no readiness) is "
                    "gained or kept past the renew deadline until it succeeds%s", self.what, why, hint, more)
        self.last, self.suppressed, self.warned = now, 0, True

    def succeeded(self) -> None:
        if self.warned:
            log.info("leader election: %s: Lease calls succeed again", self.what)
        self.last, self.suppressed, self.warned = -math.inf, 0, False


def _brief(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]
