"""The ``EndpointPickerConfig`` loader (validated at start; see ``loader``)."""

from epp.config.loader import (
    DEFAULT_CONFIG_YAML,
    ConfigError,
    DataSourceSpec,
    PickerConfig,
    PluginSpec,
    ProfileSpec,
    SchedulingBundle,
    build_scheduling,
    load_config,
)

__all__ = [
    "DEFAULT_CONFIG_YAML",
    "ConfigError",
    "DataSourceSpec",
    "PickerConfig",
    "PluginSpec",
    "ProfileSpec",
    "SchedulingBundle",
    "build_scheduling",
    "load_config",
]
