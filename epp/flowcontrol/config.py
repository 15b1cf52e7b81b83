"""The ``flowControl`` section of the EndpointPickerConfig, validated.

GIE's keys where they exist (``maxBytes``, ``maxRequests``, ``defaultRequestTTL``,
``defaultPriorityBand``, ``priorityBands[]`` with ``priority``, ``maxBytes``, ``maxRequests``,
``fairnessPolicyRef``, ``orderingPolicyRef``); llm-d's ``noEndpointRequestTTL`` (the wait
budget while the pool has no endpoint; overrides ``--empty-pool-wait``); and ours:
``dispatchPollInterval`` (how often a blocked dispatcher re-checks saturation).

Sizes are Kubernetes quantities (``10Gi``, ``1G``, ``500M``, ``5000``); 0 means unlimited.
Durations are Go strings (``60s``, ``200ms``); a TTL of 0 means "until the client gives up".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from epp.framework.flowcontrol import DEFAULT_FAIRNESS_POLICY, DEFAULT_ORDERING_POLICY
from epp.framework.plugin import Duration

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E))?$")

#: GIE's per-band defaults (1 GB of queued bodies; llm-d documents 5000 requests)
DEFAULT_BAND_MAX_BYTES = 10**9
DEFAULT_BAND_MAX_REQUESTS = 5000


def parse_quantity(value: Any) -> int:
    """A Kubernetes quantity (``10Gi``, ``1G``, ``1e9``, ``5000``) → an integer ≥ 0."""
    if isinstance(value, bool):
        raise ValueError("expected a quantity such as 10Gi or 5000")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("expected a finite quantity")
        n = int(value)
    elif isinstance(value, str):
        m = _QUANTITY.match(value.strip())
        if m is None:
            raise ValueError(
                f"invalid quantity {value!r}: expected e.g. 10Gi, 500Mi, 1G, 5000 "
                "(suffixes Ki Mi Gi Ti Pi Ei k M G T P E)"
            )
        try:
            number = Decimal(m.group(1))
        except InvalidOperation:  # pragma: no cover - the regex only lets numbers through
            raise ValueError(f"invalid quantity {value!r}") from None
        if m.group(2):
            number *= Decimal(10) ** int(m.group(2)[1:])
        elif m.group(3):
            number *= _BINARY.get(m.group(3)) or _DECIMAL[m.group(3)]
        n = int(number)
    else:
        raise ValueError("expected a quantity such as 10Gi or 5000")
    if n < 0:
        raise ValueError(f"quantity {value!r} must not be negative")
    return n


Quantity = Annotated[int, BeforeValidator(parse_quantity)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel, frozen=True)


class BandConfig(_Params):
    """One priority band's limits and policies (``defaultPriorityBand`` has no priority)."""

    priority: int | None = None
    max_bytes: Quantity = DEFAULT_BAND_MAX_BYTES
    max_requests: Quantity = DEFAULT_BAND_MAX_REQUESTS
    fairness_policy_ref: str = DEFAULT_FAIRNESS_POLICY
    ordering_policy_ref: str = DEFAULT_ORDERING_POLICY


class FlowControlConfig(_Params):
    max_bytes: Quantity = 0
    max_requests: Quantity = 0
    default_request_ttl: Duration = Field(0.0, alias="defaultRequestTTL")
    no_endpoint_request_ttl: Duration | None = Field(None, alias="noEndpointRequestTTL")
    dispatch_poll_interval: Duration = Field(0.02, gt=0.0, le=1.0)
    default_priority_band: BandConfig = BandConfig()
    priority_bands: tuple[BandConfig, ...] = ()

    def band(self, priority: int) -> BandConfig:
        """The band config for ``priority`` (an unlisted one is made from the default)."""
        for b in self.priority_bands:
            if b.priority == priority:
                return b
        return self.default_priority_band.model_copy(update={"priority": priority})


class FlowControlConfigError(ValueError):
    """The flowControl section is invalid; the message names the field."""


def parse_flow_control(raw: Mapping[str, Any] | None) -> FlowControlConfig:
    """Validate the raw ``flowControl`` mapping (None = all defaults)."""
    try:
        cfg = FlowControlConfig.model_validate(dict(raw or {}))
    except ValidationError as exc:
        parts = []
        for err in exc.errors(include_url=False):
            loc = "flowControl"
            for item in err.get("loc", ()):
                loc += f"[{item}]" if isinstance(item, int) else f".{item}"
            parts.append(f"{loc}: {str(err.get('msg', 'invalid value')).removeprefix('Value error, ')}")
        raise FlowControlConfigError("; ".join(parts)) from None
    seen: set[int] = set()
    for i, b in enumerate(cfg.priority_bands):
        if b.priority is None:
            raise FlowControlConfigError(f"flowControl.priorityBands[{i}]: missing required key \"priority\"")
        if b.priority in seen:
            raise FlowControlConfigError(
                f"flowControl.priorityBands[{i}].priority: duplicate priority {b.priority}"
            )
        seen.add(b.priority)
    return cfg
