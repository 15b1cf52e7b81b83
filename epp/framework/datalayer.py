"""The data layer's shared types: endpoints as the picker sees them, the pool view plugins
read, the data-source plugin interfaces, and the endpoint labels other programs agree on.

An endpoint's state has two sources that age differently:

* ``metrics`` is what the model server last published on ``/metrics`` (scraped in the
  background every ``--refresh-metrics-interval``); it lags reality by up to one interval.
* ``inflight`` / ``inflight_tokens`` are the picker's own counts of requests it sent there
  and that have not finished yet. They are updated synchronously at pick time, so a burst of
  requests between two scrapes does not pile onto the pod that looked idle at the last scrape.

Scorers read both. Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from epp.framework.plugin import Plugin


def format_hostport(address: str, port: int) -> str:
    """``ip:port``, bracketing IPv6 addresses the way Envoy and GIE expect."""
    if ":" in address and not address.startswith("["):
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def parse_hostport(value: str) -> tuple[str, int | None]:
    """Split ``ip``, ``ip:port``, ``[v6]`` or ``[v6]:port`` into (ip, port or None).

    Raises ValueError naming the value when it is not an address.
    """
    value = value.strip()
    if not value:
        raise ValueError("empty address")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError(f"unterminated IPv6 bracket in {value!r}")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:] else None
        return host, port
    if value.count(":") == 1:
        host, _, port_s = value.partition(":")
        if not port_s.isdigit():
            raise ValueError(f"bad port in {value!r}")
        return host, int(port_s)
    if value.count(":") > 1:  # bare IPv6
        ipaddress.IPv6Address(value)
        return value, None
    return value, None


@dataclass(slots=True)
class EndpointMetrics:
    """The engine gauges the scheduler uses (GIE's per-endpoint fields).

    ``updated_at`` is a ``time.monotonic()`` stamp of the last successful scrape; 0 means never.
    """

    waiting_queue_size: int = 0
    running_requests_size: int = 0
    kv_cache_usage: float = 0.0  # fraction 0..1
    active_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_adapters: int = 0
    #: wall-clock time (``time.time()``) of that adapter report: vLLM's ``lora_requests_info``
    #: value is the time it last set the series, so a stale report is not mistaken for recent use
    adapters_at: float = 0.0
    cache_block_size: int | None = None  # tokens per KV block (vllm:cache_config_info block_size)
    cache_num_blocks: int | None = None  # vllm:cache_config_info num_gpu_blocks
    updated_at: float = 0.0


@dataclass(slots=True, eq=False)
class Endpoint:
    """One schedulable target. Identity is by object; ``key`` (``ip:port``) is unique per pool.

    ``name`` follows GIE (``<pod>-rank-<i>`` in Kubernetes; free-form in a static pool).
    ``labels`` are the pod's labels (P/D role, engine type, ...).
    """

    name: str
    address: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    # Picker-side load, changed at pick time and on response end / stream reset.
    inflight: int = 0
    inflight_tokens: int = 0
    #: ``time.monotonic()`` of the picker's last pick of this endpoint (0 = never); breaks
    #: near-ties so equally good endpoints are taken in turn, not at random
    last_picked: float = 0.0
    # Where to scrape metrics (defaults to the serving address).
    metrics_host: str | None = None
    metrics_port: int | None = None
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = format_hostport(self.address, self.port)

    def is_fresh(self, now: float, staleness: float) -> bool:
        """True when the last scrape is younger than ``staleness`` seconds."""
        return self.metrics.updated_at > 0 and (now - self.metrics.updated_at) <= staleness

    def __repr__(self) -> str:  # short, for logs and test failures
        return f"Endpoint({self.name} {self.key})"


#: Called with (added, removed) endpoints whenever the pool changes.
EndpointsListener = Callable[[tuple[Endpoint, ...], tuple[Endpoint, ...]], None]


class PoolView(Protocol):
    """What plugins and background readers may see of the pool (``epp.datalayer.Datastore``
    implements it): an immutable snapshot of the endpoints, and change notifications."""

    def endpoints(self) -> tuple[Endpoint, ...]: ...

    def add_listener(self, listener: EndpointsListener) -> None: ...


# --------------------------------------------------------------------------- labels

#: P/D role of a pod (llm-d). Read by the P/D filters and written by local P/D topologies;
#: here so that both sides import it without importing each other.
ROLE_LABEL = "llm-d.ai/role"
ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"
ROLE_PREFILL_DECODE = "prefill-decode"
ROLE_BOTH = "both"  # deprecated spelling of prefill-decode
ROLE_ENCODE_PREFILL = "encode-prefill"
ROLE_ENCODE_PREFILL_DECODE = "encode-prefill-decode"


# --------------------------------------------------------------------------- data sources


class DataSource(Plugin):
    """Where an endpoint's metrics are read (GIE's ``metrics-data-source``)."""

    @abstractmethod
    def metrics_url(self, endpoint: Endpoint) -> str:
        """The URL the scraper fetches for ``endpoint``."""

    @property
    @abstractmethod
    def verify_tls(self) -> bool:
        """Whether an https source checks the server certificate."""


class MetricsExtractor(Plugin):
    """Turns a model server's Prometheus text into ``EndpointMetrics`` fields (GIE's
    ``core-metrics-extractor``): which engine a pod runs and that engine's metric specs."""

    @property
    @abstractmethod
    def engine_label_key(self) -> str: ...

    @property
    @abstractmethod
    def default_engine(self) -> str: ...

    @abstractmethod
    def engine_overrides(self) -> Mapping[str, Mapping[str, str]] | None:
        """Per engine type, metric specs replacing the built-in ones (None: built-ins)."""


