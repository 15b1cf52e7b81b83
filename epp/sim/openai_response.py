"""vLLM's OpenAI response bytes for a finished or streaming ``Sequence``.

Non-streaming bodies carry every field vLLM 0.32 sends (clients and routers parse them, P/D
proxies read ``kv_transfer_params``). Streaming chunks are pre-built byte templates (JSON
prefix + pre-encoded token text + suffix) so a token costs a join and one write per engine
step, not a JSON encode: the simulator runs many pods in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from epp.sim.sequence import Sequence

DONE = b"data: [DONE]\n\n"


def usage(seq: Sequence) -> dict[str, Any]:
    """The ``usage`` object, with ``prompt_tokens_details.cached_tokens`` (local hits plus
    transferred KV), which is what cache-aware benchmarks read."""
    return {
        "prompt_tokens": seq.prompt_len,
        "total_tokens": seq.prompt_len + seq.generated,
        "completion_tokens": seq.generated,
        "prompt_tokens_details": {"cached_tokens": max(seq.cached_tokens, 0)},
    }


def completion_body(seq: Sequence, model: str, chat: bool, text: str) -> bytes:
    """A finished request's ``chat.completion`` / ``text_completion`` JSON."""
    out: dict[str, Any]
    if chat:
        out = {
            "id": seq.request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                                 "annotations": None, "audio": None, "function_call": None,
                                                 "tool_calls": [], "reasoning_content": None},
                         "logprobs": None, "finish_reason": seq.finish_reason, "stop_reason": None}],
            "service_tier": None, "system_fingerprint": None, "usage": usage(seq),
            "prompt_logprobs": None, "kv_transfer_params": seq.kv_transfer_params,
        }
    else:
        out = {
            "id": seq.request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": seq.finish_reason,
                         "stop_reason": None, "prompt_logprobs": None}],
            "usage": usage(seq), "kv_transfer_params": seq.kv_transfer_params,
        }
    return orjson.dumps(out)


@dataclass(slots=True, frozen=True)
class StreamFrames:
    """The SSE byte templates of one streaming response.

    A token's frame is ``head + <pre-encoded JSON string> + (last if final else mid)``; chat
    streams open with a ``role`` frame; ``usage_frame`` is the optional final usage chunk.
    """

    common: bytes
    head: bytes
    mid: bytes
    last: bytes
    role: bytes

    @classmethod
    def build(cls, seq: Sequence, model: str, chat: bool) -> StreamFrames:
        common = (b'data: {"id":"' + seq.request_id.encode() + b'","object":'
                  + (b'"chat.completion.chunk"' if chat else b'"text_completion"')
                  + b',"created":' + str(int(time.time())).encode() + b',"model":' + orjson.dumps(model))
        if chat:
            return cls(
                common=common,
                head=common + b',"choices":[{"index":0,"delta":{"content":',
                mid=b'},"logprobs":null,"finish_reason":null}]}\n\n',
                last=b'},"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n',
                role=common + (b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                               b'"logprobs":null,"finish_reason":null}]}\n\n'),
            )
        return cls(
            common=common,
            head=common + b',"choices":[{"index":0,"text":',
            mid=b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n',
            last=b',"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n',
            role=b"",
        )

    def usage_frame(self, seq: Sequence) -> bytes:
        return self.common + b',"choices":[],"usage":' + orjson.dumps(usage(seq)) + b"}\n\n"
