"""The targeted metrics parser: real vLLM page, engine mappings, DP series, overrides, garbage."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer.metric_mapping import BUILTIN_MAPPINGS, ENGINE_TYPE_LABEL, MetricMapping, MetricSpec
from epp.datalayer.metrics_parser import MetricsParser, ParserSet, parse_labels, parse_metrics
from epp.framework.datalayer import EndpointMetrics

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "vllm_metrics_sample.txt"


@pytest.fixture(scope="module")
def sample() -> str:
    return SAMPLE.read_text()


def test_real_vllm_sample(sample: str) -> None:
    m, missing = parse_metrics(sample)
    assert missing == frozenset()
    assert m.waiting_queue_size == 2
    assert m.running_requests_size == 4
    assert m.kv_cache_usage == 0.851063829787234
    # two lora_requests_info series; the one with the larger value (newest) has empty sets
    assert m.active_adapters == frozenset()
    assert m.waiting_adapters == frozenset()
    assert m.max_adapters == 2
    assert m.cache_block_size == 32
    assert m.cache_num_blocks == 48
    assert m.updated_at == 0.0  # stamped by the scraper, not the parser


def test_matches_prometheus_client_parser(sample: str) -> None:
    """Cross-check every field against the reference parser on the same page."""
    ref: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(sample):
        for s in fam.samples:
            ref.setdefault(s.name, []).append((s.labels, s.value))
    m, _ = parse_metrics(sample)
    assert m.waiting_queue_size == sum(v for _, v in ref["vllm:num_requests_waiting"])
    assert m.running_requests_size == sum(v for _, v in ref["vllm:num_requests_running"])
    kv = ref["vllm:kv_cache_usage_perc"]
    assert m.kv_cache_usage == pytest.approx(sum(v for _, v in kv) / len(kv))
    lora_labels, _ = max(ref["vllm:lora_requests_info"], key=lambda lv: lv[1])
    assert m.max_adapters == int(lora_labels["max_lora"])
    assert m.active_adapters == frozenset(filter(None, lora_labels["running_lora_adapters"].split(",")))
    assert m.waiting_adapters == frozenset(filter(None, lora_labels["waiting_lora_adapters"].split(",")))
    (cache_labels, _), = ref["vllm:cache_config_info"]
    assert m.cache_block_size == int(cache_labels["block_size"])
    assert m.cache_num_blocks == int(cache_labels["num_gpu_blocks"])


def test_lora_largest_value_wins_regardless_of_order() -> None:
    text = (
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b",waiting_lora_adapters="c"} 200.0\n'
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 100.0\n'
    )
    m, missing = parse_metrics(text)
    assert m.active_adapters == {"a", "b"}
    assert m.waiting_adapters == {"c"}
    assert m.max_adapters == 4
    assert "vllm:num_requests_waiting" in missing


def test_data_parallel_engines_sum_queues_and_average_kv() -> None:
    text = """\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 5.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 99.0
vllm:num_requests_running{engine="0",model_name="m"} 7.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6
"""
    m, missing = parse_metrics(text)
    assert m.waiting_queue_size == 8  # the _by_reason family sharing the prefix is ignored
    assert m.running_requests_size == 8
    assert m.kv_cache_usage == pytest.approx(0.4)
    assert missing == set()  # LoRA info (LoRA off) and cache config are optional: not reported
    assert m.cache_block_size is None and m.active_adapters == frozenset()


def test_old_gpu_cache_usage_fallback() -> None:
    text = "vllm:num_requests_waiting 1\nvllm:num_requests_running 2\nvllm:gpu_cache_usage_perc 0.25\n"
    m, missing = parse_metrics(text)
    assert m.kv_cache_usage == 0.25
    assert "vllm:kv_cache_usage_perc" not in missing
    # the new name wins when both are present
    m2, _ = parse_metrics(text + "vllm:kv_cache_usage_perc 0.75\n")
    assert m2.kv_cache_usage == 0.75


def test_sglang_mapping() -> None:
    text = """\
