"""``epp serve``'s model-placement flags and the glue that builds ``epp.placement`` from them.

Off unless ``--model-placement observe|manage`` is given, so existing pools behave exactly as
before (no 404 for unknown models, no ``/v1/models`` polling, no loads).
"""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import urlsplit

from epp.config.loader import ConfigError
from epp.datalayer.datastore import Datastore
from epp.metrics import EppMetrics
from epp.placement import (
    ModelPlacement,
    Ownership,
    PlacementConfig,
    PlacementConfigError,
    PlacementMetrics,
    load_placement_config,
)


def add_placement_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model placement (docs/model-sharing.md)")
    g.add_argument("--model-placement", choices=("off", "observe", "manage"), default="off",
                   help="observe: route each model to the pods that hold it, hold requests for a model "
                        "loaded nowhere, 404 for unknown models; manage: also load and unload LoRA "
                        "adapters (vLLM runtime API) as demand moves. Catalogue: the pool file's models: "
                        "and the placement config's")
    g.add_argument("--model-placement-config",
                   help="YAML file with placement settings, catalogue (models:) and peers (peers:)")
    g.add_argument("--model-placement-self", default=os.environ.get("EPP_PLACEMENT_SELF", ""),
                   help="this replica's URL among the config's peers (several active replicas without "
                        "leader election); its port serves the peer API. Default $EPP_PLACEMENT_SELF")


def placement_options(args: argparse.Namespace) -> dict[str, Any]:
    """``ServeOptions`` fields from the flags; ConfigError naming the flag or field."""
    mode = getattr(args, "model_placement", "off")
    path = getattr(args, "model_placement_config", None)
    me = (getattr(args, "model_placement_self", "") or "").strip().rstrip("/") or None
    if mode == "off":
        if path:
            raise ConfigError("--model-placement-config needs --model-placement observe or manage")
        return {"placement": None, "placement_self": None}
    try:
        cfg = load_placement_config(path, mode)
    except PlacementConfigError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.peers:
        if me is None:
            raise ConfigError("the placement config lists peers: give --model-placement-self "
                              "(this replica's URL among them)")
        if me not in cfg.peers:
            raise ConfigError(f"--model-placement-self {me} is not one of the peers: {', '.join(cfg.peers)}")
        if urlsplit(me).port is None:
            raise ConfigError(f"--model-placement-self {me}: give the port of the peer API")
    return {"placement": cfg, "placement_self": me}


def build_placement(cfg: PlacementConfig | None, placement_self: str | None, bind_address: str,
                    datastore: Datastore, metrics: EppMetrics, leader: Any) -> ModelPlacement | None:
    """The placement manager (None when off). ``leader``: the LeaderElector in HA mode, whose
    leader alone loads and unloads."""
    if cfg is None:
        return None
    ownership = Ownership(
        self_url=placement_self if cfg.peers else None,
        peers=tuple(cfg.peers),
        is_leader=(lambda: bool(leader.is_leader)) if leader is not None else None,
    )
    return ModelPlacement(cfg, datastore, ownership=ownership,
                          metrics=PlacementMetrics(metrics.registry, lambda: datastore.pool.name),
                          peer_bind=bind_address)
