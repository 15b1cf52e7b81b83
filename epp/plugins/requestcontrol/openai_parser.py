"""``openai-parser`` (GIE's default parser): an OpenAI-style request body, parsed once.

The API kind comes from the suffix of ``:path`` (GIE's rule). The text the approximate prefix
index hashes is the prompt for completions and the JSON of ``messages`` for chat (so the
system prompt, which comes first, is the shared prefix), as GIE does.
"""

from __future__ import annotations

from typing import Any

import orjson

from epp.framework.errors import bad_request
from epp.framework.requestcontrol import ParsedBody, Parser

_API_SUFFIXES = (
    ("/chat/completions", "chat/completions"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/conversations", "conversations"),
    ("/embeddings", "embeddings"),
)


def api_kind(path: str) -> str:
    """The OpenAI API a path addresses ("other" when none we know)."""
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, kind in _API_SUFFIXES:
        if path.endswith(suffix):
            return kind
    return "other"


def _prefix_text(api: str, body: dict[str, Any], raw: bytes | bytearray | memoryview) -> bytes:
    if api == "chat/completions":
        messages = body.get("messages")
        return orjson.dumps(messages) if messages is not None else b""
    if api == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt.encode()
        return orjson.dumps(prompt) if prompt is not None else b""
    if api == "responses":
        return orjson.dumps([body.get("instructions"), body.get("tools"), body.get("input")])
    if api == "conversations":
        return orjson.dumps(body.get("items"))
    if api == "embeddings":
        return orjson.dumps(body.get("input"))
    return bytes(raw)


def _safe_prefix_text(api: str, body: dict[str, Any], raw: bytes | bytearray | memoryview) -> bytes:
    """orjson encodes 254 levels but parses 1024: a deeper prompt hashes its raw bytes."""
    try:
        return _prefix_text(api, body, raw)
    except orjson.JSONEncodeError:
        return bytes(raw)


def parse_body(raw: bytes | bytearray | memoryview, path: str) -> ParsedBody:
    """Decode the JSON body; 400 when it is not a JSON object with a string ``model``."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model not found in request body")
    api = api_kind(path)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens", body.get("max_output_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
        raise bad_request("max_tokens must be an integer")
    salt = body.get("cache_salt")
    return ParsedBody(
        body=body,
        model=model,
        api=api,
        stream=body.get("stream") is True,
        max_tokens=max_tokens,
        prefix_text=_safe_prefix_text(api, body, raw),
        cache_salt=salt if isinstance(salt, str) else None,
    )


class OpenAIParser(Parser):
    type_name = "openai-parser"

    def parse(self, raw: bytes | bytearray, path: str) -> ParsedBody:
        return parse_body(raw, path)
