"""Request streams for the routing benchmark: what is sent, when, and what caching it allows.

A workload is generated entirely up front from a seed, so every router under test receives
byte-identical bodies at identical offsets. Prompts are built from a fixed vocabulary of
lowercase pseudo-words: the simulator's built-in tokenizer turns every `` word`` into exactly
one token, so token counts (and therefore the ideal prefix-cache hit rate) are known without a
tokenizer. Shapes follow inference-perf / llm-d-benchmark:

* ``shared-prefix``: G groups, each with a long system prompt; every request is one group's
  system prompt plus a fresh question (the llm-d "precise prefix cache" shape, scaled down).
* ``multi-turn-chat``: chat sessions (each opened on one of G shared system prompts) whose
  prompt grows by one question and one answer per turn; a turn starts only after the
  previous one finished (closed within a session, open-loop across sessions).
* ``random``: unrelated prompts; no reuse at all (checks that cleverness costs nothing).
* ``multi-lora``: unrelated prompts spread over LoRA adapters (Zipf-like popularity).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

WORKLOADS = ("shared-prefix", "multi-turn-chat", "random", "multi-lora")
MODEL = "sim-model"


@dataclass(slots=True)
class WorkloadParams:
    kind: str = "shared-prefix"
    seed: int = 0
    rate: float = 10.0  # requests per second offered
    arrival: str = "poisson"  # or "constant"
    duration: float = 60.0  # seconds of arrivals
    max_requests: int = 0  # 0 = bounded by duration only
    groups: int = 64
    system_prompt_len: int = 2000  # tokens
    question_len: int = 200  # tokens
    output_len: int = 32  # tokens
    prompt_len: int = 1000  # random / multi-lora prompt tokens
    turns: int = 5  # multi-turn-chat
    think_time: float = 2.0  # mean seconds between a turn's end and the next turn's start
    lora_adapters: int = 8
    block_size: int = 16

    def describe(self) -> dict[str, Any]:
        keep = {
            "shared-prefix": ("groups", "system_prompt_len", "question_len", "output_len"),
            "multi-turn-chat": ("groups", "system_prompt_len", "question_len", "output_len", "turns", "think_time"),
            "random": ("prompt_len", "output_len"),
            "multi-lora": ("prompt_len", "output_len", "lora_adapters"),
        }[self.kind]
        d: dict[str, Any] = {"kind": self.kind, "seed": self.seed, "arrival": self.arrival,
                             "duration": self.duration, "max_requests": self.max_requests,
                             "block_size": self.block_size}
        d.update({k: getattr(self, k) for k in keep})
        return d


@dataclass(slots=True)
class Item:
    """One request of the stream. ``at`` is the offset from the run start (seconds)."""

    idx: int
    at: float
    path: str
    body: bytes
    group: int = -1
    session: int = -1
    turn: int = 0
    #: prompt tokens a perfect router could serve from cache, when known up front
    #: (shared prefix); multi-turn adds the previous turn's prompt at run time
    ideal_cached: int = 0
    model: str = MODEL
    #: index of the previous turn of the same session (it must finish first), or -1
    after: int = -1
    extra: dict[str, Any] = field(default_factory=dict)


class _Words:
    """Deterministic pseudo-word vocabulary (small, so the simulator's tokenizer cache stays warm)."""

    def __init__(self, rng: random.Random, n: int = 3000) -> None:
        letters = "abcdefghijklmnopqrstuvwxyz"
        seen: set[str] = set()
        while len(seen) < n:
            seen.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 8))))
        self.words = sorted(seen)

    def text(self, rng: random.Random, n: int) -> str:
        return " ".join(rng.choices(self.words, k=n))


def _arrivals(p: WorkloadParams, rng: random.Random, rate: float) -> Iterator[float]:
    t = 0.0
    while True:
        t += rng.expovariate(rate) if p.arrival == "poisson" else 1.0 / rate
        if t >= p.duration:
            return
        yield t


def _completion(prompt: str, p: WorkloadParams, model: str = MODEL) -> bytes:
    return orjson.dumps({
        "model": model, "prompt": prompt, "max_tokens": p.output_len, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0,
    })


