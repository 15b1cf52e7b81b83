"""Model placement's settings (``--model-placement-config``): the policy knobs, an optional
catalogue, and the peer replicas when several pickers share one pool without leader election.

YAML with camelCase keys; unknown keys and bad values fail the start with the field named::

    idleUnloadAfter: 5m        # unload a copy nobody used for this long (LRU under slot pressure)
    holdTimeout: 30s           # a request waits at most this long for its model to load
    loadTimeout: 60s           # one POST /v1/load_lora_adapter (connect + load)
    minChurnAge: 30s           # a copy younger than this is not evicted for another model's copy
    scaleDownDelay: 60s        # surplus copies are unloaded after being surplus this long
    copyLoadFactor: 1.5        # a copy may take 1.5x an average pod's share of requests before another
    minInflightPerCopy: 2      # a copy is "busy" only above this many requests in flight
    maxCopies: 0               # copies of one model at most (0: every pod)
    slotsPerPod: 0             # adapters a pod holds (0: the pod's vllm:lora_requests_info max_lora)
    modelsRefreshInterval: 2s  # GET /v1/models on every pod (what is loaded where)
    reconcileInterval: 1s      # idle unloads, copies up and down
    failureBackoff: 10s        # after a failed load, requests for that model fail fast this long
    scaleWindow: 10s           # demand that sizes copies is averaged this long
    demandWindow: 60s          # request rates that pick which idle copy to evict, this long
    models:                    # catalogue entries (besides the pool file's models:)
    - {name: dept-a, path: /adapters/dept-a, base: llama}
    peers: [http://10.0.0.5:9005, http://10.0.0.6:9005]   # every replica's placement URL
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from epp.datalayer.datastore import CatalogueModel
from epp.discovery.pool_file import ModelEntry, PoolFileError, parse_models
from epp.framework.plugin import parse_duration

MODES = ("observe", "manage")

Duration = Annotated[float, BeforeValidator(parse_duration)]


class PlacementConfigError(ValueError):
    """The placement settings are invalid; the message names the source and the field."""


class PlacementConfig(BaseModel):
    """Every knob with its default; see the module docstring and docs/model-sharing.md."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    #: ``observe``: route to pods that hold the model, hold requests for one loaded nowhere,
    #: 404 for unknown models, never load; ``manage``: also load and unload adapters
    mode: str = "manage"
    idle_unload_after: Duration = 300.0
    hold_timeout: Duration = 30.0
    load_timeout: Duration = 60.0
    unload_timeout: Duration = 10.0
    min_churn_age: Duration = 30.0
    scale_down_delay: Duration = 60.0
    #: a model's copies may each take this many times an average pod's share of the requests
    #: before it gets another copy (above 1: fewer extra copies, fewer evictions when slots are short)
    copy_load_factor: float = Field(default=1.5, ge=0.5, le=10.0)
    min_inflight_per_copy: float = Field(default=2.0, gt=0.0)
    #: a copy of a busier model may evict a copy whose per-copy load is this many times lower
    eviction_ratio: float = Field(default=4.0, ge=1.0)
    max_copies: int = Field(default=0, ge=0)
    slots_per_pod: int = Field(default=0, ge=0)
    models_refresh_interval: Duration = 2.0
    reconcile_interval: Duration = 1.0
    failure_backoff: Duration = 10.0
    #: time constant of the per-model rate and in-flight averages that size copies
    scale_window: Duration = 10.0
    #: time constant of the per-model request rate that orders eviction victims
    demand_window: Duration = 60.0
    models: list[ModelEntry] = Field(default_factory=list)
    peers: list[str] = Field(default_factory=list)

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in MODES:
            raise ValueError(f"expected one of {', '.join(MODES)}, got {v!r}")
        return v

    @field_validator("peers")
    @classmethod
    def _peers(cls, v: list[str]) -> list[str]:
        out = []
        for url in v:
            u = url.strip().rstrip("/")
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"peer {url!r}: expected an http(s) URL such as http://10.0.0.5:9005")
            out.append(u)
        if len(set(out)) != len(out):
            raise ValueError("a peer is listed twice")
        return out

    @field_validator("reconcile_interval", "models_refresh_interval", "scale_window", "demand_window")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be a positive duration")
        return v

    @property
    def manages(self) -> bool:
        return self.mode == "manage"

    def catalogue(self, source: str = "model placement config") -> dict[str, CatalogueModel]:
        return parse_models(self.models, source)


def _format(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
        msg = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def parse_placement_config(text: str | None, source: str = "model placement config",
                           mode: str | None = None) -> PlacementConfig:
    """Validate YAML text (None or blank: defaults); ``mode`` (the flag) overrides the file's."""
    raw: Any = {}
    if text is not None and text.strip():
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PlacementConfigError(f"{source}: not valid YAML: {e}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise PlacementConfigError(f"{source}: expected a mapping of settings, got {type(raw).__name__}")
    if mode is not None:
        raw = {**raw, "mode": mode}
    try:
        cfg = PlacementConfig.model_validate(raw)
        cfg.catalogue(source)
    except ValidationError as e:
        raise PlacementConfigError(_format(source, e)) from None
    except PoolFileError as e:
        raise PlacementConfigError(str(e)) from None
    return cfg


def load_placement_config(path: str | None, mode: str | None = None) -> PlacementConfig:
    if path is None:
        return parse_placement_config(None, mode=mode)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PlacementConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_placement_config(text, path, mode)
