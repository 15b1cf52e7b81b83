"""The plugin registry finds built-ins by GIE type name and refuses duplicate names."""

from __future__ import annotations

import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from epp.framework.flowcontrol import SaturationDetector
from epp.framework.requestcontrol import PreRequest
from epp.framework.scheduling import Picker, Scorer
from epp.plugins import registry as registry_mod
from epp.plugins.registry import BUILTIN_PACKAGES, PluginRegistryError, discover_plugins

BUILTINS = {
    "queue-scorer", "kv-cache-utilization-scorer", "running-requests-size-scorer",
    "prefix-cache-scorer", "approx-prefix-cache-producer", "lora-affinity-scorer",
    "token-load-scorer", "active-request-scorer", "max-score-picker", "random-picker",
    "weighted-random-picker", "single-profile-handler", "utilization-detector",
    "concurrency-detector", "metrics-data-source", "core-metrics-extractor", "openai-parser",
}


def test_finds_every_builtin():
    reg = discover_plugins()
    assert BUILTINS <= set(reg)
    assert issubclass(reg["queue-scorer"], Scorer)
    assert issubclass(reg["max-score-picker"], Picker)
    assert issubclass(reg["prefix-cache-scorer"], PreRequest)
    assert issubclass(reg["utilization-detector"], SaturationDetector)
    assert reg.origin("queue-scorer") == "epp.plugins.scheduling.queue_scorer"


def test_every_builtin_params_forbid_unknown_keys():
    reg = discover_plugins()
    for type_name in BUILTINS:
        params = reg[type_name].Params
        assert params.model_config.get("extra") == "forbid", type_name


def _make_package(tmp_path, name: str, files: dict[str, str]) -> None:
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for fname, body in files.items():
        (pkg / fname).write_text(textwrap.dedent(body))


PLUGIN_SRC = """
from epp.framework.scheduling import Scorer

class {cls}(Scorer):
    type_name = "{type_name}"

    def score(self, request, endpoints):
        return [1.0] * len(endpoints)
"""


def test_adding_a_scorer_is_one_file(tmp_path, monkeypatch):
    _make_package(tmp_path, "extra_plugins_a",
                  {"mine.py": PLUGIN_SRC.format(cls="Mine", type_name="my-scorer")})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = discover_plugins(packages=(*BUILTIN_PACKAGES, "extra_plugins_a"))
    assert "my-scorer" in reg and BUILTINS <= set(reg)


def test_duplicate_type_names_are_an_error(tmp_path, monkeypatch):
    _make_package(tmp_path, "extra_plugins_b",
                  {"dup.py": PLUGIN_SRC.format(cls="Dup", type_name="queue-scorer")})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginRegistryError, match=r"queue-scorer.*defined twice"):
        discover_plugins(packages=(*BUILTIN_PACKAGES, "extra_plugins_b"))


def test_entry_points_are_loaded(tmp_path, monkeypatch):
    _make_package(tmp_path, "extra_plugins_c",
                  {"ep.py": PLUGIN_SRC.format(cls="FromEP", type_name="ep-scorer")})
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = [EntryPoint("ep", "extra_plugins_c.ep:FromEP", "epp.plugins"),
            EntryPoint("mod", "extra_plugins_c.ep", "epp.plugins")]
    monkeypatch.setattr(registry_mod, "entry_points", lambda group: fake)
    reg = discover_plugins()
    assert reg.origin("ep-scorer").startswith("entry point ep")
    assert "extra_plugins_c" in sys.modules


def test_bad_entry_point_is_reported(monkeypatch):
    fake = [EntryPoint("bad", "json:dumps", "epp.plugins")]
    monkeypatch.setattr(registry_mod, "entry_points", lambda group: fake)
    with pytest.raises(PluginRegistryError, match="entry point bad"):
        discover_plugins()
