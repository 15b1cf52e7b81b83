"""EndpointPickerConfig loading: GIE defaults, injection rules, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.config import ConfigError, build_scheduling, load_config
from epp.datalayer.datastore import Datastore
from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext
from epp.plugins.flowcontrol.utilization_detector import UtilizationDetector
from epp.plugins.scheduling.max_score_picker import MaxScorePicker
from epp.plugins.scheduling.prefix_cache import SHARED_KEY, PrefixCacheScorer
from epp.plugins.scheduling.single_profile_handler import SingleProfileHandler

MANIFESTS = Path(__file__).resolve().parents[3] / "manifests" / "config"
HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"


def ctx() -> PluginContext:
    return PluginContext(Datastore())


def _profile_summary(cfg):
    return [
        (p.name, [cfg.plugin(n).type_name for n in p.filters],
         [(cfg.plugin(n).type_name, w) for n, w in p.scorers], cfg.plugin(p.picker).type_name)
        for p in cfg.profiles
    ]


# ---- defaults ----
def test_no_config_gives_gie_defaults():
    cfg = load_config(None)
    assert cfg.is_default
    assert _profile_summary(cfg) == [(
        "default", [],
        [("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0)],
        "max-score-picker",
    )]
    assert cfg.plugin(cfg.profile_handler).type_name == "single-profile-handler"
    assert cfg.plugin(cfg.saturation_detector).type_name == "utilization-detector"
    assert cfg.plugin(cfg.parser).type_name == "openai-parser"
    source = cfg.plugin(cfg.data_source.plugin_ref)
    assert (source.type_name, source.params.scheme, source.params.path,
            source.params.insecure_skip_verify) == ("metrics-data-source", "http", "/metrics", True)
    assert cfg.plugin(cfg.data_source.extractor).type_name == "core-metrics-extractor"
    assert cfg.flow_control is None and not cfg.flow_control_enabled
    assert load_config("").is_default


def test_sample_default_config_matches_builtin_defaults():
    sample = load_config((MANIFESTS / "default-config.yaml").read_text())
    default = load_config(None)
    assert _profile_summary(sample) == _profile_summary(default)
    for attr in ("profile_handler", "saturation_detector", "parser", "data_source"):
        assert getattr(sample, attr) == getattr(default, attr), attr
    for name in ("utilization-detector", "max-score-picker", "metrics-data-source",
                 "core-metrics-extractor"):
        assert sample.plugin(name).params == default.plugin(name).params


@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_sample_config_builds(path):
    bundle = build_scheduling(load_config(path.read_text()), ctx())
    assert bundle.scheduler.profiles


def test_build_default_bundle():
    c = ctx()
    bundle = build_scheduling(load_config(None), c)
    assert isinstance(bundle.profile_handler, SingleProfileHandler)
    assert isinstance(bundle.saturation_detector, UtilizationDetector)
    assert [type(p) for p in bundle.pre_request] == [PrefixCacheScorer]
    assert bundle.response_complete == ()
    prof = bundle.profiles["default"]
    assert [(ws.scorer.type_name, ws.weight) for ws in prof.scorers] == [
        ("queue-scorer", 2), ("kv-cache-utilization-scorer", 2), ("prefix-cache-scorer", 3)]
    assert isinstance(prof.picker, MaxScorePicker)
    assert set(bundle.plugins) >= {"queue-scorer", "max-score-picker", "metrics-data-source",
                                   "openai-parser", "utilization-detector"}
    shared = c.state.get(SHARED_KEY)
    assert shared is not None and bundle.plugins["prefix-cache-scorer"].index is shared.index


# ---- injection and parsing ----
def test_unweighted_scorer_weighs_one_and_picker_is_injected():
    cfg = load_config(HEAD + """
plugins:
- type: queue-scorer
- name: kv
  type: kv-cache-utilization-scorer
schedulingProfiles:
- name: p
  plugins: [{pluginRef: queue-scorer}, {pluginRef: kv, weight: 0.5}]
""")
    assert _profile_summary(cfg) == [
        ("p", [], [("queue-scorer", 1.0), ("kv-cache-utilization-scorer", 0.5)], "max-score-picker")]


def test_detector_in_a_profile_is_a_filter_and_parameters_parse():
    cfg = load_config(HEAD + """
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 8, concurrencyMode: tokens, headroom: 0.1}
- type: utilization-detector
  parameters: {metricsStalenessThreshold: 1m30s}
- type: weighted-random-picker
  parameters: {maxNumOfEndpoints: 3}
schedulingProfiles:
- name: p
  plugins: [{pluginRef: concurrency-detector}, {pluginRef: weighted-random-picker}]