def _chat(messages: list[dict[str, str]], p: WorkloadParams) -> bytes:
    return orjson.dumps({
        "model": MODEL, "messages": messages, "max_tokens": p.output_len, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0,
    })


def _aligned(tokens: int, block: int) -> int:
    return tokens // block * block


def generate(p: WorkloadParams) -> list[Item]:
    """The whole request stream, sorted by arrival offset."""
    if p.kind not in WORKLOADS:
        raise ValueError(f"unknown workload {p.kind!r}; choose from {', '.join(WORKLOADS)}")
    rng = random.Random(p.seed)
    words = _Words(random.Random(p.seed ^ 0x5EED))
    items: list[Item] = []
    cap = p.max_requests or 1 << 62

    if p.kind == "shared-prefix":
        systems = [words.text(rng, p.system_prompt_len) for _ in range(p.groups)]
        seen: set[int] = set()
        # BOS + the system prompt's words; only whole blocks can be shared.
        shareable = _aligned(1 + p.system_prompt_len, p.block_size)
        for t in _arrivals(p, rng, p.rate):
            if len(items) >= cap:
                break
            g = rng.randrange(p.groups)
            prompt = systems[g] + " " + words.text(rng, p.question_len)
            items.append(Item(len(items), t, "/v1/completions", _completion(prompt, p), group=g,
                              ideal_cached=shareable if g in seen else 0))
            seen.add(g)
    elif p.kind == "multi-turn-chat":
        systems = [words.text(rng, p.system_prompt_len) for _ in range(p.groups)]
        session_rate = p.rate / max(1, p.turns)
        session = 0
        seen_groups: set[int] = set()
        # a new session on a known system prompt can reuse it (lower bound: the chat template
        # adds a few tokens); later turns reuse the previous turn's prompt (set at run time)
        shared_system = _aligned(1 + p.system_prompt_len, p.block_size)
        for start in _arrivals(p, rng, session_rate):
            g = rng.randrange(p.groups)
            messages = [{"role": "system", "content": systems[g]}]
            at, prev = start, -1
            for turn in range(p.turns):
                if len(items) >= cap:
                    break
                messages.append({"role": "user", "content": words.text(rng, p.question_len)})
                items.append(Item(len(items), at, "/v1/chat/completions", _chat(messages, p), group=g,
                                  session=session, turn=turn, after=prev,
                                  ideal_cached=shared_system if g in seen_groups else 0))
                seen_groups.add(g)
                prev = len(items) - 1
                # the assistant's answer as the client will send it back next turn
                messages.append({"role": "assistant", "content": words.text(rng, p.output_len)})
                at += rng.expovariate(1.0 / p.think_time) if p.think_time > 0 else 0.0
            session += 1
        items.sort(key=lambda it: it.at)
        remap = {it.idx: n for n, it in enumerate(items)}
        for n, it in enumerate(items):
            it.idx = n
            it.after = remap[it.after] if it.after >= 0 else -1
    else:
        adapters = [f"lora-{i}" for i in range(p.lora_adapters)] if p.kind == "multi-lora" else []
        weights = [1.0 / (i + 1) for i in range(len(adapters))]
        for t in _arrivals(p, rng, p.rate):
            if len(items) >= cap:
                break
            model = rng.choices(adapters, weights)[0] if adapters else MODEL
            items.append(Item(len(items), t, "/v1/completions",
                              _completion(words.text(rng, p.prompt_len), p, model), model=model))
    return items


def sim_flags(p: WorkloadParams) -> list[str]:
    """Simulator flags a workload needs (LoRA adapters)."""
    if p.kind != "multi-lora":
        return []
    return ["--lora-modules", *[f"lora-{i}=/adapters/lora-{i}" for i in range(p.lora_adapters)]]


def lora_config(base_model: str = MODEL) -> str:
    """An EndpointPickerConfig for the multi-lora workload: the default scorers + LoRA affinity."""
    return f"""apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: lora-affinity-scorer
  parameters: {{baseModels: [{base_model}]}}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: lora-affinity-scorer, weight: 2}}
"""
