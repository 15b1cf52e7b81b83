"""Shared building blocks for plugin ``Params`` models.

GIE's YAML spells parameters in camelCase and durations as Go strings (``200ms``). Every
plugin's ``Params`` derives from :class:`PluginParams` so those rules hold everywhere, and
typos fail at start instead of being silently ignored (``extra="forbid"``).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic.alias_generators import to_camel

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # micro sign U+00B5
    "μs": 1e-6,  # Greek mu U+03BC
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(value: Any) -> float:
    """A Go ``time.Duration`` string (``"200ms"``, ``"1m30s"``, ``"1.5s"``) → seconds.

    Plain numbers are taken as seconds (YAML authors write ``0.2`` too). Negative durations
    are rejected: every duration in the config is a threshold or a timeout.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '200ms' or '2s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text in ("0", "+0"):
            return 0.0
        if text.startswith("-"):
            raise ValueError(f"duration {value!r} must not be negative")
        text = text.removeprefix("+")
        pos, seconds = 0, 0.0
        while pos < len(text):
            m = _PART.match(text, pos)
            if m is None:
                raise ValueError(
                    f"invalid duration {value!r}: expected e.g. '200ms', '2s', '1m30s' "
                    "(units ns, us, ms, s, m, h)"
                )
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if pos == 0:
            raise ValueError(f"invalid duration {value!r}")
    else:
        raise ValueError("expected a duration such as '200ms' or '2s'")
    if seconds < 0 or math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"duration {value!r} must be a finite, non-negative time")
    return seconds


#: A duration parameter, in seconds once validated.
Duration = Annotated[float, BeforeValidator(parse_duration)]


class PluginParams(BaseModel):
    """Base of every plugin's ``Params``: camelCase keys, unknown keys rejected, immutable."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, alias_generator=to_camel, frozen=True
    )
