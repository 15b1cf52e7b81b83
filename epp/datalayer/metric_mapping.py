"""Which metric series feed which ``EndpointMetrics`` field, per model-server engine type.

This is the configuration half of metrics scraping (the scan itself is
:mod:`epp.datalayer.metrics_parser`): PromQL-style selectors (``MetricSpec``), the per-engine
``MetricMapping`` with GIE's built-in entries for vLLM, SGLang, TensorRT-LLM and Triton, and
``build_mappings``, which applies ``engineConfigs`` from the EndpointPickerConfig. It is
separate from the scan because it runs once at start and its job is validation (a bad
selector fails with a message naming the config field), while the scan runs every 50 ms per
pod and must never raise.

Mapping per engine type (pod label ``inference.networking.k8s.io/engine-type``, default
``vllm``) follows GIE's core metrics extractor; each field is a PromQL-style instant selector
``name{label=value,...}`` (quotes optional) and can be overridden or disabled (empty spec).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ENGINE_TYPE_LABEL = "inference.networking.k8s.io/engine-type"
DEFAULT_ENGINE_TYPE = "vllm"

_SELECTOR_RE = re.compile(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*", re.DOTALL)
_MATCHER_RE = re.compile(
    r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=(?![~=])\s*(?:\"((?:[^\"\\]|\\.)*)\"|([^,\"\s~]*))\s*(?:,|$)"
)


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


@dataclass(slots=True, frozen=True)
class MetricSpec:
    """One PromQL-style instant selector: a family name plus equality label matchers."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MetricSpec | None:
        """Parse ``name`` or ``name{a=b,c="d"}``; an empty string returns None (disabled).

        Raises ValueError naming the spec when it is malformed (only ``=`` matchers exist).
        """
        text = text.strip()
        if not text:
            return None
        m = _SELECTOR_RE.fullmatch(text)
        if m is None:
            raise ValueError(f"bad metric spec {text!r}: expected name or name{{label=value,...}}")
        name, body = m.group(1), m.group(2)
        labels: list[tuple[str, str]] = []
        if body is not None and body.strip():
            pos = 0
            body = body.strip()
            while pos < len(body):
                lm = _MATCHER_RE.match(body, pos)
                if lm is None or lm.end() == pos:
                    raise ValueError(
                        f"bad metric spec {text!r}: label matchers must be label=value "
                        f"(near {body[pos:]!r})"
                    )
                value = lm.group(2) if lm.group(2) is not None else lm.group(3)
                labels.append((lm.group(1), _unescape(value)))
                pos = lm.end()
        return cls(name, tuple(labels))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k, "") == v for k, v in self.labels)

    def __str__(self) -> str:
        if not self.labels:
            return self.name
        inner = ",".join(f'{k}="{v}"' for k, v in self.labels)
        return f"{self.name}{{{inner}}}"


def _spec(text: str) -> MetricSpec:
    spec = MetricSpec.parse(text)
    assert spec is not None
    return spec


