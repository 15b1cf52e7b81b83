"""Follows the datastore: one KV-event subscriber per endpoint, purge when one leaves.

Where an endpoint's events come from (first match wins):

1. endpoint labels ``epp.kv-events-port`` / ``epp.kv-events-replay-port`` (a pool-file entry's
   ``labels``, or the pod's labels in Kubernetes);
2. ``port_offset`` / ``replay_port_offset``: serving port + offset (local pools where every
   pod shares one IP, e.g. ``epp sim --port 8001 --kv-events-port 5557`` → offset -2444);
3. the fixed ``port`` (vLLM's default ``tcp://*:5557``) / ``replay_port`` (default: none).

The subscriber connects to the endpoint's address (vLLM binds ``tcp://*:<port>``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq.asyncio

from epp.datalayer.kvevents.index import KVBlockIndex
from epp.datalayer.kvevents.subscriber import KVEventSubscriber
from epp.framework.datalayer import Endpoint, PoolView, format_hostport

if TYPE_CHECKING:
    from epp.metrics import EppMetrics

log = logging.getLogger(__name__)

PORT_LABEL = "epp.kv-events-port"
REPLAY_PORT_LABEL = "epp.kv-events-replay-port"


@dataclass(slots=True, frozen=True)
class KVEventsConfig:
    port: int = 5557
    port_offset: int | None = None
    replay_port: int | None = None
    replay_port_offset: int | None = None
    topic_filter: str = ""
    replay_timeout: float = 2.0  # inactivity
    replay_retries: int = 3


def _label_port(ep: Endpoint, label: str) -> int | None:
    raw = ep.labels.get(label)
    if raw is None:
        return None
    try:
        port = int(raw)
    except ValueError:
        log.warning("bad port label", extra={"endpoint": ep.key, "label": label, "value": raw})
        return None
    return port if 0 < port < 65536 else None


def event_ports(ep: Endpoint, cfg: KVEventsConfig) -> tuple[int, int | None]:
    """(PUB port, replay port or None) of an endpoint."""
    port = _label_port(ep, PORT_LABEL)
    if port is None:
        port = ep.port + cfg.port_offset if cfg.port_offset is not None else cfg.port
    replay = _label_port(ep, REPLAY_PORT_LABEL)
    if replay is None:
        if cfg.replay_port_offset is not None:
            replay = ep.port + cfg.replay_port_offset
        else:
            replay = cfg.replay_port
    return port, replay


@dataclass(slots=True)
class KVEventsManager:
    datastore: PoolView
    index: KVBlockIndex
    config: KVEventsConfig = field(default_factory=KVEventsConfig)
    metrics: EppMetrics | None = None
    subscribers: dict[str, KVEventSubscriber] = field(default_factory=dict)
    _ctx: zmq.asyncio.Context | None = None
    _started: bool = False

    def __post_init__(self) -> None:
        self.datastore.add_listener(self.on_endpoints_changed)

    async def start(self) -> None:
        """Subscribe to every current endpoint (and to later ones as they are added)."""
        if self._started:
            return
        self._started = True
        self._ctx = zmq.asyncio.Context()
        for ep in self.datastore.endpoints():
            self._subscribe(ep)

    def _subscribe(self, ep: Endpoint) -> None:
        if ep.key in self.subscribers or self._ctx is None:
            return
        port, replay = event_ports(ep, self.config)
        cfg = self.config
        sub = KVEventSubscriber(
            endpoint=ep.key,
            url=f"tcp://{format_hostport(ep.address, port)}",
            index=self.index,
            ctx=self._ctx,
            replay_url=None if replay is None else f"tcp://{format_hostport(ep.address, replay)}",
            topic_filter=cfg.topic_filter,
            replay_timeout=cfg.replay_timeout,
            replay_retries=cfg.replay_retries,
            metrics=self.metrics,
        )
        self.subscribers[ep.key] = sub
        sub.start()
        self._report()
        log.info("kv-event subscriber started", extra={"endpoint": ep.key, "url": sub.url,
                                                       "replay": sub.replay_url})

    def on_endpoints_changed(self, added: tuple[Endpoint, ...], removed: tuple[Endpoint, ...]) -> None:
        """Datastore listener: subscribe to new endpoints, drop and purge removed ones."""
        for ep in removed:
            sub = self.subscribers.pop(ep.key, None)
            if sub is not None:
                sub.cancel()
            self.index.remove_endpoint(ep.key)
        if self._started:
            for ep in added:
                self._subscribe(ep)
        self._report()

    async def close(self) -> None:
        subs = list(self.subscribers.values())
        self.subscribers.clear()
        for sub in subs:
            await sub.close()
        self._started = False
        if self._ctx is not None:
            with contextlib.suppress(Exception):
                self._ctx.destroy(linger=0)
            self._ctx = None
        self._report()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.kv_event_subscribers.set(len(self.subscribers))