sglang:num_queue_reqs{model_name="qwen"} 6.0
sglang:num_running_reqs{model_name="qwen"} 9.0
sglang:token_usage{model_name="qwen"} 0.5
sglang:cache_config_info{page_size="16",num_pages="1024",model_name="qwen"} 1.0
vllm:num_requests_waiting 100
"""
    m, missing = parse_metrics(text, "sglang")
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage) == (6, 9, 0.5)
    assert (m.cache_block_size, m.cache_num_blocks) == (16, 1024)
    assert missing == frozenset()


def test_trtllm_serve_mapping() -> None:
    text = """\
trtllm_num_requests_waiting 2
trtllm_num_requests_running 3
trtllm_kv_cache_utilization 0.125
trtllm_kv_cache_tokens_per_block 32
trtllm_kv_cache_max_blocks 4096
"""
    m, missing = parse_metrics(text, "trtllm-serve")
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage) == (2, 3, 0.125)
    assert (m.cache_block_size, m.cache_num_blocks) == (32, 4096)
    assert not missing


def test_triton_label_selectors() -> None:
    text = """\
nv_trt_llm_request_metrics{model="ensemble",request_type="waiting",version="1"} 4
nv_trt_llm_request_metrics{model="ensemble",request_type="scheduled",version="1"} 8
nv_trt_llm_request_metrics{model="ensemble",request_type="max",version="1"} 512
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="ensemble"} 0.3
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="ensemble"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="ensemble"} 2000
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="ensemble"} 600
"""
    m, missing = parse_metrics(text, "triton-tensorrt-llm")
    assert (m.waiting_queue_size, m.running_requests_size) == (4, 8)
    assert m.kv_cache_usage == pytest.approx(0.3)
    assert (m.cache_block_size, m.cache_num_blocks) == (64, 2000)
    assert not missing


@pytest.mark.parametrize("text", [
    "",
    "\n\n\n",
    "vllm:num_requests_waiting",
    "vllm:num_requests_waiting{",
    'vllm:num_requests_waiting{engine="0"',
    "vllm:num_requests_waiting notanumber",
    'vllm:lora_requests_info{max_lora=2,running_lora_adapters="a"} 1',
    'vllm:lora_requests_info{max_lora="x",running_lora_adapters="a\\',
    'vllm:cache_config_info{block_size="None",num_gpu_blocks="None"} 1',
    "vllm:kv_cache_usage_perc NaN\nvllm:num_requests_running +Inf\nvllm:num_requests_waiting 1e400",
    "\x00\xff\ufffd garbage {}}{ = \"\n" * 50,
])
def test_garbage_never_raises(text: str) -> None:
    m, _ = parse_metrics(text)
    assert isinstance(m, EndpointMetrics)


def test_garbled_line_does_not_spoil_the_page() -> None:
    text = "vllm:num_requests_waiting{engine=\"0\" 3\nvllm:num_requests_waiting{engine=\"1\"} 2\n"
    m, missing = parse_metrics(text)
    assert m.waiting_queue_size == 2
    assert "vllm:num_requests_waiting" not in missing


def test_timestamps_and_spacing() -> None:
    text = "vllm:num_requests_waiting 3 1700000000000\nvllm:num_requests_running {engine=\"0\"}  4.0\n"
    m, _ = parse_metrics(text)
    assert (m.waiting_queue_size, m.running_requests_size) == (3, 4)


def test_label_escapes() -> None:
    labels, end = parse_labels('x{a="q\\"uote",b="back\\\\slash",c="new\\nline",d="x}y"} 1', 1)
    assert labels == {"a": 'q"uote', "b": "back\\slash", "c": "new\nline", "d": "x}y"}
    assert end == len('x{a="q\\"uote",b="back\\\\slash",c="new\\nline",d="x}y"}')


# ---- specs and overrides ----

def test_spec_syntax() -> None:
    assert MetricSpec.parse("foo") == MetricSpec("foo")
    assert MetricSpec.parse("  ") is None
    assert MetricSpec.parse("a:b{x=y}") == MetricSpec("a:b", (("x", "y"),))
    assert MetricSpec.parse('a{x="y", z=w}') == MetricSpec("a", (("x", "y"), ("z", "w")))
    assert MetricSpec.parse('a{x="a,b"}') == MetricSpec("a", (("x", "a,b"),))
    assert str(MetricSpec.parse("a{x=y}")) == 'a{x="y"}'
    for bad in ("1abc", "a{x}", "a{x!=y}", "a{x=~y}", "a b"):
        with pytest.raises(ValueError, match="bad metric spec"):
            MetricSpec.parse(bad)


def test_override_one_field_and_disable_another() -> None:
    mapping = BUILTIN_MAPPINGS["vllm"].with_overrides(
        {"queuedRequestsSpec": 'my_queue{pool="a"}', "loraSpec": ""})
    text = ('my_queue{pool="a"} 5\nmy_queue{pool="b"} 50\n'
            'vllm:num_requests_waiting 9\nvllm:num_requests_running 1\n')
    m, missing = MetricsParser(mapping).parse(text)
    assert m.waiting_queue_size == 5
    assert m.running_requests_size == 1
    assert "vllm:lora_requests_info" not in missing  # disabled, not missing
    assert "vllm:kv_cache_usage_perc" in missing


def test_engine_configs_replace_whole_entry_and_select_by_label() -> None:
    parsers = ParserSet({
        "vllm": {"queuedRequestsSpec": "q", "runningRequestsSpec": "r", "kvUsageSpec": "kv"},
        "custom": MetricMapping.from_config({"kvUsageSpec": "custom_kv"}),
    })
    vllm, known = parsers.for_labels({})
    assert known
    m, missing = vllm.parse("q 1\nr 2\nkv 0.5\nvllm:num_requests_waiting 7\n")
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage) == (1, 2, 0.5)
    assert missing == frozenset()  # lora/cache info not configured → not looked for
    custom, known = parsers.for_labels({ENGINE_TYPE_LABEL: "custom"})
    assert known and custom.parse("custom_kv 0.9\n")[0].kv_cache_usage == 0.9
    sg, known = parsers.for_labels({ENGINE_TYPE_LABEL: "sglang"})
    assert known and sg.mapping is BUILTIN_MAPPINGS["sglang"]
    fallback, known = parsers.for_labels({ENGINE_TYPE_LABEL: "mystery"})
    assert not known and fallback is vllm


def test_engine_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"engineConfigs\[x\]\.queueSpec: unknown field"):
        ParserSet({"x": {"queueSpec": "a"}})
    with pytest.raises(ValueError, match=r"engineConfigs\[x\]\.kvUsageSpec: bad metric spec"):
        ParserSet({"x": {"kvUsageSpec": "a{b}"}})


def test_plugin_style_engine_specs_keep_unset_fields() -> None:
    """``core-metrics-extractor`` entries: None keeps the built-in field, "" disables it."""
    vllm_override = SimpleNamespace(
        name="vllm", queued_requests_spec="q{x=1}", running_requests_spec=None,
        kv_usage_spec=None, lora_spec="", cache_info_spec=None)
    new_engine = SimpleNamespace(
        name="mine", queued_requests_spec="mq", running_requests_spec="mr",
        kv_usage_spec="mkv", lora_spec=None, cache_info_spec="mine_cache")
    parsers = ParserSet([vllm_override, new_engine], engine_label_key="engine")
    vllm, _ = parsers.for_labels({ENGINE_TYPE_LABEL: "ignored, other key"})
    m, missing = vllm.parse('q{x="1"} 4\nq{x="2"} 40\n' + SAMPLE.read_text())
    assert m.waiting_queue_size == 4
    assert m.running_requests_size == 4 and m.cache_block_size == 32  # built-ins kept
    assert m.max_adapters == 0  # lora disabled
    assert not missing
    mine, known = parsers.for_labels({"engine": "mine"})
    assert known
    m, missing = mine.parse('mq 1\nmr 2\nmkv 0.3\nmine_cache{block_size="16",num_gpu_blocks="8"} 1\n')
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage) == (1, 2, 0.3)
    assert (m.cache_block_size, m.cache_num_blocks) == (16, 8)
    assert not missing
    with pytest.raises(ValueError, match="default engine type"):
        ParserSet(default_engine="nope")
