"""Who decides for a model, so two picker replicas never both load it for the same demand.

* **One replica**, or **active-passive HA** (``--ha-enable-leader-election``): the replica
  that acts is the one that is ready — the leader. A standby keeps its view of the pods warm
  but loads and unloads nothing.
* **Several active replicas without an election** (``peers:`` in the placement config, and
  ``--model-placement-self`` naming this replica's own entry): each model has one owner, the
  peer with the highest rendezvous hash ``xxh64(peer + model)``. Every replica computes the
  same owner from the same list, without talking. A replica that needs a model loaded and is
  not its owner asks the owner (``POST /placement/v1/ensure``) and waits for its answer: the
  owner loads it once, however many replicas asked. A peer that cannot be reached is skipped
  for ``retry`` seconds, and ownership of its models passes to the next-highest hash — the
  same one on every replica that sees it down.

Routing never depends on this: every replica routes from the pods' own reports.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson
import xxhash
from aiohttp import web

from epp.framework import errors
from epp.framework.errors import RequestError

ENSURE_PATH = "/placement/v1/ensure"
STATE_PATH = "/placement/v1/state"


class PeerUnreachable(Exception):
    """The owner did not answer (down, partitioned, too slow)."""


@dataclass(slots=True)
class Ownership:
    #: this replica's URL in ``peers`` (None: no peers, decide alone)
    self_url: str | None = None
    peers: tuple[str, ...] = ()
    #: with leader election: whether this replica leads (only the leader acts)
    is_leader: Callable[[], bool] | None = None
    retry: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _down_until: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.peers and self.self_url not in self.peers:
            raise ValueError(f"this replica ({self.self_url or 'unset'}) must be one of the peers: "
                             f"{', '.join(self.peers)}")

    def acting(self) -> bool:
        """Whether this replica may load and unload at all (False on an HA standby)."""
        return self.is_leader is None or self.is_leader()

    def owner(self, model: str) -> str | None:
        """The peer deciding for ``model``; None when it is this replica."""
        if not self.peers:
            return None
        now = self.clock()
        best: tuple[int, str] | None = None
        for peer in self.peers:
            if peer != self.self_url and self._down_until.get(peer, 0.0) > now:
                continue
            score = (xxhash.xxh64_intdigest(f"{peer}\0{model}".encode()), peer)
            if best is None or score > best:
                best = score
        assert best is not None  # self is always a candidate
        return None if best[1] == self.self_url else best[1]

    def owns(self, model: str) -> bool:
        return self.acting() and self.owner(model) is None

    def unreachable(self, peer: str) -> None:
        self._down_until[peer] = self.clock() + self.retry


async def ask_owner(session: aiohttp.ClientSession, peer: str, model: str, budget: float) -> list[str]:
    """Ask ``peer`` to have ``model`` loaded; returns the endpoints holding it.

    Raises ``RequestError`` with the owner's status and message when it answered with an
    error (e.g. 503: the load failed), ``PeerUnreachable`` when it did not answer."""
    try:
        async with session.post(peer + ENSURE_PATH, data=orjson.dumps({"model": model}),
                                headers={"content-type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=budget)) as resp:
            raw = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise PeerUnreachable(f"{peer}: {type(exc).__name__}: {exc}") from None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise PeerUnreachable(f"{peer}: answered HTTP {status} without JSON") from None
    if status == 200 and isinstance(doc, dict) and isinstance(doc.get("endpoints"), list):
        return [str(k) for k in doc["endpoints"]]
    err = doc.get("error") if isinstance(doc, dict) else None
    message = str(err.get("message", "")) if isinstance(err, dict) else ""
    code = str(err.get("code", "")) if isinstance(err, dict) else ""
    if not code:
        code = errors.NOT_FOUND if status == 404 else errors.SERVICE_UNAVAILABLE
    raise RequestError(code, message or f"the placement owner {peer} answered HTTP {status}", status)


def peer_app(ensure: Callable[[str], Awaitable[list[str]]], state: Callable[[], dict[str, object]]) -> web.Application:
    """The placement API peers call: ``POST /placement/v1/ensure {"model"}`` answers once the
    model is loaded somewhere (``{"endpoints": [...]}``) or with the error a request would
    get; ``GET /placement/v1/state`` shows the copies this replica knows (debugging, tests)."""

    async def handle_ensure(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            model = body["model"]
            if not isinstance(model, str) or not model:
                raise ValueError
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return web.Response(status=400, content_type="application/json",
                                body=errors.bad_request('expected {"model": "<name>"}').body())
        try:
            keys = await ensure(model)
        except RequestError as exc:  # the message alone: the asking replica wraps it again
            return web.Response(status=exc.status, content_type="application/json",
                                body=orjson.dumps({"error": {"message": exc.message, "code": exc.code}}))
        return web.Response(content_type="application/json", body=orjson.dumps({"endpoints": keys}))

    async def handle_state(request: web.Request) -> web.Response:
        return web.Response(content_type="application/json", body=orjson.dumps(state()))

    app = web.Application()
    app.router.add_post(ENSURE_PATH, handle_ensure)
    app.router.add_get(STATE_PATH, handle_state)
    return app
