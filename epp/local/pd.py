"""Picker configuration and pool files for local P/D topologies (demo, tests, benchmarks).

``manifests/config/pd-config.yaml`` is the same configuration for Kubernetes, with comments.
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml

from epp.framework.datalayer import ROLE_LABEL


def pd_picker_config(non_cached_tokens: int = 256, prompt_tokens: int = 512, *, always: bool = False,
                     block_size_tokens: int = 16) -> str:
    """An EndpointPickerConfig with the disagg handler and a decode and a prefill profile.

    ``always`` swaps the prefix-based decider for ``always-disagg-pd-decider``.
    """
    decider = ("- {type: always-disagg-pd-decider, name: decider}" if always else
               "- type: prefix-based-pd-decider\n  name: decider\n  parameters: "
               f"{{nonCachedTokens: {non_cached_tokens}, promptTokens: {prompt_tokens}}}")
    profile = """  - pluginRef: {flt}
  - {{pluginRef: prefix-cache-scorer, weight: 2}}
  - {{pluginRef: queue-scorer, weight: 1}}
  - pluginRef: max-score-picker"""
    return f"""apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-filter
- type: decode-filter
- type: approx-prefix-cache-producer
  parameters: {{blockSizeTokens: {block_size_tokens}, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}}
- type: prefix-cache-scorer
- type: queue-scorer
- type: max-score-picker
{decider}
- type: disagg-profile-handler
  parameters:
    profiles: {{decode: decode, prefill: prefill}}
    deciders: {{prefill: decider}}
schedulingProfiles:
- name: decode
  plugins:
{profile.format(flt="decode-filter")}
- name: prefill
  plugins:
{profile.format(flt="prefill-filter")}
"""


def pd_pool_file(prefill: Sequence[tuple[str, int]], decode: Sequence[tuple[str, int, int]]) -> str:
    """Pool-file YAML: prefill pods ``(ip, port)`` and decode pods ``(ip, sidecar port, engine
    port)`` — the picker routes to the sidecar and scrapes metrics from the engine."""
    endpoints: list[dict[str, object]] = [
        {"name": f"prefill-{i}", "address": h, "port": p, "labels": {ROLE_LABEL: "prefill"}}
        for i, (h, p) in enumerate(prefill)
    ]
    endpoints += [
        {"name": f"decode-{i}", "address": h, "port": p, "metricsPort": m, "labels": {ROLE_LABEL: "decode"}}
        for i, (h, p, m) in enumerate(decode)
    ]
    return yaml.safe_dump({"endpoints": endpoints}, sort_keys=False)
