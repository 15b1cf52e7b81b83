"""Static (non-Kubernetes) discovery: ``--endpoints ip:port,...`` or a pool file.

Pool file format (YAML; unknown keys are errors so typos fail loudly)::

    pool: {name: my-pool, namespace: default}     # optional
    endpoints:                                    # may be empty: a pool scaled to zero
    - name: vllm-0                                # optional, default ep-<ip>-<port>
      address: 10.0.0.1                           # an IP (v4 or v6); may carry the port:
      port: 8000                                  #   address: 10.0.0.1:8000 / [::1]:8000
      labels: {llm-d.ai/role: decode}             # optional, strings only
      metricsPort: 8000                           # optional, default: port
    objectives:                                   # optional: InferenceObjectives without Kubernetes
    - {name: premium, priority: 10}               #   selected by header x-gateway-inference-objective
    - {name: batch, priority: -1}                 #   negative priority = sheddable

Addresses must be IP literals: the gateway routes to the picked endpoint through an
original-destination cluster, which takes ``ip:port`` and does not resolve names.

The file is polled (stat every ``poll_interval`` seconds) and re-read when it changes, so a
pool can grow from zero endpoints while the picker runs. A change that fails validation is
logged and the last good set is kept. A zero-byte / blank file is treated as invalid (write
``endpoints: []`` for an empty pool): editors that truncate before writing would otherwise
briefly empty the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from epp.datalayer.datastore import Datastore, Objective, PoolInfo
from epp.discovery.base import Discovery
from epp.framework.datalayer import Endpoint, parse_hostport

log = logging.getLogger(__name__)


class PoolFileError(ValueError):
    """The pool file (or ``--endpoints`` flag) is invalid; the message names file and field."""


def default_endpoint_name(address: str, port: int) -> str:
    return f"ep-{address}-{port}"


def _normalize_ip(host: str) -> str:
    """Canonical text of an IP literal (``0:0::1`` → ``::1``); ValueError if not an IP."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address (the gateway's original-destination cluster needs "
            "ip:port, host names are not resolved)") from None


# ---- the file schema ----

class _PoolRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    namespace: str = Field(default="default", min_length=1)


