"""Run N simulated vLLM pods in one process: pod i serves HTTP on --port + i and publishes KV
events on --kv-events-port + i. Durations are simulated seconds (scaled by --time-scale);
defaults model Llama-3.1-8B on one H100 (llm-d-inference-sim's 8b-h100 per-token profile)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys

from epp.sim.config import SimConfig, parse_lora_module
from epp.sim.pool import SimPool

_D = SimConfig()

# (SimConfig field, help). Flag = --field-with-dashes; type and default from the dataclass.
_KNOBS: tuple[tuple[str, str], ...] = (
    ("model_path", "model path shown as 'root' in /v1/models (default: the served name)"),
    ("tokenizer", "local Hugging Face tokenizer directory (tokenizer.json [+ tokenizer_config.json]); "
                  "needs the optional 'tokenizers' package; default: built-in deterministic tokenizer"),
    ("max_model_len", "maximum prompt + output tokens per request (longer requests get 400)"),
    ("default_max_tokens", "output tokens when a request sets neither max_tokens nor max_completion_tokens"),
    ("max_num_seqs", "maximum running sequences per engine step (beyond: FCFS waiting queue)"),
    ("max_num_batched_tokens", "token budget per engine step (chunked prefill)"),
    ("max_waiting_queue_length", "waiting requests beyond which new ones get 429"),
    ("block_size", "KV-cache block size in tokens"),
    ("num_gpu_blocks", "KV-cache blocks (one is vLLM's reserved null block)"),
    ("enable_prefix_caching", "automatic prefix caching"),
    ("gpu_memory_utilization", "reported in vllm:cache_config_info only"),
    ("time_scale", "multiply every simulated duration (0.1 = ten times faster)"),
    ("prefill_overhead", "seconds added when a request's prefill starts"),
    ("prefill_time_per_token", "seconds per uncached prompt token"),
    ("inter_token_latency", "seconds per decode step"),
    ("time_factor_under_load", "latency multiplier reached at max-num-seqs running (1 = none)"),
    ("kv_transfer_time_per_token", "P/D decode leg: seconds per transferred prompt token"),
    ("kv_transfer_overhead", "P/D decode leg: fixed seconds per transfer"),
    ("enable_lora", "publish vllm:lora_requests_info even without --lora-modules"),
    ("max_loras", "distinct LoRA adapters per running batch (GPU slots)"),
    ("lora_load_delay", "seconds added when an adapter is loaded into a GPU slot"),
    ("lora_load_time", "seconds a runtime adapter load (disk read) takes; engine steps pause meanwhile, "
                       "and an adapter evicted from the CPU cache pays it again when next used"),
    ("max_cpu_loras", "adapters kept in CPU memory (LRU; 0 = --max-loras, vLLM's default)"),
    ("kv_side_channel_host", "remote_host in returned kv_transfer_params"),
    ("kv_side_channel_port", "remote_port base in returned kv_transfer_params (pod i: base + i)"),
    ("kv_events_topic", "KV-event topic; {host} {port} {model} {pod} are substituted"),
    ("kv_events_buffer_steps", "batches kept for replay"),
    ("namespace", "value of the x-inference-namespace response header"),
    ("pod_name_prefix", "pod names are <prefix><http port>"),
    ("failure_injection_rate", "percent (0-100) of completion requests answered with an injected error"),
    ("added_latency", "seconds slept before handling each completion request (not time-scaled)"),
    ("seed", "random seed for failure injection"),
    ("histogram_refresh", "re-render histogram lines of /metrics at most this often (seconds)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every SimConfig knob as a flag, plus the pool layout."""
    pool = parser.add_argument_group("pool")
    pool.add_argument("--replicas", type=int, default=1, help="number of pods")
    pool.add_argument("--host", default="127.0.0.1", help="address to listen on (HTTP and ZMQ)")
    pool.add_argument("--port", type=int, default=8001, help="HTTP port of pod 0 (pod i: port + i; 0 = any)")
    pool.add_argument("--kv-events-port", type=int, default=5557,
                      help="ZMQ PUB port of pod 0 (pod i: + i; 0 = any; -1 = no KV events)")
    pool.add_argument("--kv-events-replay-port", type=int, default=None,
                      help="ZMQ ROUTER replay port of pod 0 (pod i: + i; 0 = any; default: no replay)")
    pool.add_argument("--pod-names", nargs="+", default=None, help="explicit pod names (default <prefix><port>)")
    model = parser.add_argument_group("model")
    model.add_argument("--served-model-name", nargs="+", default=list(_D.served_model_names),
                       help="served model name(s); the first is the metrics model_name label")
    model.add_argument("--lora-modules", nargs="+", default=[],
                       help="LoRA adapters: name=path or JSON {'name','path','base_model_name'}")
    model.add_argument("--failure-types", nargs="+", default=list(_D.failure_types),
                       help="injected failure types: rate_limit invalid_api_key context_length server_error "
                            "invalid_request model_not_found")
    knobs = parser.add_argument_group("engine, timing, KV cache, LoRA, P/D, failures")
    for name, help_text in _KNOBS:
        default = getattr(_D, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            knobs.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif name == "tokenizer":
            knobs.add_argument(flag, default=None, help=help_text)
        else:
            knobs.add_argument(flag, type=type(default), default=default, help=help_text)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    values = {name: getattr(args, name) for name, _ in _KNOBS}
    cfg = SimConfig(
        served_model_names=list(args.served_model_name),
        lora_modules=[parse_lora_module(s) for s in args.lora_modules],
        failure_types=list(args.failure_types),
        **values,
    )
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1 (got {args.replicas})")
    cfg.validate()
    return cfg


async def _serve(args: argparse.Namespace, cfg: SimConfig) -> int:
    kv_port = None if args.kv_events_port < 0 else args.kv_events_port
    pool = SimPool(cfg, replicas=args.replicas, base_port=args.port, host=args.host,
                   kv_events_base_port=kv_port, kv_replay_base_port=args.kv_events_replay_port,
                   names=args.pod_names)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with pool:
        for pod in pool.pods:
            extra = f" kv-events {pod.kv_events_endpoint}" if pod.kv_events_endpoint else ""
            if pod.kv_replay_endpoint:
                extra += f" replay {pod.kv_replay_endpoint}"
            print(f"sim pod {pod.name} ready on {pod.url}{extra}", flush=True)
        await stop.wait()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"epp sim: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop  # optional: ~2x cheaper event loop
    except ImportError:
        return asyncio.run(_serve(args, cfg))
    return uvloop.run(_serve(args, cfg))


def fields_without_flags() -> list[str]:
    """SimConfig fields no flag sets (kept empty by a test, so every knob stays on the CLI)."""
    covered = {n for n, _ in _KNOBS} | {"served_model_names", "lora_modules", "failure_types"}
    return [f.name for f in dataclasses.fields(SimConfig) if f.name not in covered]
