"""A tokenization cache keyed by text prefix.

Requests that share a prefix (a system prompt, earlier chat turns, a document) should not pay
for tokenizing it again. Text is cut at *anchors* — a letter or digit followed by a space and a
letter, the first such place at or after every ``segment_chars`` characters — and each segment
is tokenized on its own. Cutting there does not change the result for the tokenizers we use
(the built-in one and BPE tokenizers with GPT-2 / Llama-3 style pre-tokenizers never merge
across that boundary), and the backend is probed at construction: if piecewise tokenization
differs on a probe text, segmenting is turned off and only whole texts are cached.

Segment ids are stored under a chained hash of the text up to the segment's end, so a lookup
walks the request's segments and tokenizes only from the first one not cached. Bounded LRU.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

from xxhash import xxh64_intdigest

from epp.tokenization.backends import TokenizerBackend

_ANCHOR = re.compile(r"(?<=[^\W_])(?= [^\W\d_])")
_PROBE = (
    "The quick brown fox, jumping over 12345 lazy dogs!\n\nIt said: \"hello   world\" and then "
    "ran away; nobody knew why.\tTabs, numbers 3.14159 and UPPER case words follow here. " * 4
)


@dataclass(slots=True)
class CacheStats:
    hits: int = 0  # segments served from the cache
    misses: int = 0  # segments tokenized


@dataclass(slots=True)
class PrefixTokenCache:
    backend: TokenizerBackend
    max_segments: int = 8192
    segment_chars: int = 512
    _segments: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)
    segmenting: bool = True
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        if self.segmenting:
            saved, self.segment_chars = self.segment_chars, 40
            try:
                self.segmenting = self._encode_plain(_PROBE, store=False) == self.backend.encode(_PROBE, False)
            finally:
                self.segment_chars = saved
            self._segments.clear()

    def anchors(self, text: str) -> list[int]:
        out: list[int] = []
        step = self.segment_chars
        pos = step
        n = len(text)
        search = _ANCHOR.search
        while pos < n:
            m = search(text, pos)
            if m is None:
                break
            p = m.start()
            out.append(p)
            pos = max(p + 1, p + step)
        return out

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Same ids as ``backend.encode(text, add_special_tokens)``, reusing cached prefixes."""
        if add_special_tokens:
            prefix = self.backend.special_prefix()
            if prefix is None or not self.segmenting:
                return self._whole(text, True)
            return prefix + self._encode_plain(text)
        if not self.segmenting:
            return self._whole(text, False)
        return self._encode_plain(text)

    def _whole(self, text: str, special: bool) -> list[int]:
        key = xxh64_intdigest(text.encode("utf-8", "surrogatepass"), seed=1 if special else 2)
        cached = self._segments.get(key)
        if cached is not None:
            self._segments.move_to_end(key)
            self.stats.hits += 1
            return list(cached)
        ids = self.backend.encode(text, special)
        self.stats.misses += 1
        self._store(key, ids)
        return list(ids)

    def _store(self, key: int, ids: list[int]) -> None:
        segs = self._segments
        segs[key] = ids
        if len(segs) > self.max_segments:
            segs.popitem(last=False)

    def _encode_plain(self, text: str, store: bool = True) -> list[int]:
        segs = self._segments
        out: list[int] = []
        start = 0
        h = 0
        encode = self.backend.encode
        for end in self.anchors(text):
            piece = text[start:end]
            h = xxh64_intdigest(piece.encode("utf-8", "surrogatepass"), seed=h)
            ids = segs.get(h)
            if ids is None:
                ids = encode(piece, False)
                self.stats.misses += 1
                if store:
                    self._store(h, ids)
            else:
                segs.move_to_end(h)
                self.stats.hits += 1
            out.extend(ids)
            start = end
        if start < len(text):
            out.extend(encode(text[start:], False))
        return out
