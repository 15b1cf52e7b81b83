"""The ``EndpointPickerConfig`` document's shape (GIE §4.6), as pydantic models.

These models check structure only: which keys exist, what is a list or a mapping, which keys
are required, that names are non-empty and weights are numbers ≥ 0. What needs the plugin
registry (types exist, parameters fit the type, references point at plugins of the right
kind) is checked by ``epp.config.loader``; the ``flowControl`` section is validated by flow
control's own model there too, so it is kept as a raw mapping here.

Every model forbids unknown keys (a typo fails at start instead of being ignored) and reads
YAML ``null`` as "not set" (``plugins:`` with nothing under it is an empty list, as before).
"""

from __future__ import annotations

from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from epp.config.errors import ConfigError, format_document_errors, quote

API_VERSION = "inference.networking.x-k8s.io/v1alpha1"
KIND = "EndpointPickerConfig"


def _non_empty(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty", "expected a non-empty string")
    return value


def _weight(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or value != value:
        raise PydanticCustomError("weight", "must be a number >= 0, got {value}", {"value": repr(value)})
    return value


def _exactly(expected: str) -> Any:
    def check(value: Any) -> Any:
        if value != expected:
            raise PydanticCustomError(
                "unexpected_value", "expected {expected}, got {got}",
                {"expected": quote(expected), "got": quote(value)},
            )
        return value

    return BeforeValidator(check)


#: a plugin, profile or feature-gate name
Name = Annotated[str, AfterValidator(_non_empty)]
#: a scorer's weight (a picker or filter takes none; the loader checks that)
Weight = Annotated[float, BeforeValidator(_weight)]


class _Node(BaseModel):
    """Base of every section: camelCase keys only, unknown keys rejected, null = unset."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # pydantic reports "expected a mapping"
        allowed = [f.alias or name for name, f in cls.model_fields.items()]
        for key in data:
            if key not in allowed:
                raise PydanticCustomError(
                    "unknown_key", "unknown key {key}; allowed: {allowed}",
                    {"key": quote(key), "name": str(key), "allowed": ", ".join(allowed)},
                )
        return {k: v for k, v in data.items() if v is not None}


class PluginEntry(_Node):
    """``plugins[]``: one plugin instance; its name defaults to its type."""

    name: Name | None = None
    type: Name
    parameters: dict[str, Any] = Field(default_factory=dict)


class PluginRef(_Node):
    """``{pluginRef: <name>}``: a reference to a plugin declared in ``plugins``."""

    plugin_ref: Name


class ProfilePluginRef(PluginRef):
    """``schedulingProfiles[].plugins[]``: a filter, a scorer (with an optional weight) or
    the profile's picker."""

    weight: Weight | None = None


class SchedulingProfile(_Node):
    name: Name
    plugins: tuple[ProfilePluginRef, ...] = ()


class DataSourceRef(PluginRef):
    """``dataLayer.sources[]``: a data source and the extractors reading what it fetches."""

    extractors: tuple[PluginRef, ...] = ()


class DataLayer(_Node):
    sources: tuple[DataSourceRef, ...] = ()


class EndpointPickerDocument(_Node):
    """The whole document. Sections left out are filled with GIE's defaults by the loader."""

    api_version: Annotated[str, _exactly(API_VERSION)] = API_VERSION
    kind: Annotated[str, _exactly(KIND)] = KIND
    feature_gates: tuple[Name, ...] = ()
    plugins: tuple[PluginEntry, ...] = ()
    scheduling_profiles: tuple[SchedulingProfile, ...] = ()
    saturation_detector: PluginRef | None = None
    data_layer: DataLayer | None = None
    #: validated by ``epp.flowcontrol.config`` (in the loader), so only "a mapping" here
    flow_control: dict[str, Any] | None = None
    parser: PluginRef | None = None


def parse_document(text: str) -> EndpointPickerDocument:
    """YAML text → the document's structure. Raises ConfigError naming every structural
    problem (``plugins[0]: unknown key "weight"; allowed: name, type, parameters``)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: invalid YAML: {exc}") from None
    try:
        return EndpointPickerDocument.model_validate({} if raw is None else raw)
    except ValidationError as exc:
        raise ConfigError(format_document_errors(exc)) from None
