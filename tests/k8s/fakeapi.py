"""An in-process fake Kubernetes API server that speaks the real list/watch protocol.

Good enough for the official ``kubernetes`` client (and ``kubectl get --raw``-style clients):

* namespaced LIST of pods (core/v1) and of the inference CRDs (both InferencePool groups,
  InferenceObjective, InferenceModelRewrite, InferenceModel), with ``labelSelector``
  (equality) and ``fieldSelector`` (``metadata.name=``/``metadata.namespace=``); a List
  carries ``metadata.resourceVersion`` from one global, increasing counter;
* ``?watch=1&resourceVersion=N``: chunked, newline-delimited JSON events
  (ADDED/MODIFIED/DELETED, BOOKMARK when ``allowWatchBookmarks``, ERROR), ending after
  ``timeoutSeconds``; a MODIFIED object that leaves or enters a label selector is sent as
  DELETED/ADDED, as the real server does;
* ``compact()``: a watch from an older resourceVersion gets an ERROR event with a 410 Status;
* ``fail_next(n, status)``: the next n requests get an HTTP error with a Status body;
* ``restart(down_for)``: drops every open connection and refuses connections for a while
  (the listening socket is closed and re-bound on the same port);
* ``uninstall(plural)``: that CRD's URLs answer 404 (CRD not installed);
* single objects (``.../PLURAL/NAME``): GET, PUT (replace; a ``metadata.resourceVersion``
  that is not the current one gets 409 Conflict, as optimistic concurrency does), DELETE,
  and POST on the collection (create; 409 AlreadyExists) for every kind above plus
  ``coordination.k8s.io/v1`` Leases (leader election).
* ``POST /apis/authentication.k8s.io/v1/tokenreviews`` and
  ``POST /apis/authorization.k8s.io/v1/subjectaccessreviews`` answered as the real server
  does (``status.authenticated`` + ``status.user``; ``status.allowed`` + ``reason``) from the
  tokens of ``add_token`` and the non-resource grants of ``grant`` (what a ClusterRole with
  ``nonResourceURLs`` gives); 400/422 for the requests the real server rejects.

Everything binds 127.0.0.1 only. Use it from pytest via the ``fake_k8s`` fixture
(tests/k8s/conftest.py) or directly::

    with FakeKube() as kube:
        kube.add(pool("p", {"app": "m"}, [8000]))
        kube.add(pod("m-0", "10.0.0.1", {"app": "m"}))
        api_client = kube.api_client()
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

POOL_GROUP = "inference.networking.k8s.io"
X_GROUP = "inference.networking.x-k8s.io"
COORDINATION_GROUP = "coordination.k8s.io"

#: plural -> {group: (version, kind)}; "" is the core group.
RESOURCES: dict[str, dict[str, tuple[str, str]]] = {
    "pods": {"": ("v1", "Pod")},
    "inferencepools": {POOL_GROUP: ("v1", "InferencePool"), X_GROUP: ("v1alpha2", "InferencePool")},
    "inferenceobjectives": {X_GROUP: ("v1alpha2", "InferenceObjective")},
    "inferencemodelrewrites": {X_GROUP: ("v1alpha2", "InferenceModelRewrite")},
    "inferencemodels": {X_GROUP: ("v1alpha2", "InferenceModel")},
    "leases": {COORDINATION_GROUP: ("v1", "Lease")},
}
_KIND_TO_PLURAL = {kind: plural for plural, g in RESOURCES.items() for _, kind in g.values()}

ResKey = tuple[str, str]  # (group, plural)


def _group_of(api_version: str) -> str:
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def _now_ts(offset: float = 0.0) -> str:
    return datetime.fromtimestamp(time.time() + offset, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(obj: dict[str, Any] | None, ns: str, labels: dict[str, str], fields: dict[str, str]) -> bool:
    if obj is None:
        return False
    m = obj.get("metadata") or {}
    if m.get("namespace") != ns:
        return False
    if fields.get("metadata.name") not in (None, m.get("name")):
        return False
    if fields.get("metadata.namespace") not in (None, m.get("namespace")):
        return False
    have = m.get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


def _parse_selector(value: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (value or "").split(","):
        if part.strip():
            k, _, v = part.partition("==" if "==" in part else "=")
            out[k.strip()] = v.strip()
    return out


def _status(code: int, message: str, reason: str = "") -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message,
            "reason": reason or {410: "Expired", 404: "NotFound", 409: "Conflict"}.get(code, "InternalError"),
            "code": code}


class FakeKube:
    """The fake API server and its object store (thread-safe)."""

    def __init__(self, bookmark_interval: float = 1.0) -> None:
        self.bookmark_interval = bookmark_interval
        self._cond = threading.Condition()
        self._rv = 1
        self._objects: dict[tuple[ResKey, str, str], dict[str, Any]] = {}
        # (rv, reskey, type, obj, old_obj)
        self._events: list[tuple[int, ResKey, str, dict[str, Any], dict[str, Any] | None]] = []
        self._compacted = 0
        self._failures: list[tuple[int, Callable[[str], bool]]] = []
        self._uninstalled: set[str] = set()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._uid = itertools.count(1)
        self._generation = 0  # bumps on restart: open watches end
        self.requests: list[str] = []  # "GET /path?query", for assertions
        self.request_times: list[float] = []  # time.monotonic() of each entry of ``requests``
        self._open_watches: dict[str, int] = {}  # plural -> watches streaming right now
        self._tokens: dict[str, dict[str, Any]] = {}  # bearer token -> TokenReview status.user
        self._grants: set[tuple[str, str, str]] = set()  # (user or group, non-resource path, verb)
        self.port = 0

    # ---- lifecycle ----
    def start(self) -> FakeKube:
        self._bind()
        return self

    def stop(self) -> None:
        self._unbind()

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _bind(self) -> None:
        kube = self

        class Handler(_Handler):
            fake = kube

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-kube", daemon=True)
        self._thread.start()

    def _unbind(self) -> None:
        with self._cond:
            server, self._server = self._server, None
            self._generation += 1
            self._cond.notify_all()
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def restart(self, down_for: float = 0.5, compact: bool = False,
                while_down: Callable[[], None] | None = None) -> None:
        """Drop all connections, refuse new ones for ``down_for`` s, then serve again on the
        same port. ``while_down`` runs while nothing is served; ``compact`` compacts before
        coming back (so resumed watches get 410)."""
        self._unbind()
        if while_down is not None:
            while_down()
        if compact:
            self.compact()
        time.sleep(down_for)
        for _ in range(50):
            try:
                self._bind()
                return
            except OSError:  # port still in TIME_WAIT on some kernels
                time.sleep(0.05)
        raise RuntimeError("fake kube could not re-bind its port")

    def api_client(self) -> Any:
        """A real ``kubernetes.client.ApiClient`` pointed at this server."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.retries = 0  # the discovery code does its own backoff
        return client.ApiClient(cfg)

    # ---- knobs ----
    def compact(self) -> None:
        """Forget history: watches from a resourceVersion older than now get 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._events.clear()

    def fail_next(self, n: int = 1, status: int = 500, path_contains: str = "") -> None:
        def pred(path: str) -> bool:
            return path_contains in path

        with self._cond:
            for _ in range(n):
                self._failures.append((status, pred))

    def clear_failures(self) -> None:
        """Drop injected failures that have not fired yet."""
        with self._cond:
            self._failures.clear()

    def kubeconfig(self, path: str | os.PathLike[str], namespace: str = "default") -> str:
        """Write a kubeconfig for this server (plain HTTP, no credentials) and return its path:
        what a child process (``epp serve``) needs via ``KUBECONFIG``."""
        text = json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                       "namespace": namespace}}],
        })  # JSON is YAML
        with open(path, "w") as f:
            f.write(text)
        return str(path)

    def uninstall(self, plural: str) -> None:
        with self._cond:
            self._uninstalled.add(plural)

    def install(self, plural: str) -> None:
        with self._cond:
            self._uninstalled.discard(plural)

    def watch_count(self) -> int:
        with self._cond:
            return sum(1 for r in self.requests if "watch=" in r)

    def open_watches(self, plural: str) -> int:
        """Watches of ``plural`` (e.g. "pods") streaming right now: 0 means no client can be
        told about a change to those objects, which tests use instead of sleeping."""
        with self._cond:
            return self._open_watches.get(plural, 0)

    def requests_since(self, t: float, path_contains: str = "") -> list[tuple[float, str]]:
        """(monotonic time, "METHOD /path?query") of the requests received since ``t``."""
        with self._cond:
            return [(at, r) for at, r in zip(self.request_times, self.requests, strict=True)
                    if at >= t and path_contains in r]

    # ---- authentication and authorisation (TokenReview / SubjectAccessReview) ----
    def add_token(self, token: str, username: str, groups: Iterable[str] = (), uid: str = "") -> None:
        """A bearer token the TokenReview API accepts as ``username`` (plus the groups every
        authenticated user has, as the real server adds)."""
        with self._cond:
            self._tokens[token] = {"username": username, "uid": uid or f"uid-{next(self._uid)}",
                                   "groups": [*groups, "system:authenticated"]}

    def revoke_token(self, token: str) -> None:
        with self._cond:
            self._tokens.pop(token, None)

    def grant(self, subject: str, path: str = "/metrics", verb: str = "get") -> None:
        """Let a user or group ``verb`` the non-resource URL ``path`` (``"*"`` matches any)."""
        with self._cond:
            self._grants.add((subject, path, verb))

    def revoke(self, subject: str, path: str = "/metrics", verb: str = "get") -> None:
        with self._cond:
            self._grants.discard((subject, path, verb))

    def _token_review(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        token = (body.get("spec") or {}).get("token") or ""
        if not token:
            return 400, _status(400, "token is required for TokenReview in authentication", "BadRequest")
        with self._cond:
            user = copy.deepcopy(self._tokens.get(token))
        status: dict[str, Any] = ({"authenticated": True, "user": user} if user is not None
                                  else {"user": {}, "error": "[invalid bearer token, token lookup failed]"})
        return 201, {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                     "metadata": {"creationTimestamp": None}, "spec": body.get("spec"), "status": status}

    def _access_review(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        spec = body.get("spec") or {}
        user, groups = spec.get("user") or "", list(spec.get("groups") or [])
        nra, ra = spec.get("nonResourceAttributes"), spec.get("resourceAttributes")
        if not user and not groups:
            return 422, _status(422, "spec.user: Invalid value: \"\": at least one of user or group must be "
                                     "specified", "Invalid")
        if (nra is None) == (ra is None):
            return 422, _status(422, "spec.nonResourceAttributes: Invalid value: exactly one of "
                                     "nonResourceAttributes or resourceAttributes must be specified", "Invalid")
        allowed = False
        if nra is not None:
            path, verb = nra.get("path") or "", nra.get("verb") or ""
            with self._cond:
                allowed = any(s in (user, *groups) and p in (path, "*") and v in (verb, "*")
                              for s, p, v in self._grants)
        status = ({"allowed": True, "reason": "RBAC: allowed by ClusterRoleBinding \"fake\""} if allowed
                  else {"allowed": False})
        return 201, {"kind": "SubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
                     "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}

    # ---- objects ----
    def _key(self, obj: dict[str, Any]) -> tuple[ResKey, str, str]:
        plural = _KIND_TO_PLURAL[obj["kind"]]
        m = obj["metadata"]
        return (_group_of(obj["apiVersion"]), plural), m.get("namespace", "default"), m["name"]

    def _emit(self, reskey: ResKey, etype: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        self._events.append((self._rv, reskey, etype, copy.deepcopy(obj), old))
        self._cond.notify_all()

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        m = obj.setdefault("metadata", {})
        m.setdefault("namespace", "default")
        m.setdefault("creationTimestamp", _now_ts())
        with self._cond:
            key = self._key(obj)
            if key in self._objects:
                raise ValueError(f"{key} exists")
            m.pop("resourceVersion", None)
            self._rv += 1
            m["uid"] = m.get("uid") or f"uid-{next(self._uid)}"
            m["resourceVersion"] = str(self._rv)
            self._objects[key] = obj
            self._emit(key[0], "ADDED", obj, None)
        return copy.deepcopy(obj)

    def get(self, kind: str, name: str, namespace: str = "default", group: str | None = None) -> dict[str, Any]:
        with self._cond:
            for (rk, ns, n), obj in self._objects.items():
                if (rk[1] == _KIND_TO_PLURAL[kind] and ns == namespace and n == name
                        and (group is None or rk[0] == group)):
                    return copy.deepcopy(obj)
        raise KeyError(f"{kind} {namespace}/{name}")

    def update(self, kind: str, name: str, mutate: Callable[[dict[str, Any]], None],
               namespace: str = "default", group: str | None = None) -> dict[str, Any]:
        """Apply ``mutate`` to a copy of the object and store it (MODIFIED event)."""
        obj = self.get(kind, name, namespace, group)
        with self._cond:
            key = self._key(obj)
            old = self._objects[key]
            mutate(obj)
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._objects[key] = obj
            self._emit(key[0], "MODIFIED", obj, copy.deepcopy(old))
        return copy.deepcopy(obj)

    def delete(self, kind: str, name: str, namespace: str = "default", group: str | None = None) -> None:
        obj = self.get(kind, name, namespace, group)
        with self._cond:
            key = self._key(obj)
            del self._objects[key]
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._emit(key[0], "DELETED", obj, None)

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store ``obj`` in place of the current object, like a PUT: ``KeyError`` if there is
        none, ``Conflict`` if ``metadata.resourceVersion`` is set and is not the current one."""
        obj = copy.deepcopy(obj)
        m = obj["metadata"]
        m.setdefault("namespace", "default")
        with self._cond:
            key = self._key(obj)
            old = self._objects.get(key)
            if old is None:
                raise KeyError(f"{key}")
            rv = m.get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise Conflict(f"the object has been modified (resourceVersion {rv}, "
                               f"now {old['metadata']['resourceVersion']})")
            for k in ("uid", "creationTimestamp"):
                if old["metadata"].get(k):
                    m[k] = old["metadata"][k]
            self._rv += 1
            m["resourceVersion"] = str(self._rv)
            self._objects[key] = obj
            self._emit(key[0], "MODIFIED", obj, copy.deepcopy(old))
        return copy.deepcopy(obj)

    # pod conveniences
    def set_pod_ready(self, name: str, ready: bool = True, namespace: str = "default") -> None:
        def mut(p: dict[str, Any]) -> None:
            p["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
        self.update("Pod", name, mut, namespace)

    def set_pod_ip(self, name: str, ip: str, namespace: str = "default") -> None:
        def mut(p: dict[str, Any]) -> None:
            p["status"]["podIP"] = ip
            p["status"]["podIPs"] = [{"ip": ip}]
        self.update("Pod", name, mut, namespace)

    def mark_deleting(self, name: str, namespace: str = "default") -> None:
        """What a graceful delete looks like first: deletionTimestamp set, pod still there."""
        def mut(p: dict[str, Any]) -> None:
            p["metadata"]["deletionTimestamp"] = _now_ts()
            p["metadata"]["deletionGracePeriodSeconds"] = 30
        self.update("Pod", name, mut, namespace)

    def set_labels(self, kind: str, name: str, labels: dict[str, str], namespace: str = "default") -> None:
        def mut(o: dict[str, Any]) -> None:
            o["metadata"]["labels"] = dict(labels)
        self.update(kind, name, mut, namespace)

    # ---- request handling (server threads) ----
    def _take_failure(self, path: str) -> int | None:
        with self._cond:
            for i, (status, pred) in enumerate(self._failures):
                if pred(path):
                    del self._failures[i]
                    return status
        return None

    def _list(self, reskey: ResKey, ns: str, labels: dict[str, str], fields: dict[str, str]) -> dict[str, Any]:
        version, kind = RESOURCES[reskey[1]][reskey[0]]
        with self._cond:
            items = [copy.deepcopy(o) for (rk, _, _), o in sorted(self._objects.items())
                     if rk == reskey and _matches(o, ns, labels, fields)]
            rv = self._rv
        api_version = f"{reskey[0]}/{version}" if reskey[0] else version
        for o in items:
            o.setdefault("apiVersion", api_version)
            o.setdefault("kind", kind)
        return {"kind": f"{kind}List", "apiVersion": api_version,
                "metadata": {"resourceVersion": str(rv)}, "items": items}

    def _watch(self, handler: _Handler, reskey: ResKey, ns: str, labels: dict[str, str],
               fields: dict[str, str], rv: int | None, bookmarks: bool, timeout: float) -> None:
        version, kind = RESOURCES[reskey[1]][reskey[0]]
        api_version = f"{reskey[0]}/{version}" if reskey[0] else version
        handler.start_chunked()
        deadline = time.monotonic() + timeout
        next_bookmark = time.monotonic() + self.bookmark_interval
        with self._cond:
            generation = self._generation
            if rv is None or rv == 0:  # "any": start from now, with synthetic ADDED for current state
                start = self._rv
                initial = [copy.deepcopy(o) for (rk, _, _), o in sorted(self._objects.items())
                           if rk == reskey and _matches(o, ns, labels, fields)]
            elif rv < self._compacted:
                handler.send_event({"type": "ERROR", "object": _status(
                    410, f"too old resource version: {rv} ({self._compacted})", "Expired")})
                handler.end_chunked()
                return
            else:
                start, initial = rv, []
        for o in initial:
            handler.send_event({"type": "ADDED", "object": o})
        pos = start
        while True:
            out: list[dict[str, Any]] = []
            with self._cond:
                if self._generation != generation:
                    return  # server "restarted": drop without a clean end
                if pos < self._compacted:  # fell behind a compaction, as etcd would say
                    out = [{"type": "ERROR", "object": _status(410, f"too old resource version: {pos}")}]
                    break
                for ev_rv, rk, etype, obj, old in self._events:
                    if ev_rv <= pos or rk != reskey:
                        continue
                    now_in = _matches(obj, ns, labels, fields)
                    was_in = _matches(old, ns, labels, fields)
                    if etype == "MODIFIED":
                        etype = ("MODIFIED" if was_in and now_in else "ADDED" if now_in
                                 else "DELETED" if was_in else "")
                    elif not now_in:
                        etype = ""
                    if etype:
                        out.append({"type": etype, "object": copy.deepcopy(obj)})
                pos = max(pos, self._rv)
                now = time.monotonic()
                if not out:
                    wait = min(deadline, next_bookmark if bookmarks else deadline) - now
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
            for ev in out:
                ev["object"].setdefault("apiVersion", api_version)
                ev["object"].setdefault("kind", kind)
                handler.send_event(ev)
            now = time.monotonic()
            if bookmarks and now >= next_bookmark:
                next_bookmark = now + self.bookmark_interval
                handler.send_event({"type": "BOOKMARK", "object": {
                    "kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": str(pos)}}})
            if now >= deadline:
                handler.end_chunked()
                return
        for ev in out:
            handler.send_event(ev)
        handler.end_chunked()