saturationDetector: {pluginRef: concurrency-detector}
""")
    assert _profile_summary(cfg) == [("p", ["concurrency-detector"], [], "weighted-random-picker")]
    assert cfg.plugin("utilization-detector").params.metrics_staleness_threshold == 90.0
    assert cfg.saturation_detector == "concurrency-detector"
    bundle = build_scheduling(cfg, ctx())
    assert bundle.saturation_detector is bundle.plugins["concurrency-detector"]
    assert bundle.profiles["p"].filters == [bundle.plugins["concurrency-detector"]]


def test_data_layer_flow_control_and_gates_are_exposed():
    cfg = load_config(HEAD + """
featureGates: [flowControl]
plugins:
- type: queue-scorer
- name: src
  type: metrics-data-source
  parameters: {scheme: https, path: /custom/metrics, insecureSkipVerify: false}
- name: ext
  type: core-metrics-extractor
  parameters:
    engineConfigs:
    - name: vllm
      queuedRequestsSpec: my_waiting
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
dataLayer:
  sources:
  - pluginRef: src
    extractors: [{pluginRef: ext}]
flowControl:
  maxBytes: 10Gi
  priorityBands: [{priority: 100, maxRequests: 500}]
""")
    assert cfg.flow_control_enabled
    assert cfg.flow_control is not None
    assert cfg.flow_control.max_bytes == 10 * 2**30
    assert [(b.priority, b.max_requests) for b in cfg.flow_control.priority_bands] == [(100, 500)]
    assert (cfg.data_source.plugin_ref, cfg.data_source.extractor) == ("src", "ext")
    bundle = build_scheduling(cfg, ctx())
    assert bundle.data_source is bundle.plugins["src"]
    assert bundle.data_source.verify_tls
    assert bundle.data_source.metrics_url(Endpoint("p", "10.0.0.1", 8000)) == \
        "https://10.0.0.1:8000/custom/metrics"
    assert bundle.metrics_extractor is bundle.plugins["ext"]
    overrides = bundle.metrics_extractor.engine_overrides()
    assert overrides is not None
    from epp.datalayer.metric_mapping import build_mappings

    mappings = build_mappings(overrides)
    assert str(mappings["vllm"].queued[0]) == "my_waiting"
    assert mappings["vllm"].running == ()  # whole entry replaced: unset specs are disabled
    assert str(mappings["sglang"].queued[0]) == "sglang:num_queue_reqs"  # other built-ins kept


def test_declared_data_source_is_used_when_data_layer_is_omitted():
    cfg = load_config(HEAD + """
plugins:
- {type: queue-scorer}
- {type: metrics-data-source, parameters: {path: /m}}
schedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer}]}]
""")
    assert cfg.plugin(cfg.data_source.plugin_ref).params.path == "/m"


# ---- errors name the field ----
ERRORS = [
    ("""
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: queue-scorr
schedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer}]}]
""", 'plugins[2] (type "queue-scorr"): unknown plugin type; known types: active-request-scorer'),
    ("""
plugins: [{type: max-score-picker, parameters: {maxNumOfEndpoints: 0}}]
schedulingProfiles: [{name: d, plugins: [{pluginRef: max-score-picker}]}]
""", "plugins[0].parameters.maxNumOfEndpoints: Input should be greater than 0"),
    ("""
plugins: [{type: max-score-picker, parameters: {maxEndpoints: 2}}]
schedulingProfiles: [{name: d}]
""", "plugins[0].parameters.maxEndpoints: Extra inputs are not permitted"),
    ("""
plugins: [{type: utilization-detector, parameters: {metricsStalenessThreshold: 200 ms}}]
schedulingProfiles: [{name: d}]
""", "plugins[0].parameters.metricsStalenessThreshold: invalid duration '200 ms'"),
    ("""
plugins: [{type: prefix-cache-scorer, parameters: {blockSize: 64}}]
schedulingProfiles: [{name: d}]
""", "plugins[0].parameters: blockSize (characters) is deprecated"),
    ("""
plugins: [{type: queue-scorer}]
schedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer}, {pluginRef: foo}]}]
""", 'schedulingProfiles[0].plugins[1].pluginRef "foo": no plugin named "foo"'),
    ("""
plugins: [{type: queue-scorer}]
schedulingProfile: []
""", "schedulingProfile: unknown top-level key"),
    ("""
plugins: [{type: queue-scorer, weight: 2}]
""", 'plugins[0]: unknown key "weight"; allowed: name, type, parameters'),
    ("""
plugins: [{type: queue-scorer}, {type: queue-scorer}]
""", 'plugins[1] (name "queue-scorer"): duplicate plugin name; first declared at plugins[0]'),
    ("""
plugins: [{type: queue-scorer}]
schedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer, weight: -1}]}]
""", "schedulingProfiles[0].plugins[0].weight: must be a number >= 0, got -1"),
    ("""
plugins: [{type: random-picker}, {type: max-score-picker}]
schedulingProfiles: [{name: d, plugins: [{pluginRef: random-picker}, {pluginRef: max-score-picker}]}]
""", 'schedulingProfiles[0].plugins[1].pluginRef "max-score-picker": profile "d" already has '
     'picker "random-picker"'),
    ("""
