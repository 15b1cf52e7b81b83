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
class EncodePlan:
    """The pieces of one encoding: ``parts`` are cached ids, or an index into ``missing``."""

    parts: list[list[int] | int] = field(default_factory=list)
    #: (text, add_special_tokens) still to encode
    missing: list[tuple[str, bool]] = field(default_factory=list)
    #: cache key per missing piece (None: not cached, e.g. a text's unanchored tail)
    store: list[int | None] = field(default_factory=list)

    def add_missing(self, text: str, special: bool, key: int | None) -> None:
        self.parts.append(len(self.missing))
        self.missing.append((text, special))
        self.store.append(key)

    @property
    def chars(self) -> int:
        return sum(len(t) for t, _ in self.missing)


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
        plan = self.plan(text, add_special_tokens)
        if not plan.missing:
            return self.finish(plan, [])
        encode = self.backend.encode
        return self.finish(plan, [encode(t, special) for t, special in plan.missing])

    def plan(self, text: str, add_special_tokens: bool) -> EncodePlan:
        """What ``encode`` needs: cached ids, and the pieces still to encode. Splitting the
        two lets the caller run the encoding elsewhere (a worker thread) and ``finish`` on the
        event loop, which owns the cache."""
        plan = EncodePlan()
        if add_special_tokens:
            prefix = self.backend.special_prefix()
            if prefix is None or not self.segmenting:
                self._whole(plan, text, True)
                return plan
            plan.parts.append(prefix)
            self._plain(plan, text)
            return plan
        if not self.segmenting:
            self._whole(plan, text, False)
        else:
            self._plain(plan, text)
        return plan

    def finish(self, plan: EncodePlan, encoded: list[list[int]]) -> list[int]:
        """The ids, given the encodings of ``plan.missing`` (in order); caches them."""
        for key, ids in zip(plan.store, encoded, strict=True):
            if key is not None:
                self._store(key, ids)
        out: list[int] = []
        for part in plan.parts:
            out.extend(encoded[part] if isinstance(part, int) else part)
        return out

    def _whole(self, plan: EncodePlan, text: str, special: bool) -> None:
        key = xxh64_intdigest(text.encode("utf-8", "surrogatepass"), seed=1 if special else 2)
        cached = self._segments.get(key)
        if cached is not None:
            self._segments.move_to_end(key)
            self.stats.hits += 1
            plan.parts.append(cached)
            return
        self.stats.misses += 1
        plan.add_missing(text, special, key)

    def _store(self, key: int, ids: list[int]) -> None:
        segs = self._segments
        segs[key] = ids
        if len(segs) > self.max_segments:
            segs.popitem(last=False)

    def _plain(self, plan: EncodePlan, text: str) -> None:
        segs = self._segments
        start = 0
        h = 0
        for end in self.anchors(text):
            piece = text[start:end]
            h = xxh64_intdigest(piece.encode("utf-8", "surrogatepass"), seed=h)
            ids = segs.get(h)
            if ids is None:
                self.stats.misses += 1
                plan.add_missing(piece, False, h)
            else:
                segs.move_to_end(h)
                self.stats.hits += 1
                plan.parts.append(ids)
            start = end
        if start < len(text):
            plan.add_missing(text[start:], False, None)

    def _encode_plain(self, text: str, store: bool = True) -> list[int]:
        plan = EncodePlan()
        self._plain(plan, text)
        if not store:
            plan.store = [None] * len(plan.store)
        encode = self.backend.encode
        return self.finish(plan, [encode(t, special) for t, special in plan.missing])
