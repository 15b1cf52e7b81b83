"""What every plugin is: a named object built from validated YAML parameters.

A plugin is a class with a GIE type name (``type_name``), constructed from its YAML
``parameters`` by ``from_config``. One class may implement several extension points (the
prefix scorer is a Scorer *and* a PreRequest that learns the pick). Plugins are found by the
registry (``epp.plugins.registry``) by type name: adding one is one module under
``epp/plugins/<layer>/`` (or an ``epp.plugins`` entry point) plus a line of config.

Cooperating plugins share state through typed keys (``StateKey``) on two scopes, never
through strings in a dict or module globals:

* ``PluginContext.state``: long-lived, per configuration (e.g. the prefix index shared by a
  producer and a scorer);
* ``LLMRequest.state``: per request (GIE's CycleState), e.g. what a scorer matched, for its
  PreRequest hook to learn.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, Protocol, Self, TypeVar, cast, runtime_checkable

import durationpy
from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic.alias_generators import to_camel

if TYPE_CHECKING:
    from epp.framework.datalayer import PoolView
    from epp.metrics import EppMetrics

T = TypeVar("T")

# --------------------------------------------------------------------------- parameters


_GO_DURATION_CHARS = frozenset("0123456789.+-nuµμmsh")


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
        if text.startswith("-") and text not in ("-0",):
            raise ValueError(f"duration {value!r} must not be negative")
        if not set(text) <= _GO_DURATION_CHARS:  # durationpy also takes days and weeks; Go does not
            raise ValueError(f"invalid duration {value!r}: units are ns, us, ms, s, m, h")
        try:
            seconds = durationpy.from_str(text.removeprefix("+")).total_seconds()
        except Exception:
            raise ValueError(
                f"invalid duration {value!r}: expected e.g. '200ms', '2s', '1m30s' (units ns, us, ms, s, m, h)"
            ) from None
    else:
        raise ValueError("expected a duration such as '200ms' or '2s'")
    if not 0.0 <= seconds < float("inf"):  # also rejects NaN
        raise ValueError(f"duration {value!r} must be a finite, non-negative time")
    return seconds


#: A duration parameter, in seconds once validated.
Duration = Annotated[float, BeforeValidator(parse_duration)]


class PluginParams(BaseModel):
    """Base of every plugin's ``Params``: camelCase keys, unknown keys rejected, immutable."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel, frozen=True)


class NoParameters(PluginParams):
    """Parameters model for plugins that take none (unknown keys are rejected)."""


# --------------------------------------------------------------------------- typed state


class StateKey(Generic[T]):
    """A typed key into a ``TypedState``: the value's type travels with the key, so readers
    need no casts and two plugins cannot collide on a string by accident (identity keys)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StateKey({self.name})"


class TypedState:
    """A small map from ``StateKey[T]`` to ``T``."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[StateKey[Any], Any] = {}

    def get(self, key: StateKey[T]) -> T | None:
        return cast("T | None", self._values.get(key))

    def set(self, key: StateKey[T], value: T) -> None:
        self._values[key] = value

    def pop(self, key: StateKey[T]) -> T | None:
        return cast("T | None", self._values.pop(key, None))

    def setdefault(self, key: StateKey[T], factory: Callable[[], T]) -> T:
        values = self._values
        if key in values:
            return cast(T, values[key])
        value = values[key] = factory()
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)


# --------------------------------------------------------------------------- plugins


@dataclass(slots=True)
class PluginContext:
    """What a plugin may use at construction: shared, long-lived objects (no request state)."""

    datastore: PoolView
    metrics: EppMetrics | None = None
    staleness_threshold: float = 2.0
    #: state shared by cooperating plugins of one configuration (typed keys)
    state: TypedState = field(default_factory=TypedState)


@runtime_checkable
class Lifecycle(Protocol):
    """A plugin with background work (subscribers, refreshers). The runner starts every such
    plugin after the servers are up and closes it on shutdown, in reverse order."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Plugin(ABC):  # noqa: B024 - a base with no abstract methods on purpose
    """Base of every plugin. ``Params`` is a pydantic model (extra keys rejected)."""

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParameters

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        """Build from validated parameters. Override when the plugin takes any."""
        return cls(name)

    def bind(self, plugins: Mapping[str, Plugin]) -> None:  # noqa: B027 - optional hook
        """Resolve references to other plugins, once all are built (config order does not
        matter). Raise ValueError naming the problem; the loader reports it at this plugin's
        location, so a bad reference fails at start, never at the first request."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
