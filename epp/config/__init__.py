"""The ``EndpointPickerConfig``: its document (``document``), loading and validation
(``loader``, validated at start), and instantiation (``build``)."""

from epp.config.build import SchedulingBundle, build_scheduling
from epp.config.errors import ConfigError
from epp.config.loader import DEFAULT_CONFIG_YAML, DataSourceSpec, PickerConfig, ProfileSpec, load_config
from epp.config.policies import PolicyLookup
from epp.config.specs import PluginSpec

__all__ = [
    "DEFAULT_CONFIG_YAML",
    "ConfigError",
    "DataSourceSpec",
    "PickerConfig",
    "PluginSpec",
    "PolicyLookup",
    "ProfileSpec",
    "SchedulingBundle",
    "build_scheduling",
    "load_config",
]