plugins: [{type: random-picker}]
schedulingProfiles: [{name: d, plugins: [{pluginRef: random-picker, weight: 1}]}]
""", "schedulingProfiles[0].plugins[0].weight: only scorers take a weight"),
    ("""
plugins: [{type: single-profile-handler}]
schedulingProfiles: [{name: d, plugins: [{pluginRef: single-profile-handler}]}]
""", 'schedulingProfiles[0].plugins[0].pluginRef "single-profile-handler": plugin type '
     '"single-profile-handler" is a profile handler, not a filter, scorer or picker'),
    ("""
plugins: [{type: queue-scorer}]
schedulingProfiles: [{name: a}, {name: b}]
""", "schedulingProfiles: 2 profiles need a profile handler plugin"),
    ("""
plugins: [{type: single-profile-handler}]
schedulingProfiles: [{name: a}, {name: b}]
""", 'plugins[0] (type "single-profile-handler"): runs exactly one profile, but 2 are configured'),
    ("""
plugins: [{type: queue-scorer}]
schedulingProfiles: [{name: a}, {name: a}]
""", 'schedulingProfiles[1] (name "a"): duplicate profile name'),
    ("""
plugins: [{type: queue-scorer}]
""", "schedulingProfiles: at least one scheduling profile is required"),
    ("""
plugins: [{type: queue-scorer}]
schedulingProfiles: [{name: d}]
saturationDetector: {pluginRef: queue-scorer}
""", 'saturationDetector.pluginRef "queue-scorer": plugin type "queue-scorer" is a scorer, '
     "not a saturation detector"),
    ("""
plugins: [{type: queue-scorer}]
schedulingProfiles: [{name: d}]
dataLayer: {sources: [{pluginRef: queue-scorer}]}
""", 'dataLayer.sources[0].pluginRef "queue-scorer": plugin type "queue-scorer" is a scorer, '
     "not a data source"),
    ("""
schedulingProfiles: [{name: d}]
parser: {pluginRef: vllmgrpc-parser}
""", 'parser.pluginRef "vllmgrpc-parser": no plugin named "vllmgrpc-parser"'),
    ("""
featureGates: [dataLayer]
schedulingProfiles: [{name: d}]
""", 'featureGates[0] "dataLayer": the data layer is always enabled'),
    ("""
featureGates: [flowControll]
schedulingProfiles: [{name: d}]
""", 'featureGates[0] "flowControll": unknown feature gate; known: enableLegacyMetrics, flowControl'),
    ("""
schedulingProfiles: [{name: d}]
flowControl: [1, 2]
""", "flowControl: expected a mapping, got list"),
    ("""
plugins: [{type: metrics-data-source, parameters: {scheme: ftp}}]
schedulingProfiles: [{name: d}]
""", "plugins[0].parameters.scheme: Input should be 'http' or 'https'"),
    ("""
plugins:
- type: concurrency-detector
  parameters: {concurrencyMode: bytes}
schedulingProfiles: [{name: d}]
""", "plugins[0].parameters.concurrencyMode: Input should be 'requests' or 'tokens'"),
    ("""
plugins: [{name: max-score-picker, type: queue-scorer}]
schedulingProfiles: [{name: d}]
""", 'plugins[0] (name "max-score-picker"): the name is reserved for the injected default '
     '"max-score-picker" plugin but has type "queue-scorer"'),
    ("plugins: [unclosed", "config: invalid YAML"),
    ("- just a list", "config: expected a mapping, got list"),
]


@pytest.mark.parametrize(("body", "message"), ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_errors_name_the_location(body, message):
    text = body if body.startswith(("plugins: [unclosed", "- ")) else HEAD + body
    with pytest.raises(ConfigError) as info:
        load_config(text)
    assert message in str(info.value)


def test_wrong_api_version_and_kind():
    with pytest.raises(ConfigError, match=r'apiVersion: expected "inference\.networking\.x-k8s\.io/v1alpha1"'):
        load_config("apiVersion: v1\nschedulingProfiles: [{name: d}]\n")
    with pytest.raises(ConfigError, match='kind: expected "EndpointPickerConfig"'):
        load_config("kind: Pod\nschedulingProfiles: [{name: d}]\n")


def test_conflicting_prefix_parameters_fail_at_build_naming_the_plugin():
    cfg = load_config(HEAD + """
plugins:
- {type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 16}}
- {type: prefix-cache-scorer, parameters: {blockSizeTokens: 32}}
schedulingProfiles: [{name: d, plugins: [{pluginRef: prefix-cache-scorer}]}]
""")
    with pytest.raises(ConfigError, match=r'plugins\[1\] \(name "prefix-cache-scorer"\): prefix index '
                                          "parameters conflict"):
        build_scheduling(cfg, ctx())
