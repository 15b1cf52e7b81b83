"""Model placement: which pods hold which models (LoRA adapters, base models), loading and
unloading adapters through vLLM's runtime API as demand moves — ModelMesh-style model
sharing on one fleet. See docs/model-sharing.md.

Between request control (the director calls ``Placement.ensure`` before admission) and flow
control; reads the datastore and the pods' reports, never the scheduler.
"""

from epp.placement.config import PlacementConfig, PlacementConfigError, load_placement_config, parse_placement_config
from epp.placement.demand import DemandWithHeld
from epp.placement.manager import ModelPlacement
from epp.placement.metrics import PlacementMetrics
from epp.placement.peers import Ownership

__all__ = [
    "DemandWithHeld", "ModelPlacement", "Ownership", "PlacementConfig", "PlacementConfigError",
    "PlacementMetrics", "load_placement_config", "parse_placement_config",
]
