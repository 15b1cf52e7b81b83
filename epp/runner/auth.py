"""Who may read ``/metrics``: the caller's bearer token checked by the Kubernetes API server.

GIE's picker protects its metrics endpoint the way Kubernetes components do
(``--metrics-endpoint-auth``, on by default): the token is sent to the API server in a
``TokenReview`` (authentication: whose token is it?) and the resulting user in a
``SubjectAccessReview`` for the non-resource URL (authorisation: may that user ``get``
``/metrics``?). Prometheus is then granted access with plain RBAC (a ClusterRole with
``nonResourceURLs: [/metrics]``, ``verbs: [get]``), and the picker's ServiceAccount needs
``create`` on ``tokenreviews`` and ``subjectaccessreviews``.

Answers: no or malformed token, or a token the API server does not accept → 401; a valid
token whose user is not allowed → 403; the API server unreachable → 503 and a picker that may
not create the reviews → 500 (both name the cause, neither is cached). Decisions are cached
for ``cache_ttl`` seconds per (token, path), as the API server's own delegated authn/authz
caches do, so a scrape every few seconds costs two API calls per ``cache_ttl``, not per scrape.

Everything here blocks (the official client is synchronous): it runs on the metrics HTTP
server's threads, never on the ext_proc event loop.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

log = logging.getLogger(__name__)

#: how long an API call may take before the scrape is answered 503
REVIEW_TIMEOUT = 5.0


@dataclass(slots=True, frozen=True)
class AuthDecision:
    """The HTTP answer for one caller: 200 lets the request through."""

    status: int
    message: str = ""

    @property
    def allowed(self) -> bool:
        return self.status == 200

    def body(self) -> bytes:
        """The project's JSON error body (``{"error": {"message", "type", "code"}}``)."""
        kind = {401: "Unauthorized", 403: "Forbidden", 503: "ServiceUnavailable"}.get(self.status, "InternalError")
        return orjson.dumps({"error": {"message": self.message, "type": kind, "code": self.status}})


ALLOWED = AuthDecision(200)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


@dataclass(slots=True)
class KubernetesMetricsAuth:
    """TokenReview + SubjectAccessReview against the API server ``api_client`` talks to.

    ``api_client`` is a ``kubernetes.client.ApiClient`` (in-cluster config in a pod; the
    kubeconfig elsewhere). Thread-safe: the metrics server answers scrapes on several threads.
    """

    api_client: Any
    cache_ttl: float = 10.0
    max_cached: int = 1024
    _cache: dict[tuple[bytes, str, str], tuple[float, AuthDecision]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, authorization: str | None, path: str, verb: str = "get") -> AuthDecision:
        token = bearer_token(authorization)
        if token is None:
            return AuthDecision(401, "a bearer token is required (Authorization: Bearer <token>)")
        key = (hashlib.sha256(token.encode()).digest(), path, verb)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        decision = self._review(token, path, verb)
        if decision.status in (200, 401, 403):  # API trouble is not remembered
            with self._lock:
                if len(self._cache) >= self.max_cached:
                    self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                    if len(self._cache) >= self.max_cached:
                        self._cache.clear()
                self._cache[key] = (now + self.cache_ttl, decision)
        return decision

    def _review(self, token: str, path: str, verb: str) -> AuthDecision:
        from kubernetes import client
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            tr = client.AuthenticationV1Api(self.api_client).create_token_review(
                client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token)),
                _request_timeout=REVIEW_TIMEOUT,
            )
            status = tr.status
            if status is None or not status.authenticated or status.user is None:
                reason = (status.error if status is not None else None) or "the token was not accepted"
                return AuthDecision(401, f"unauthorized: {reason}")
            user = status.user
            sar = client.AuthorizationV1Api(self.api_client).create_subject_access_review(
                client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
                    user=user.username, uid=user.uid, groups=user.groups, extra=user.extra,
                    non_resource_attributes=client.V1NonResourceAttributes(path=path, verb=verb),
                )),
                _request_timeout=REVIEW_TIMEOUT,
            )
        except ApiException as exc:
            what = "tokenreviews or subjectaccessreviews"
            log.warning("metrics auth: the API server refused a review", extra={"status": exc.status})
            return AuthDecision(500, f"the picker cannot create {what} (API server answered {exc.status}: "
                                     f"{exc.reason}); check its RBAC")
        except (OSError, HTTPError) as exc:  # connection refused, timeout, TLS
            log.warning("metrics auth: API server unreachable", extra={"error": str(exc)})
            return AuthDecision(503, f"cannot verify the token: the Kubernetes API server is unreachable ({exc})")
        s = sar.status
        if s is not None and s.allowed:
            return ALLOWED
        reason = (s.reason if s is not None else None) or "no RBAC rule allows it"
        return AuthDecision(403, f"forbidden: user {user.username!r} may not {verb} {path}: {reason}")


def load_metrics_auth(cache_ttl: float = 10.0) -> KubernetesMetricsAuth:
    """The auth for ``--metrics-endpoint-auth`` from the pod's service account (or the
    kubeconfig); blocking. Raises ``OSError`` naming the flag when there are no credentials."""
    from kubernetes.config import ConfigException

    from epp.discovery.kubernetes import load_api_client

    try:
        api = load_api_client()
    except ConfigException as exc:
        raise OSError(f"--metrics-endpoint-auth needs Kubernetes credentials (in-cluster service account or "
                      f"a kubeconfig): {exc}; turn it off with --metrics-endpoint-auth=false") from None
    return KubernetesMetricsAuth(api, cache_ttl=cache_ttl)