class Conflict(Exception):
    """A write lost an optimistic-concurrency race (HTTP 409)."""


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKube
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.fake._cond:
            self.fake._conns.add(self.connection)

    def finish(self) -> None:
        with self.fake._cond:
            self.fake._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send_json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def send_event(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _route(self, method: str) -> tuple[str, str, str, str, str | None, dict[str, str]] | None:
        """Common prologue: log, injected failures, path parsing. Returns
        (group, version, namespace, plural, name or None, query) or None if answered."""
        fake = self.fake
        if fake._server is None:  # going down: refuse like a closed port would
            self.close_connection = True
            return None
        url = urlsplit(self.path)
        with fake._cond:
            fake.requests.append(f"{method} {self.path}")
            fake.request_times.append(time.monotonic())
        failure = fake._take_failure(url.path)
        if failure is not None:
            self._send_json(failure, _status(failure, "injected failure"))
            return None
        parts = [p for p in url.path.split("/") if p]
        # /api/v1/namespaces/NS/PLURAL[/NAME]   or   /apis/G/V/namespaces/NS/PLURAL[/NAME]
        name: str | None = None
        if parts[:1] == ["api"] and len(parts) in (5, 6) and parts[2] == "namespaces":
            group, version, ns, plural = "", parts[1], parts[3], parts[4]
            name = parts[5] if len(parts) == 6 else None
        elif parts[:1] == ["apis"] and len(parts) in (6, 7) and parts[3] == "namespaces":
            group, version, ns, plural = parts[1], parts[2], parts[4], parts[5]
            name = parts[6] if len(parts) == 7 else None
        else:
            self._send_json(404, _status(404, f"unsupported path {url.path}"))
            return None
        known = RESOURCES.get(plural, {}).get(group)
        if known is None or known[0] != version or plural in fake._uninstalled:
            self._send_json(404, _status(404, f"the server could not find the requested resource ({url.path})"))
            return None
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        return group, version, ns, plural, name, query

    def _read_body(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._send_json(400, _status(400, "request body is not a JSON object", "BadRequest"))
            return None
        return body

    def _stored(self, group: str, ns: str, plural: str, name: str) -> dict[str, Any] | None:
        with self.fake._cond:
            obj = self.fake._objects.get(((group, plural), ns, name))
            return copy.deepcopy(obj) if obj is not None else None

    def _typed(self, group: str, version: str, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        kind = RESOURCES[plural][group][1]
        obj.setdefault("apiVersion", f"{group}/{version}" if group else version)
        obj.setdefault("kind", kind)
        return obj

    def do_GET(self) -> None:
        route = self._route("GET")
        if route is None:
            return
        group, version, ns, plural, name, q = route
        fake = self.fake
        if name is not None:
            obj = self._stored(group, ns, plural, name)
            if obj is None:
                self._send_json(404, _status(404, f'{plural} "{name}" not found'))
            else:
                self._send_json(200, self._typed(group, version, plural, obj))
            return
        labels = _parse_selector(q.get("labelSelector"))
        fields = _parse_selector(q.get("fieldSelector"))
        if q.get("watch") in ("1", "true", "True"):
            rv_s = q.get("resourceVersion")
            with fake._cond:
                fake._open_watches[plural] = fake._open_watches.get(plural, 0) + 1
            try:
                fake._watch(self, (group, plural), ns, labels, fields, int(rv_s) if rv_s else None,
                            q.get("allowWatchBookmarks") in ("true", "True", "1"),
                            float(q.get("timeoutSeconds") or 30))
            except OSError:
                pass
            finally:
                with fake._cond:
                    fake._open_watches[plural] -= 1
            self.close_connection = True
            return
        self._send_json(200, fake._list((group, plural), ns, labels, fields))

    _REVIEWS = {"/apis/authentication.k8s.io/v1/tokenreviews": "_token_review",
                "/apis/authorization.k8s.io/v1/subjectaccessreviews": "_access_review"}

    def _review(self) -> bool:
        """Cluster-scoped review APIs (TokenReview, SubjectAccessReview): True if answered."""
        path = urlsplit(self.path).path.rstrip("/")
        review = self._REVIEWS.get(path)
        if review is None:
            return False
        fake = self.fake
        if fake._server is None:
            self.close_connection = True
            return True
        with fake._cond:
            fake.requests.append(f"POST {self.path}")
            fake.request_times.append(time.monotonic())
        failure = fake._take_failure(path)
        if failure is not None:
            self._send_json(failure, _status(failure, "injected failure"))
            return True
        body = self._read_body()
        if body is not None:
            self._send_json(*getattr(fake, review)(body))
        return True

    def do_POST(self) -> None:
        if self._review():
            return
        route = self._route("POST")
        if route is None:
            return
        group, version, ns, plural, name, _ = route
        body = self._read_body()
        if body is None:
            return
        if name is not None:
            self._send_json(405, _status(405, "POST to a named object", "MethodNotAllowed"))
            return
        body = self._typed(group, version, plural, body)
        meta = body.setdefault("metadata", {})
        meta["namespace"] = ns
        if not meta.get("name"):
            self._send_json(422, _status(422, "metadata.name: Required value", "Invalid"))
            return
        try:
            created = self.fake.add(body)
        except ValueError:
            self._send_json(409, _status(409, f'{plural} "{meta["name"]}" already exists', "AlreadyExists"))
            return
        self._send_json(201, created)

    def do_PUT(self) -> None:
        route = self._route("PUT")
        if route is None:
            return
        group, version, ns, plural, name, _ = route
        body = self._read_body()
        if body is None:
            return
        body = self._typed(group, version, plural, body)
        meta = body.setdefault("metadata", {})
        meta["namespace"] = ns
        if name is None or meta.get("name") != name:
            self._send_json(400, _status(400, "the name of the object does not match the URL", "BadRequest"))
            return
        try:
            stored = self.fake.replace(body)
        except KeyError:
            self._send_json(404, _status(404, f'{plural} "{name}" not found'))
            return
        except Conflict as exc:
            self._send_json(409, _status(409, f'Operation cannot be fulfilled on {plural} "{name}": {exc}'))
            return
        self._send_json(200, stored)

    def do_DELETE(self) -> None:
        route = self._route("DELETE")
        if route is None:
            return
        group, _version, ns, plural, name, _ = route
        if name is None:
            self._send_json(405, _status(405, "collection DELETE is not supported", "MethodNotAllowed"))
            return
        obj = self._stored(group, ns, plural, name)
        if obj is None:
            self._send_json(404, _status(404, f'{plural} "{name}" not found'))
            return
        self.fake.delete(RESOURCES[plural][group][1], name, ns, group)
        self._send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                              "details": {"name": name, "kind": plural}})


# ---- object builders ----
def pod(name: str, ip: str | None, labels: dict[str, str], *, ready: bool = True,
        namespace: str = "default", annotations: dict[str, str] | None = None,
        created_offset: float = 0.0) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running",
                              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels),
                            "creationTimestamp": _now_ts(created_offset)}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest"}]},
            "status": status}


