"""The Prometheus endpoint (``--metrics-port``, 9090): prometheus_client's WSGI app behind an
optional authentication check, served by a threaded WSGI server.

It runs on its own threads, as ``prometheus_client.start_http_server`` did: rendering the
registry and the (blocking) Kubernetes reviews of ``epp.runner.auth`` never touch the ext_proc
event loop. The exposition itself (text or OpenMetrics by ``Accept``, gzip, ``name[]``
filters) is prometheus_client's ``make_wsgi_app``; this module only puts the gate in front.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from epp.runner.auth import AuthDecision

_REASONS = {401: "Unauthorized", 403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}


class MetricsAuth(Protocol):
    """Decides whether a caller may read a path (``epp.runner.auth.KubernetesMetricsAuth``)."""

    def check(self, authorization: str | None, path: str, verb: str = "get") -> AuthDecision: ...


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per request; daemon threads, so a stuck scrape never holds the process."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        return


def gated_app(registry: CollectorRegistry, auth: MetricsAuth | None) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: the registry's exposition, after ``auth`` (when given) allowed the caller."""
    metrics = make_wsgi_app(registry)
    if auth is None:
        return metrics

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        verb = "get" if environ.get("REQUEST_METHOD", "GET") in ("GET", "HEAD") else environ["REQUEST_METHOD"].lower()
        decision = auth.check(environ.get("HTTP_AUTHORIZATION"), environ.get("PATH_INFO") or "/", verb)
        if decision.allowed:
            return metrics(environ, start_response)
        body = decision.body()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if decision.status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="epp metrics"'))
        start_response(f"{decision.status} {_REASONS.get(decision.status, 'Error')}", headers)
        return [body]

    return app


def start_metrics_server(
    registry: CollectorRegistry, port: int, address: str = "0.0.0.0", auth: MetricsAuth | None = None
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` on ``address:port`` (0 = any free port: ``server.server_port``).

    Returns the server (``shutdown()`` stops the loop, ``server_close()`` the socket) and its
    thread, like ``prometheus_client.start_http_server``."""
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]

    class Server(_Server):
        address_family = family

    httpd = make_server(str(sockaddr[0]), port, gated_app(registry, auth), Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                              name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread
