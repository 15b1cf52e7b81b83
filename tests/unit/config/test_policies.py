"""Flow-control policy references resolve when the config loads, and the flow controller gets
exactly the policies the config names."""

from __future__ import annotations

import pytest

from epp.config import ConfigError, build_scheduling, load_config
from epp.datalayer.datastore import Datastore
from epp.framework.flowcontrol import DEFAULT_FAIRNESS_POLICY, DEFAULT_ORDERING_POLICY
from epp.framework.plugin import PluginContext
from epp.plugins.flowcontrol.edf_ordering_policy import EdfOrderingPolicy
from epp.plugins.flowcontrol.round_robin_fairness_policy import RoundRobinFairnessPolicy
from epp.plugins.flowcontrol.token_fair_share_policy import TokenFairSharePolicy

HEAD = ("apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
        "schedulingProfiles: [{name: d}]\n")

ERRORS = [
    ("""
featureGates: [flowControl]
flowControl:
  priorityBands: [{priority: 1, fairnessPolicyRef: x}]
""", 'flowControl.priorityBands[0].fairnessPolicyRef "x": no plugin or plugin type named "x"'),
    ("""
featureGates: [flowControl]
flowControl:
  defaultPriorityBand: {orderingPolicyRef: round-robin-fairness-policy}
""", 'flowControl.defaultPriorityBand.orderingPolicyRef "round-robin-fairness-policy": plugin type '
     '"round-robin-fairness-policy" is not an ordering policy'),
    ("""
featureGates: [flowControl]
plugins: [{name: fair, type: queue-scorer}]
flowControl:
  priorityBands: [{priority: 1}, {priority: 2, fairnessPolicyRef: fair}]
""", 'flowControl.priorityBands[1].fairnessPolicyRef "fair": plugin type "queue-scorer" is not a '
     "fairness policy"),
    # a section in the file is checked even while the gate is off
    ("""
flowControl:
  priorityBands: [{priority: 1, orderingPolicyRef: fcfs}]
""", 'flowControl.priorityBands[0].orderingPolicyRef "fcfs": no plugin or plugin type named "fcfs"'),
    ("""
featureGates: [flowControl]
flowControl: {priorityBands: [{maxRequests: 5}]}
""", 'flowControl.priorityBands[0]: missing required key "priority"'),
    ("""
flowControl: {maxBytes: lots}
""", "flowControl.maxBytes: invalid quantity 'lots'"),
]


@pytest.mark.parametrize(("body", "message"), ERRORS, ids=[m[:60] for _, m in ERRORS])
def test_bad_flow_control_fails_at_load_naming_the_field(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(HEAD + body)
    assert message in str(info.value)


def test_lookup_gives_declared_plugins_by_name_and_built_ins_by_type() -> None:
    cfg = load_config(HEAD + """
featureGates: [flowControl]
plugins:
- name: tenants
  type: token-fair-share-policy
flowControl:
  defaultPriorityBand: {fairnessPolicyRef: tenants}
  priorityBands:
  - {priority: 10, fairnessPolicyRef: round-robin-fairness-policy, orderingPolicyRef: edf-ordering-policy}
  - {priority: 20, fairnessPolicyRef: round-robin-fairness-policy}
""")
    assert cfg.flow_control is not None and cfg.flow_control.band(10).ordering_policy_ref == "edf-ordering-policy"
    bundle = build_scheduling(cfg, PluginContext(Datastore()))
    lookup = bundle.policies
    assert lookup("tenants") is bundle.plugins["tenants"]
    assert isinstance(lookup("tenants"), TokenFairSharePolicy)
    rr = lookup("round-robin-fairness-policy")
    assert isinstance(rr, RoundRobinFairnessPolicy)
    assert lookup("round-robin-fairness-policy") is rr  # one instance, shared by both bands
    assert isinstance(lookup("edf-ordering-policy"), EdfOrderingPolicy)
    assert lookup(DEFAULT_ORDERING_POLICY) is not None  # the default band's ordering
    assert lookup("not-referenced") is None


def test_gate_on_without_a_section_uses_the_default_policies() -> None:
    cfg = load_config(HEAD + "featureGates: [flowControl]\n")
    assert cfg.flow_control is not None and cfg.flow_control.priority_bands == ()
    lookup = build_scheduling(cfg, PluginContext(Datastore())).policies
    assert lookup(DEFAULT_FAIRNESS_POLICY) is not None and lookup(DEFAULT_ORDERING_POLICY) is not None


def test_gate_off_builds_no_policies() -> None:
    cfg = load_config(HEAD + "flowControl: {maxRequests: 10}\n")
    assert not cfg.flow_control_enabled and cfg.flow_control is not None
    assert build_scheduling(cfg, PluginContext(Datastore())).policies(DEFAULT_FAIRNESS_POLICY) is None
    assert load_config(HEAD).flow_control is None