class _EndpointEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    name: str | None = Field(default=None, min_length=1)
    address: str
    port: int | None = Field(default=None, ge=1, lt=65536)
    labels: dict[str, str] = Field(default_factory=dict)
    metrics_port: int | None = Field(default=None, alias="metricsPort", ge=1, lt=65536)

    # filled by the validators
    _host: str = ""
    _port: int = 0

    @field_validator("address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        host, port = parse_hostport(v)
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port {port} out of range 1..65535")
        _normalize_ip(host)
        return v.strip()

    @model_validator(mode="after")
    def _resolve(self) -> _EndpointEntry:
        host, addr_port = parse_hostport(self.address)
        if addr_port is not None and self.port is not None and addr_port != self.port:
            raise ValueError(
                f"address {self.address!r} carries port {addr_port} but port is {self.port}")
        port = self.port if self.port is not None else addr_port
        if port is None:
            raise ValueError("port is required (set `port:` or write `address: ip:port`)")
        self._host = _normalize_ip(host)
        self._port = port
        return self

    def to_endpoint(self) -> Endpoint:
        return Endpoint(
            name=self.name or default_endpoint_name(self._host, self._port),
            address=self._host,
            port=self._port,
            labels=dict(self.labels),
            metrics_port=self.metrics_port,
        )


class _ObjectiveEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    priority: int = 0


class _PoolFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool: _PoolRef | None = None
    endpoints: list[_EndpointEntry] | None = None
    objectives: list[_ObjectiveEntry] | None = None


@dataclass(slots=True, frozen=True)
class PoolDefinition:
    """Everything a pool file defines."""

    pool: PoolInfo
    endpoints: list[Endpoint]
    objectives: dict[str, Objective]


def _format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = _format_loc(err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def _check_unique(source: str, endpoints: Sequence[Endpoint]) -> None:
    by_key: dict[str, int] = {}
    by_name: dict[str, int] = {}
    errors = []
    for i, ep in enumerate(endpoints):
        if ep.key in by_key:
            errors.append(f"{source}: endpoints[{i}]: duplicate address {ep.key} "
                          f"(also endpoints[{by_key[ep.key]}])")
        else:
            by_key[ep.key] = i
        if ep.name in by_name:
            errors.append(f"{source}: endpoints[{i}].name: duplicate name {ep.name!r} "
                          f"(also endpoints[{by_name[ep.name]}])")
        else:
            by_name[ep.name] = i
    if errors:
        raise PoolFileError("\n".join(errors))


def parse_pool_text(text: str, source: str = "<pool>", *,
                    default_pool: PoolInfo | None = None) -> tuple[PoolInfo, list[Endpoint]]:
    """Validate pool-file YAML text → (pool info, endpoints). Raises PoolFileError."""
    d = parse_pool_definition(text, source, default_pool=default_pool)
    return d.pool, d.endpoints


def parse_pool_definition(text: str, source: str = "<pool>", *,
                          default_pool: PoolInfo | None = None) -> PoolDefinition:
    """Validate pool-file YAML text. Raises PoolFileError naming the file and field."""
    if not text.strip():
        raise PoolFileError(f"{source}: file is empty (write `endpoints: []` for an empty pool)")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PoolFileError(f"{source}: not valid YAML: {e}") from None
    if raw is None:
        raise PoolFileError(f"{source}: file has no content (write `endpoints: []` for an empty pool)")
    if not isinstance(raw, dict):
        raise PoolFileError(f"{source}: expected a mapping with `endpoints:`, got {type(raw).__name__}")
    try:
        model = _PoolFile.model_validate(raw)
    except ValidationError as e:
        raise PoolFileError(_format_validation_error(source, e)) from None
    endpoints = [entry.to_endpoint() for entry in model.endpoints or ()]
    _check_unique(source, endpoints)
    base = default_pool or PoolInfo()
    if model.pool is not None:
        base = PoolInfo(name=model.pool.name, namespace=model.pool.namespace,
                        app_protocol=base.app_protocol)
    pool = PoolInfo(name=base.name, namespace=base.namespace,
                    target_ports=tuple(sorted({ep.port for ep in endpoints})),
                    app_protocol=base.app_protocol)
    objectives: dict[str, Objective] = {}
    for i, o in enumerate(model.objectives or ()):
        if o.name in objectives:
            raise PoolFileError(f"{source}: objectives[{i}].name: duplicate objective {o.name!r}")
        objectives[o.name] = Objective(o.name, o.priority)
    return PoolDefinition(pool, endpoints, objectives)


def load_pool_file(path: str | os.PathLike[str], *,
                   default_pool: PoolInfo | None = None) -> PoolDefinition:
    """Read and validate a pool file. Raises PoolFileError naming the file and the field."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PoolFileError(f"{source}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise PoolFileError(f"{source}: not UTF-8 text: {e}") from None
    return parse_pool_definition(text, source, default_pool=default_pool)


def parse_endpoints_flag(value: str, *, flag: str = "--endpoints") -> list[Endpoint]:
    """``ip:port,ip:port,[v6]:port`` → endpoints named ``ep-<ip>-<port>`` with no labels."""
    endpoints: list[Endpoint] = []
    for i, item in enumerate(p.strip() for p in value.split(",")):
        if not item:
            continue
        try:
            host, port = parse_hostport(item)
            if port is None:
                raise ValueError("missing port (expected ip:port or [ipv6]:port)")
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range 1..65535")
            host = _normalize_ip(host)
        except ValueError as e:
            raise PoolFileError(f"{flag}: entry {i} {item!r}: {e}") from None
        endpoints.append(Endpoint(name=default_endpoint_name(host, port), address=host, port=port))
    if not endpoints:
        raise PoolFileError(f"{flag}: no endpoints given (expected ip:port,...)")
    _check_unique(flag, endpoints)
    return endpoints


def _file_signature(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


class StaticDiscovery(Discovery):
    """A fixed endpoint list, or a pool file followed by polling."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint] = (),
        *,
        pool: PoolInfo | None = None,
        path: str | os.PathLike[str] | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self._endpoints = list(endpoints)
        base = pool or PoolInfo()
        self._pool = PoolInfo(name=base.name, namespace=base.namespace,
                              target_ports=base.target_ports
                              or tuple(sorted({ep.port for ep in self._endpoints})),
                              app_protocol=base.app_protocol)
        self.path = Path(path) if path is not None else None
        self.poll_interval = poll_interval
        self._default_pool = pool
        self._signature: tuple[int, int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._datastore: Datastore | None = None
        self._file_missing = False
        self._objectives: dict[str, Objective] = {}
        self.reloads = 0  # applied reloads (tests, debugging)
        self.rejected_reloads = 0

    @classmethod
    def from_endpoints_flag(cls, value: str, *, pool_name: str = "default",
                            namespace: str = "default") -> StaticDiscovery:
        """From ``--endpoints 10.0.0.1:8000,[::1]:8000``. Raises PoolFileError naming the entry."""
        return cls(parse_endpoints_flag(value), pool=PoolInfo(name=pool_name, namespace=namespace))

    @classmethod
    def from_pool_file(cls, path: str | os.PathLike[str], *, poll_interval: float = 1.0,
                       default_pool: PoolInfo | None = None) -> StaticDiscovery:
        """Load and validate ``path`` now (config errors fail at start), follow it after start.

        ``poll_interval`` <= 0 disables following changes.
        """
        p = Path(path)
        try:
            sig = _file_signature(p)
        except OSError as e:
            raise PoolFileError(f"{path}: cannot read: {e.strerror or e}") from None
        d = load_pool_file(p, default_pool=default_pool)
        self = cls(d.endpoints, pool=d.pool, path=p, poll_interval=poll_interval)
        self._objectives = d.objectives
        self._default_pool = default_pool
        self._signature = sig
        return self

    @property
    def description(self) -> str:
        if self.path is not None:
            return f"static pool file {self.path}"
        return f"static endpoints ({len(self._endpoints)})"

    @property
    def pool(self) -> PoolInfo:
        return self._pool

    def endpoints(self) -> list[Endpoint]:
        """The last good endpoint definitions (fresh objects; the datastore holds live state)."""
        return list(self._endpoints)

    async def start(self, datastore: Datastore) -> None:
        self._datastore = datastore
        self._apply()
        datastore.synced = True
        log.info("static discovery synced", extra={
            "source": self.description, "endpoints": len(self._endpoints), "pool": self._pool.name})
        if self.path is not None and self.poll_interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._watch(), name=f"pool-file-watch {self.path}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _apply(self) -> None:
        ds = self._datastore
        if ds is None:
            return
        ds.pool = self._pool
        if self.path is not None:
            ds.objectives = dict(self._objectives)
        ds.replace_endpoints(
            Endpoint(name=e.name, address=e.address, port=e.port, labels=dict(e.labels),
                     metrics_host=e.metrics_host, metrics_port=e.metrics_port)
            for e in self._endpoints)

    def check_file(self) -> bool:
        """Re-read the pool file if it changed since the last look. True when a new set was
        applied. Invalid content is logged and the last good set kept. (The watcher calls
        this every ``poll_interval``; tests may call it directly.)"""
        if self.path is None:
            return False
        try:
            sig = _file_signature(self.path)
        except OSError as e:
            if not self._file_missing:
                self._file_missing = True
                log.warning("pool file unreadable; keeping the last good endpoint set",
                            extra={"path": str(self.path), "error": e.strerror or str(e)})
            return False
        if self._file_missing:
            self._file_missing = False
            log.info("pool file readable again", extra={"path": str(self.path)})
        if sig == self._signature:
            return False
        self._signature = sig
        try:
            d = load_pool_file(self.path, default_pool=self._default_pool)
        except PoolFileError as e:
            self.rejected_reloads += 1
            log.error("pool file change rejected; keeping the last good endpoint set",
                      extra={"path": str(self.path), "error": str(e)})
            return False
        pool, endpoints = d.pool, d.endpoints
        before = {(ep.key, ep.name, tuple(sorted(ep.labels.items())), ep.metrics_port)
                  for ep in self._endpoints}
        after = {(ep.key, ep.name, tuple(sorted(ep.labels.items())), ep.metrics_port)
                 for ep in endpoints}
        if before == after and pool == self._pool and d.objectives == self._objectives:
            return False
        self._pool = pool
        self._endpoints = endpoints
        self._objectives = d.objectives
        self._apply()
        self.reloads += 1
        log.info("pool file reloaded", extra={"path": str(self.path), "endpoints": len(endpoints)})
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.check_file()
            except Exception:  # keep following the file whatever happens
                log.exception("pool file watch error", extra={"path": str(self.path)})
