"""Model-name restore and usage parsing on responses (JSON and SSE)."""

from __future__ import annotations

import orjson

from epp.framework.requestcontrol import ResponseInfo
from epp.requestcontrol.response import BodyRewriter


def _sse(*events: object) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def test_json_response_model_restored_and_usage_read() -> None:
    info = ResponseInfo()
    rw = BodyRewriter(info, target_model="llama-lora-v2", incoming_model="llama")
    doc = {"id": "x", "model": "llama-lora-v2", "choices": [],
           "usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 8}}}
    raw = orjson.dumps(doc)
    rw.json_chunk(raw[:20])
    rw.json_chunk(raw[20:])
    out = orjson.loads(rw.json_finish())
    assert out["model"] == "llama"
    assert (info.prompt_tokens, info.completion_tokens, info.cached_tokens) == (10, 5, 8)
    assert rw.size == len(raw)


def test_sse_model_restored_even_when_split_across_chunks() -> None:
    info = ResponseInfo()
    rw = BodyRewriter(info, target_model="target-m", incoming_model="client-m")
    stream = _sse(
        {"model": "target-m", "choices": [{"delta": {"content": "hi"}}]},
        {"model": "target-m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
    )
    out = b""
    for i in range(0, len(stream), 7):  # cut everywhere, including inside the model name
        chunk = stream[i : i + 7]
        out += rw.sse_chunk(chunk, end_of_stream=i + 7 >= len(stream))
    assert b"target-m" not in out
    assert out.count(b'"model":"client-m"') == 2
    assert out.endswith(b"data: [DONE]\n\n")
    assert (info.prompt_tokens, info.completion_tokens) == (3, 1)


def test_no_rewrite_passes_bytes_through_unchanged() -> None:
    rw = BodyRewriter(ResponseInfo(), target_model="m", incoming_model="m")
    chunk = b'data: {"model":"m"}\n\n'
    assert rw.sse_chunk(chunk, False) == chunk


def test_model_with_space_after_colon_is_restored() -> None:
    rw = BodyRewriter(ResponseInfo(), target_model="t", incoming_model="c")
    rw.json_chunk(b'{"model": "t", "x": 1}')
    assert rw.json_finish() == b'{"model": "c", "x": 1}'
