"""Response-side body work: restore the client's model name and read ``usage``.

Both must be cheap because SSE responses pass through chunk by chunk. The model name is a
bytes replace of ``"model":"<target>"`` (with or without a space after the colon); usage is
parsed only from SSE events that contain ``"usage"`` with an object value, and from a JSON
body once, at its end.

SSE events can be split across body chunks. ``SseRewriter`` only rewrites complete lines and
carries a trailing partial line into the next chunk, so a model name cut in two is never
missed; a partial line is not useful to the client anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from epp.framework.requestcontrol import ResponseInfo


def _model_patterns(target: str, incoming: str) -> list[tuple[bytes, bytes]]:
    t = orjson.dumps(target)
    i = orjson.dumps(incoming)
    return [(b'"model":' + t, b'"model":' + i), (b'"model": ' + t, b'"model": ' + i)]


def apply_usage(info: ResponseInfo, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(pt, int):
        info.prompt_tokens = pt
    if isinstance(ct, int):
        info.completion_tokens = ct
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        info.cached_tokens = details["cached_tokens"]


@dataclass(slots=True)
class BodyRewriter:
    """Per-response state for the body passing through the picker."""

    info: ResponseInfo
    target_model: str = ""
    incoming_model: str = ""
    _patterns: list[tuple[bytes, bytes]] = field(default_factory=list)
    _carry: bytes = b""
    _buffer: bytearray = field(default_factory=bytearray)
    size: int = 0

    def __post_init__(self) -> None:
        if self.target_model and self.target_model != self.incoming_model:
            self._patterns = _model_patterns(self.target_model, self.incoming_model)

    @property
    def restores(self) -> bool:
        """True when the response carries a model name to put back (the model was rewritten)."""
        return bool(self._patterns)

    def _restore(self, data: bytes) -> bytes:
        for old, new in self._patterns:
            if old in data:
                data = data.replace(old, new)
        return data

    # ---- SSE: streamed through, line-complete ----
    def sse_chunk(self, chunk: bytes, end_of_stream: bool) -> bytes:
        """Bytes to pass on now for this SSE chunk."""
        self.size += len(chunk)
        if self._carry:
            chunk = self._carry + chunk
            self._carry = b""
        if not end_of_stream:
            cut = chunk.rfind(b"\n") + 1
            if cut < len(chunk):
                chunk, self._carry = chunk[:cut], chunk[cut:]
        if b'"usage"' in chunk:
            self._scan_usage(chunk)
        return self._restore(chunk) if self._patterns else chunk

    def sse_flush(self) -> bytes:
        """The carried partial last line, when the body ended without a final newline and
        trailers closed the stream: pass it on (restored, usage read) rather than drop it."""
        data, self._carry = self._carry, b""
        if not data:
            return b""
        if b'"usage"' in data:
            self._scan_usage(data)
        return self._restore(data) if self._patterns else data

    def _scan_usage(self, data: bytes) -> None:
        for line in data.split(b"\n"):
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    event = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    continue
                if isinstance(event, dict):
                    apply_usage(self.info, event.get("usage"))

    # ---- JSON: buffered to the end ----
    def json_chunk(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._buffer += chunk

    def json_finish(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer = bytearray()
        if b'"usage"' in data:
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                doc = None
            if isinstance(doc, dict):
                apply_usage(self.info, doc.get("usage"))
        return self._restore(data) if self._patterns else data
