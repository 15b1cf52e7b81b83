"""The pool file and the ``--endpoints`` flag: validation into endpoints, pool info and
objectives, with errors that name the file (or flag) and the field.

Format (YAML; unknown keys are errors so typos fail loudly)::

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
    models:                                       # optional: the catalogue for model placement
    - {name: dept-a, path: /adapters/dept-a, base: llama}   # a LoRA adapter loaded at run time
    - {name: llama}                               #   a base model (pods started with it serve it)

Addresses must be IP literals: the gateway routes to the picked endpoint through an
original-destination cluster, which takes ``ip:port`` and does not resolve names.

A zero-byte / blank file is invalid (write ``endpoints: []`` for an empty pool): editors that
truncate before writing would otherwise briefly empty the pool. Following the file while the
picker runs is :mod:`epp.discovery.static`'s job; the P/D sidecar reads the same format for
its prefill allow-list.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from epp.datalayer.datastore import CatalogueModel, Objective, PoolInfo
from epp.framework.datalayer import Endpoint, parse_hostport


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


class ModelEntry(BaseModel):
    """One catalogue entry (pool file ``models:``, placement config ``models:``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: str | None = Field(default=None, min_length=1)
    base: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _base_needs_path(self) -> ModelEntry:
        if self.base is not None and self.path is None:
            raise ValueError("base is the base model of a LoRA adapter: give the adapter's path too")
        return self


class _PoolFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool: _PoolRef | None = None
    endpoints: list[_EndpointEntry] | None = None
    objectives: list[_ObjectiveEntry] | None = None
    models: list[ModelEntry] | None = None


@dataclass(slots=True, frozen=True)
class PoolDefinition:
    """Everything a pool file defines."""

    pool: PoolInfo
    endpoints: list[Endpoint]
    objectives: dict[str, Objective]
    models: dict[str, CatalogueModel] = field(default_factory=dict)


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
    return PoolDefinition(pool, endpoints, objectives, parse_models(model.models or (), source))


def parse_models(entries: Sequence[ModelEntry], source: str, field_name: str = "models") -> dict[str, CatalogueModel]:
    """Catalogue entries by name; a repeated name is an error naming the entry."""
    models: dict[str, CatalogueModel] = {}
    for i, m in enumerate(entries):
        if m.name in models:
            raise PoolFileError(f"{source}: {field_name}[{i}].name: duplicate model {m.name!r}")
        models[m.name] = CatalogueModel(m.name, m.path, m.base)
    return models


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
