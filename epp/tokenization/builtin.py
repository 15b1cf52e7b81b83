"""The built-in tokenizer: deterministic, prefix-stable ids with no model files.

Token ids are what a KV cache hashes, so they decide prefix-cache hits and the block hashes
published in KV events. This tokenizer is deterministic across processes and machines
(xxhash, no PYTHONHASHSEED dependence) and prefix-stable (a shared text prefix gives a shared
id prefix), which is all prefix caching needs. The simulator (``epp sim``) uses it unless
given a Hugging Face tokenizer directory, and the picker's precise prefix scorer uses it only
for pools that declare they are simulated: a real engine needs its model's own tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson
import xxhash

BOS_ID = 1
_VOCAB = 32000
_FIRST_ID = 100  # ids below are "special" in the built-in vocabulary
_PIECE_RE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")
FILLER = (
    "The quick brown fox jumps over the lazy dog while simulated servers answer every request "
    "with plain words so that clients can count tokens and check routing without a real model "
    "running on a GPU in this test"
)
_CACHE_LIMIT = 200_000


def message_text(content: Any) -> str:
    """Text of an OpenAI message ``content``: a string or a list of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return str(content)


def render_simple_chat(messages: list[dict[str, Any]]) -> str:
    """A fixed chat layout used when no Jinja chat template is available."""
    out = []
    for m in messages:
        role = m.get("role", "user") if isinstance(m, dict) else "user"
        text = message_text(m.get("content")) if isinstance(m, dict) else str(m)
        out.append(f"<|{role}|>\n{text}\n")
    out.append("<|assistant|>\n")
    return "".join(out)


@dataclass(slots=True)
class BuiltinTokenizer:
    """Word/punctuation pieces hashed into a 32k vocabulary (cached per distinct piece).

    The per-instance cache keeps tokenization of repeated text (shared system prompts, the
    benchmark's prefixes) at a dict lookup per piece; it is bounded so a stream of unique
    text cannot grow it without limit.
    """

    _cache: dict[str, int] = field(default_factory=dict)

    def _ids(self, text: str) -> list[int]:
        cache = self._cache
        out = []
        for piece in _PIECE_RE.findall(text):
            tid = cache.get(piece)
            if tid is None:
                tid = _FIRST_ID + xxhash.xxh32_intdigest(piece.encode()) % (_VOCAB - _FIRST_ID)
                if len(cache) < _CACHE_LIMIT:
                    cache[piece] = tid
            out.append(tid)
        return out

    def encode_prompt(self, text: str) -> list[int]:
        ids = self._ids(text)
        ids.insert(0, BOS_ID)
        return ids

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode_prompt(render_simple_chat(messages))

    def output_tokens(self) -> tuple[list[int], list[bytes]]:
        pieces = _PIECE_RE.findall(" " + FILLER)
        return [self._ids(p)[0] for p in pieces], [orjson.dumps(p) for p in pieces]
