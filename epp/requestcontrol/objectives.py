"""Priority of a request: InferenceObjective by header, else legacy InferenceModel by model.

Unknown objective → priority 0 (GIE). Negative priority means sheddable.
"""

from __future__ import annotations

from epp.datalayer.datastore import Datastore


def resolve_priority(datastore: Datastore, objective: str | None, model: str) -> int:
    if objective:
        obj = datastore.objectives.get(objective)
        if obj is not None:
            return obj.priority
    legacy = datastore.model_objectives.get(model) if datastore.model_objectives else None
    return legacy.priority if legacy is not None else 0