def _specs(value: Any, field_name: str) -> tuple[MetricSpec, ...]:
    """A config value → tuple of alternatives (first present wins). Accepts str or list."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    out: list[MetricSpec] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{field_name}: expected a metric spec string, got {item!r}")
        try:
            spec = MetricSpec.parse(item)
        except ValueError as e:
            raise ValueError(f"{field_name}: {e}") from None
        if spec is not None:
            out.append(spec)
    return tuple(out)


@dataclass(slots=True, frozen=True)
class MetricMapping:
    """Which series feed which ``EndpointMetrics`` field, for one engine type.

    Each gauge field is a tuple of alternative selectors: the first one present on the page
    is used (vLLM renamed ``gpu_cache_usage_perc`` to ``kv_cache_usage_perc``). An empty
    tuple disables the field.
    """

    queued: tuple[MetricSpec, ...] = ()
    running: tuple[MetricSpec, ...] = ()
    kv_usage: tuple[MetricSpec, ...] = ()
    lora: MetricSpec | None = None
    cache_info: MetricSpec | None = None
    cache_info_block_size_label: str = "block_size"
    cache_info_num_blocks_label: str = "num_gpu_blocks"
    block_size: tuple[MetricSpec, ...] = ()  # a gauge whose value is tokens per block
    num_blocks: tuple[MetricSpec, ...] = ()  # a gauge whose value is the block count

    # camelCase config keys (engineConfigs entries) → attribute names
    _KEYS = {
        "queuedRequestsSpec": "queued",
        "runningRequestsSpec": "running",
        "kvUsageSpec": "kv_usage",
        "loraSpec": "lora",
        "cacheInfoSpec": "cache_info",
        "cacheInfoBlockSizeLabel": "cache_info_block_size_label",
        "cacheInfoNumBlocksLabel": "cache_info_num_blocks_label",
        "blockSizeSpec": "block_size",
        "numBlocksSpec": "num_blocks",
    }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, where: str = "engineConfigs") -> MetricMapping:
        """Build from a config mapping with the camelCase keys above (unknown keys fail).

        A key left out is disabled: an ``engineConfigs`` entry replaces the whole built-in
        entry of the same engine type, as in GIE.
        """
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            attr = cls._KEYS.get(key)
            if attr is None:
                raise ValueError(f"{where}.{key}: unknown field (expected one of {sorted(cls._KEYS)})")
            if attr in ("lora", "cache_info"):
                specs = _specs(value, f"{where}.{key}")
                if len(specs) > 1:
                    raise ValueError(f"{where}.{key}: takes a single metric spec")
                kwargs[attr] = specs[0] if specs else None
            elif attr.endswith("_label"):
                if not isinstance(value, str) or not value:
                    raise ValueError(f"{where}.{key}: expected a label name")
                kwargs[attr] = value
            else:
                kwargs[attr] = _specs(value, f"{where}.{key}")
        return cls(**kwargs)

    def with_overrides(self, overrides: Mapping[str, Any], *, where: str = "overrides") -> MetricMapping:
        """A copy with some fields replaced (same keys as ``from_config``; "" disables)."""
        base = {key: getattr(self, attr) for key, attr in self._KEYS.items()}
        merged: dict[str, Any] = {}
        for key, value in base.items():
            if isinstance(value, MetricSpec):
                merged[key] = str(value)
            elif isinstance(value, tuple):
                merged[key] = [str(s) for s in value]
            else:
                merged[key] = value
        for key, value in overrides.items():
            if key not in self._KEYS:
                raise ValueError(f"{where}.{key}: unknown field (expected one of {sorted(self._KEYS)})")
            merged[key] = value
        return MetricMapping.from_config(merged, where=where)


BUILTIN_MAPPINGS: dict[str, MetricMapping] = {
    "vllm": MetricMapping(
        queued=(_spec("vllm:num_requests_waiting"),),
        running=(_spec("vllm:num_requests_running"),),
        kv_usage=(_spec("vllm:kv_cache_usage_perc"), _spec("vllm:gpu_cache_usage_perc")),
        lora=_spec("vllm:lora_requests_info"),
        cache_info=_spec("vllm:cache_config_info"),
        cache_info_block_size_label="block_size",
        cache_info_num_blocks_label="num_gpu_blocks",
    ),
    "sglang": MetricMapping(
        queued=(_spec("sglang:num_queue_reqs"),),
        running=(_spec("sglang:num_running_reqs"),),
        kv_usage=(_spec("sglang:token_usage"),),
        cache_info=_spec("sglang:cache_config_info"),
        cache_info_block_size_label="page_size",
        cache_info_num_blocks_label="num_pages",
    ),
    "trtllm-serve": MetricMapping(
        queued=(_spec("trtllm_num_requests_waiting"),),
        running=(_spec("trtllm_num_requests_running"),),
        kv_usage=(_spec("trtllm_kv_cache_utilization"),),
        block_size=(_spec("trtllm_kv_cache_tokens_per_block"),),
        num_blocks=(_spec("trtllm_kv_cache_max_blocks"),),
    ),
    "triton-tensorrt-llm": MetricMapping(
        queued=(_spec("nv_trt_llm_request_metrics{request_type=waiting}"),),
        running=(_spec("nv_trt_llm_request_metrics{request_type=scheduled}"),),
        kv_usage=(_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"),),
        block_size=(_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}"),),
        num_blocks=(_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"),),
    ),
}


EngineConfigs = Mapping[str, MetricMapping | Mapping[str, Any]] | Iterable[Any]
"""What ``engine_configs`` accepts:

* a mapping engine type → ``MetricMapping`` or a camelCase dict (``from_config``): the entry
  replaces the whole built-in entry of that engine (GIE's ``engineConfigs`` semantics);
* an iterable of spec objects with ``name`` and ``queued_requests_spec`` /
  ``running_requests_spec`` / ``kv_usage_spec`` / ``lora_spec`` / ``cache_info_spec``
  attributes (the ``core-metrics-extractor`` plugin's ``EngineMetricSpecs``): ``None`` keeps
  the built-in selector of that field, ``""`` disables it, a string replaces it.
"""

_SPEC_ATTRS = {
    "queued_requests_spec": "queuedRequestsSpec",
    "running_requests_spec": "runningRequestsSpec",
    "kv_usage_spec": "kvUsageSpec",
    "lora_spec": "loraSpec",
    "cache_info_spec": "cacheInfoSpec",
}


def build_mappings(engine_configs: EngineConfigs | None = None) -> dict[str, MetricMapping]:
    """Built-in mappings with ``engineConfigs`` entries applied (see ``EngineConfigs``)."""
    out = dict(BUILTIN_MAPPINGS)
    if engine_configs is None:
        return out
    if isinstance(engine_configs, Mapping):
        for engine, cfg in engine_configs.items():
            out[engine] = cfg if isinstance(cfg, MetricMapping) else MetricMapping.from_config(
                cfg, where=f"engineConfigs[{engine}]")
        return out
    for item in engine_configs:
        engine = getattr(item, "name", None)
        if not isinstance(engine, str) or not engine:
            raise ValueError(f"engineConfigs: entry {item!r} has no engine name")
        overrides = {key: getattr(item, attr) for attr, key in _SPEC_ATTRS.items()
                     if getattr(item, attr, None) is not None}
        base = BUILTIN_MAPPINGS.get(engine, MetricMapping())
        out[engine] = base.with_overrides(overrides, where=f"engineConfigs[{engine}]")
    return out
