"""One list/watch loop per Kubernetes resource, in its own thread.

The official ``kubernetes`` client is synchronous (urllib3), so each watched resource gets a
worker thread that does the list/watch protocol and hands plain JSON dicts to a callback.
The callback (see :mod:`epp.discovery.kubernetes`) forwards them to the asyncio loop; this
module never touches the datastore.

Protocol handled here:

* LIST -> report the whole set (``"list"``) -> WATCH from the list's ``resourceVersion``.
* ``BOOKMARK`` advances the resourceVersion; other events are reported one by one.
* A watch that ends normally (``timeoutSeconds``) resumes from the last resourceVersion.
* ``410 Gone`` (as an ERROR event or as an HTTP status) -> LIST again; the consumer replaces
  its cache with the new list, which is the diff.
* Any other failure (connection refused/reset, 5xx, garbage) -> jittered exponential backoff,
  then resume the watch from the last resourceVersion. Nothing is reported as deleted: the
  consumer keeps its last known state, marked stale (``"stale"`` / ``"fresh"`` reports).
* ``optional`` resources (CRDs that may not be installed, or not readable by our RBAC): a
  404/403 on LIST reports an empty set (``"absent"``) and retries slowly. A 404/403 on the
  WATCH (the CRD was deleted while we were disconnected, or our RBAC was revoked) means the
  objects we hold are no longer visible to us: re-list at once, which then reports
  ``"absent"``, instead of resuming the watch from the same resourceVersion forever.

``set_params`` swaps the query (e.g. a new pod label selector after the pool changed): it
bumps the epoch, closes the open stream and re-lists. Reports carry the epoch so the
consumer can drop whatever an older query still delivered.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

#: (kind, payload, epoch): kind is "list" (list of objects), "absent" (empty list), an event
#: type "ADDED"/"MODIFIED"/"DELETED" (one object), "stale" (error text) or "fresh" (None).
Report = Callable[[str, Any, int], None]
ListCall = Callable[..., Any]


class _Gone(Exception):
    """The resourceVersion we watch from was compacted away: re-list."""


class ResourceWatcher:
    """List/watch one resource in a daemon thread; see the module docstring."""

    def __init__(
        self,
        name: str,
        call: ListCall,
        report: Report,
        *,
        params: dict[str, Any] | None,
        optional: bool = False,
        watch_timeout: int = 300,
        backoff_base: float = 0.2,
        backoff_max: float = 5.0,
        absent_retry: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self._call = call
        self._report = report
        self._params = params
        self._optional = optional
        self._watch_timeout = watch_timeout
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._absent_retry = absent_retry
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._wake = threading.Event()  # params changed or stop requested
        self._stopping = threading.Event()
        self._resp: Any = None
        self.epoch = 0
        self._thread = threading.Thread(target=self._run, name=f"k8s-watch-{name}", daemon=True)
        self._stale = False
        self._failures = 0
        self._absent = False  # an optional resource answered 403/404 (logged once per spell)

    # ---- control (any thread) ----
    def start(self) -> None:
        self._thread.start()

    def set_params(self, params: dict[str, Any] | None) -> int:
        """Switch to a new query (None = idle) and re-list; returns the new epoch."""
        with self._lock:
            self.epoch += 1
            self._params = params
            resp = self._resp
        self._wake.set()
        self._close(resp)
        return self.epoch

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        with self._lock:
            resp = self._resp
        self._close(resp)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @staticmethod
    def _close(resp: Any) -> None:
        if resp is None:
            return
        try:  # unblocks a read in progress in the worker thread (urllib3 >= 2.3)
            shutdown = getattr(resp, "shutdown", None)
            if shutdown is not None:
                shutdown()
            resp.close()
        except Exception:  # best effort: the worker notices the stop flag anyway
            pass

    # ---- worker thread ----
    def _run(self) -> None:
        rv: str | None = None
        epoch = -1
        while not self._stopping.is_set():
            with self._lock:
                if epoch != self.epoch:  # new query: forget the old position
                    epoch, rv = self.epoch, None
                params = self._params
                self._wake.clear()
            if params is None:
                self._wake.wait()
                continue
            try:
                if rv is None:
                    rv = self._list(params, epoch)
                    if rv is None:  # optional resource absent
                        self._wait(self._absent_retry)
                        continue
                    self._set_fresh(epoch)
                started = time.monotonic()
                rv, got_events = self._watch(params, epoch, rv)
                if not got_events and time.monotonic() - started < 1.0:
                    # a server that ends every watch at once must not make us spin
                    self._wait(self._backoff_base)
            except _Gone:
                log.info("watch of %s: resourceVersion %s expired (410); re-listing", self.name, rv)
                rv = None
            except Exception as exc:
                if self._stopping.is_set() or epoch != self.epoch:
                    continue
                if isinstance(exc, ApiException) and exc.status == 410:
                    rv = None
                    continue
                if self._optional and _gone_for_us(exc) and rv is not None:
                    # CRD deleted or RBAC revoked under an open watch: re-list (which reports
                    # "absent" and clears the consumer's objects) rather than resume from rv.
                    log.warning("kubernetes %s watch refused (%s): re-listing; its objects are "
                                "dropped while it stays unavailable", self.name, _brief(exc))
                    rv = None
                    continue
                self._failures += 1
                delay = min(self._backoff_max, self._backoff_base * 2 ** min(self._failures - 1, 16))
                delay = random.uniform(delay / 2, delay)
                if not self._stale:
                    log.warning(
                        "kubernetes %s list/watch failed (%s); keeping the last known state "
                        "(now stale), retrying with backoff", self.name, _brief(exc))
                else:
                    log.debug("kubernetes %s still failing (%s), retry in %.2fs", self.name,
                              _brief(exc), delay)
                if not self._stale:
                    self._stale = True
                    self._report("stale", _brief(exc), epoch)
                self._wait(delay)

    def _wait(self, seconds: float) -> None:
        self._wake.wait(seconds)

    def _set_fresh(self, epoch: int) -> None:
        self._failures = 0
        if self._stale:
            self._stale = False
            log.warning("kubernetes %s list/watch recovered", self.name)
            self._report("fresh", None, epoch)

    def _list(self, params: dict[str, Any], epoch: int) -> str | None:
        try:
            resp = self._call(**params, _preload_content=False,
                              _request_timeout=(self._connect_timeout, 60))
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            if body.get("kind") == "Status":
                raise ApiException(status=body.get("code", 500), reason=body.get("message"))
        except ApiException as exc:
            if self._optional and _gone_for_us(exc):
                (log.debug if self._absent else log.info)(
                    "kubernetes %s not available (HTTP %s); treating as empty, will retry",
                    self.name, exc.status)
                self._absent = True
                self._report("absent", [], epoch)
                self._set_fresh(epoch)  # a definite answer ("none"), not a failing API server
                return None
            raise
        self._absent = False
        items = body.get("items") or []
        self._report("list", items, epoch)
        return str((body.get("metadata") or {}).get("resourceVersion") or "0")

    def _watch(self, params: dict[str, Any], epoch: int, rv: str) -> tuple[str, bool]:
        resp = self._call(
            **params, watch=True, resource_version=rv, allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout, _preload_content=False,
            _request_timeout=(self._connect_timeout, self._watch_timeout + 30),
        )
        with self._lock:
            if epoch != self.epoch or self._stopping.is_set():
                self._close(resp)
                return rv, True
            self._resp = resp
        self._set_fresh(epoch)  # connected and streaming again
        got = False
        try:
            for line in _lines(resp):
                got = True
                try:
                    event = json.loads(line)
                except ValueError:
                    raise RuntimeError(f"bad watch line {line[:200]!r}") from None
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    if obj.get("code") in (403, 404):
                        raise ApiException(status=obj["code"], reason=obj.get("message"))
                    raise RuntimeError(f"watch error event: {obj.get('code')} {obj.get('message')}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = str(new_rv)
                if etype in ("ADDED", "MODIFIED", "DELETED"):
                    if epoch != self.epoch:
                        return rv, got
                    self._report(etype, obj, epoch)
        finally:
            with self._lock:
                if self._resp is resp:
                    self._resp = None
            try:
                resp.release_conn()
            except Exception:
                pass
        return rv, got


def _lines(resp: Any) -> Iterator[bytes]:
    """Newline-delimited JSON from a chunked watch response, as chunks arrive."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def _gone_for_us(exc: BaseException) -> bool:
    """403/404: the resource does not exist (CRD not installed) or we may not read it."""
    return isinstance(exc, ApiException) and exc.status in (403, 404)


def _brief(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]