def pool(name: str, selector: dict[str, str], ports: Iterable[int], *, namespace: str = "default",
         legacy: bool = False, epp: str = "epp") -> dict[str, Any]:
    ports = list(ports)
    if legacy:
        return {"apiVersion": f"{X_GROUP}/v1alpha2", "kind": "InferencePool",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"selector": dict(selector), "targetPortNumber": ports[0],
                         "extensionRef": {"name": epp}}}
    return {"apiVersion": f"{POOL_GROUP}/v1", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": dict(selector)},
                     "targetPorts": [{"number": p} for p in ports],
                     "endpointPickerRef": {"name": epp, "port": {"number": 9002}}}}


def _ref(pool_name: str) -> dict[str, str]:
    return {"group": POOL_GROUP, "kind": "InferencePool", "name": pool_name}


def objective(name: str, pool_name: str, priority: int | None = None, *, namespace: str = "default",
              created_offset: float = 0.0) -> dict[str, Any]:
    spec: dict[str, Any] = {"poolRef": _ref(pool_name)}
    if priority is not None:
        spec["priority"] = priority
    return {"apiVersion": f"{X_GROUP}/v1alpha2", "kind": "InferenceObjective",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": _now_ts(created_offset)},
            "spec": spec}


def rewrite(name: str, pool_name: str, rules: list[tuple[list[str], list[tuple[str, int]]]], *,
            namespace: str = "default", created_offset: float = 0.0) -> dict[str, Any]:
    """rules: [(exact model names or [] for every model, [(target, weight), ...]), ...]"""
    return {"apiVersion": f"{X_GROUP}/v1alpha2", "kind": "InferenceModelRewrite",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": _now_ts(created_offset)},
            "spec": {"poolRef": _ref(pool_name), "rules": [
                {"matches": [{"model": {"type": "Exact", "value": m}} for m in matches],
                 "targets": [{"modelRewrite": t, "weight": w} for t, w in targets]}
                for matches, targets in rules]}}


def inference_model(name: str, pool_name: str, model_name: str, criticality: str | None = None,
                    targets: list[tuple[str, int]] | None = None, *, namespace: str = "default",
                    created_offset: float = 0.0) -> dict[str, Any]:
    spec: dict[str, Any] = {"modelName": model_name,
                            "poolRef": {"group": X_GROUP, "kind": "InferencePool", "name": pool_name}}
    if criticality:
        spec["criticality"] = criticality
    if targets:
        spec["targetModels"] = [{"name": t, "weight": w} for t, w in targets]
    return {"apiVersion": f"{X_GROUP}/v1alpha2", "kind": "InferenceModel",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": _now_ts(created_offset)},
            "spec": spec}


def lease(name: str, holder: str | None, duration: int = 15, *, namespace: str = "default",
          transitions: int = 0) -> dict[str, Any]:
    """A coordination.k8s.io/v1 Lease (e.g. one held by somebody else)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    spec: dict[str, Any] = {"leaseDurationSeconds": duration, "acquireTime": now, "renewTime": now,
                            "leaseTransitions": transitions}
    if holder is not None:
        spec["holderIdentity"] = holder
    return {"apiVersion": f"{COORDINATION_GROUP}/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}
