"""Targeted Prometheus-text parser: a model server's ``/metrics`` page → ``EndpointMetrics``.

Why not ``prometheus_client.parser``: it builds every family and sample of the page (a vLLM
page is ~600 lines / 57 KB, mostly histograms we never read), which costs ~7 ms per scrape.
At the default 50 ms refresh per pod that is a large share of a core. We want five gauges, so
we scan lines with ``str.startswith(<tuple of wanted names>)`` (a C loop), cut the name at
``{``/space, and parse labels only for families that need them (selectors, LoRA info, cache
config). On the real 57 KB vLLM 0.32 page: ~0.12 ms vs ~7.4 ms for prometheus_client
(~60x; ``python -m benchmarks.parser_speed``).

Which series feed which field, per engine type, is configured in
:mod:`epp.datalayer.metric_mapping`; a ``MetricsParser`` is one mapping compiled for the scan.

Aggregation when one family has several series matching the selector (e.g. a data-parallel
vLLM exposing ``engine="0"`` and ``engine="1"`` behind one port, or several ``model_name``s):

* queue and running sizes are **summed** (the endpoint serves all of them);
* KV-cache usage is **averaged** (each engine has its own equally sized cache, so the mean is
  the endpoint's overall fraction);
* LoRA info takes the series with the **largest value** (its value is a last-update timestamp;
  every label combination is a new series and old ones linger);
* cache config (info gauges) takes the **first** series (engines share one cache config);
  block-size / block-count gauges take the first series too.

A family that is absent leaves its field at the ``EndpointMetrics`` default and its selector
is returned in the ``missing`` set, so the caller can log it once (not every 50 ms).
Garbage never raises: unparsable lines are skipped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from epp.datalayer.metric_mapping import (
    BUILTIN_MAPPINGS,
    DEFAULT_ENGINE_TYPE,
    ENGINE_TYPE_LABEL,
    EngineConfigs,
    MetricMapping,
    MetricSpec,
    build_mappings,
)
from epp.framework.datalayer import EndpointMetrics

# ---- the scan ----

# field ids (small ints: cheaper than strings in the inner loop)
_QUEUED, _RUNNING, _KV, _LORA, _CACHE_INFO, _BLOCK_SIZE, _NUM_BLOCKS = range(7)
_REQUIRED_FIELDS = frozenset((_QUEUED, _RUNNING, _KV))
_FIELD_SPECS = ("queued", "running", "kv_usage", "lora", "cache_info", "block_size", "num_blocks")


def parse_labels(line: str, start: int) -> tuple[dict[str, str], int]:
    """Parse ``{k="v",...}`` starting at ``line[start] == "{"``.

    Returns (labels, index just past ``}``). Raises ValueError on malformed input.
    """
    labels: dict[str, str] = {}
    n = len(line)
    i = start + 1
    while i < n:
        c = line[i]
        if c == "}":
            return labels, i + 1
        if c == "," or c == " ":
            i += 1
            continue
        eq = line.find("=", i)
        if eq < 0:
            raise ValueError("label without '='")
        key = line[i:eq].strip()
        q = eq + 1
        while q < n and line[q] == " ":
            q += 1
        if q >= n or line[q] != '"':
            raise ValueError("label value not quoted")
        j = q + 1
        end = line.find('"', j)
        if end < 0:
            raise ValueError("unterminated label value")
        bs = line.find("\\", j, end)
        if bs < 0:  # fast path: no escapes
            labels[key] = line[j:end]
            i = end + 1
            continue
        parts: list[str] = []
        while True:
            end = line.find('"', j)
            if end < 0:
                raise ValueError("unterminated label value")
            bs = line.find("\\", j, end)
            if bs < 0:
                parts.append(line[j:end])
                i = end + 1
                break
            parts.append(line[j:bs])
            esc = line[bs + 1: bs + 2]
            parts.append("\n" if esc == "n" else esc)
            j = bs + 2
        labels[key] = "".join(parts)
    raise ValueError("unterminated label set")


def _csv_set(value: str) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(s for s in (p.strip() for p in value.split(",")) if s)


def _sum_count(series: list[tuple[float, dict[str, str] | None]]) -> int:
    """Sum of a count gauge's series; NaN/Inf series (a broken exporter) are ignored."""
    total = 0.0
    for v, _ in series:
        if math.isfinite(v):
            total += v
    return int(total) if math.isfinite(total) else 0


def _float_to_int(value: float) -> int | None:
    try:
        return int(value)
    except (ValueError, OverflowError):  # NaN / Inf
        return None


def _to_int(value: str | None) -> int | None:
    """A label value like "48" → 48; "None", "" or garbage → None."""
    if value is None:
        return None
    try:
        return _float_to_int(float(value))
    except ValueError:
        return None


@dataclass(slots=True)
class _Consumer:
    field_id: int
    alt: int  # index among the field's alternatives (0 = preferred)
    spec: MetricSpec


@dataclass(slots=True)
class _Family:
    name: str
    consumers: list[_Consumer] = field(default_factory=list)
    needs_labels: bool = False


class MetricsParser:
    """A compiled mapping: ``parse(text)`` → (``EndpointMetrics``, missing selectors).

    Build one per engine type and reuse it; ``parse`` is pure and never raises.
    """

    __slots__ = ("_families", "_field_alts", "_label_cache", "_prefixes", "mapping")

    #: distinct label sets remembered by ``_label_cache`` before it starts over
    LABEL_CACHE_SIZE = 1024

    def __init__(self, mapping: MetricMapping) -> None:
        self.mapping = mapping
        self._families: dict[str, _Family] = {}
        self._field_alts: list[tuple[MetricSpec, ...]] = []
        for fid, attr in enumerate(_FIELD_SPECS):
            value = getattr(mapping, attr)
            alts: tuple[MetricSpec, ...]
            if value is None:
                alts = ()
            elif isinstance(value, MetricSpec):
                alts = (value,)
            else:
                alts = value
            self._field_alts.append(alts)
            for alt, spec in enumerate(alts):
                fam = self._families.setdefault(spec.name, _Family(spec.name))
                fam.consumers.append(_Consumer(fid, alt, spec))
                if spec.labels or fid in (_LORA, _CACHE_INFO):
                    fam.needs_labels = True
        # longest first is not needed: we compare the sliced name exactly afterwards
        self._prefixes = tuple(self._families)
        # label text -> parsed labels: info gauges (cache config: ~40 labels) repeat the same
        # label set at every scrape, and parsing it was most of a scrape's parse time
        self._label_cache: dict[str, dict[str, str]] = {}

    def family_names(self) -> tuple[str, ...]:
        """The metric families this parser reads: a caller may hand ``parse`` only their lines."""
        return self._prefixes

    def parse(self, text: str) -> tuple[EndpointMetrics, frozenset[str]]:
        """Parse a page. ``updated_at`` is left at 0 (the scraper stamps it)."""
        prefixes = self._prefixes
        families = self._families
        # per field: per alternative: list of (value, labels or None)
        found: list[dict[int, list[tuple[float, dict[str, str] | None]]]] = [
            {} for _ in _FIELD_SPECS
        ]
        if prefixes:
            for line in text.split("\n"):
                if not line.startswith(prefixes):
                    continue
                try:
                    self._scan_line(line, families, found)
                except (ValueError, IndexError, OverflowError):
                    continue  # a garbled line: skip it, keep the rest of the page
        return self._assemble(found)

    def _labels(self, line: str, start: int) -> tuple[dict[str, str], int]:
        """``parse_labels`` remembered by label text (the returned dict is shared: read-only)."""
        close = line.rfind("}")
        if close < start:
            raise ValueError("unterminated label set")
        text = line[start: close + 1]
        cache = self._label_cache
        labels = cache.get(text)
        if labels is None:
            labels, end = parse_labels(text, 0)
            if end != len(text):  # a '}' inside a quoted value: parse the line itself
                return parse_labels(line, start)
            if len(cache) >= self.LABEL_CACHE_SIZE:
                cache.clear()
            cache[text] = labels
        return labels, close + 1

    def _scan_line(self, line: str, families: dict[str, _Family],
                   found: list[dict[int, list[tuple[float, dict[str, str] | None]]]]) -> None:
        brace = line.find("{")
        space = line.find(" ")
        if brace < 0 or (0 <= space < brace):
            end = space if space >= 0 else len(line)
        else:
            end = brace
        fam = families.get(line[:end])
        if fam is None:  # a longer name sharing the prefix (e.g. ..._waiting_by_reason)
            return
        labels: dict[str, str] | None = None
        rest_at = end
        # skip spaces between name and '{'
        while rest_at < len(line) and line[rest_at] == " ":
            rest_at += 1
        if rest_at < len(line) and line[rest_at] == "{":
            if fam.needs_labels:
                labels, rest_at = self._labels(line, rest_at)
            else:
                close = line.rfind("}")
                if close < rest_at:
                    raise ValueError("unterminated label set")
                rest_at = close + 1
        elif fam.needs_labels:
            labels = {}
        value = float(line[rest_at:].split(None, 1)[0])
        for c in fam.consumers:
            if c.spec.labels and (labels is None or not c.spec.matches(labels)):
                continue
            found[c.field_id].setdefault(c.alt, []).append((value, labels))

    # Only the three gauges of the model-server protocol are required; LoRA info exists only
    # when LoRA is enabled and cache config is optional, so their absence is not reported.
    def _assemble(self, found: list[dict[int, list[tuple[float, dict[str, str] | None]]]],
                  ) -> tuple[EndpointMetrics, frozenset[str]]:
        m = EndpointMetrics()
        missing: set[str] = set()
        series: list[list[tuple[float, dict[str, str] | None]] | None] = []
        for fid, alts in enumerate(self._field_alts):
            got = found[fid]
            chosen = None
            for alt in range(len(alts)):
                if alt in got:
                    chosen = got[alt]
                    break
            if chosen is None and alts and fid in _REQUIRED_FIELDS:
                missing.add(str(alts[0]))
            series.append(chosen)

        q = series[_QUEUED]
        if q is not None:
            m.waiting_queue_size = _sum_count(q)
        r = series[_RUNNING]
        if r is not None:
            m.running_requests_size = _sum_count(r)
        kv = series[_KV]
        if kv is not None:
            vals = [v for v, _ in kv if math.isfinite(v)]
            if vals:
                m.kv_cache_usage = sum(vals) / len(vals)
        lora = series[_LORA]
        if lora is not None:
            best_value, best_labels = lora[0]
            for v, lbl in lora[1:]:
                if v > best_value:
                    best_value, best_labels = v, lbl
            if best_labels is not None:
                m.max_adapters = _to_int(best_labels.get("max_lora")) or 0
                m.adapters_at = best_value if math.isfinite(best_value) else 0.0
                m.active_adapters = _csv_set(best_labels.get("running_lora_adapters", ""))
                m.waiting_adapters = _csv_set(best_labels.get("waiting_lora_adapters", ""))
        info = series[_CACHE_INFO]
        if info is not None and info[0][1] is not None:
            lbl = info[0][1]
            m.cache_block_size = _to_int(lbl.get(self.mapping.cache_info_block_size_label))
            m.cache_num_blocks = _to_int(lbl.get(self.mapping.cache_info_num_blocks_label))
        bsz = series[_BLOCK_SIZE]
        if bsz is not None:
            m.cache_block_size = _float_to_int(bsz[0][0])
        nbl = series[_NUM_BLOCKS]
        if nbl is not None:
            m.cache_num_blocks = _float_to_int(nbl[0][0])
        return m, frozenset(missing)


class ParserSet:
    """One compiled parser per engine type, chosen by the endpoint's engine-type label."""

    __slots__ = ("_default", "_parsers", "engine_label_key")

    def __init__(self, engine_configs: EngineConfigs | None = None, *,
                 default_engine: str = DEFAULT_ENGINE_TYPE,
                 engine_label_key: str = ENGINE_TYPE_LABEL) -> None:
        self.engine_label_key = engine_label_key
        self._parsers = {name: MetricsParser(m) for name, m in build_mappings(engine_configs).items()}
        if default_engine not in self._parsers:
            raise ValueError(f"default engine type {default_engine!r} has no metrics mapping")
        self._default = self._parsers[default_engine]

    def engine_types(self) -> tuple[str, ...]:
        return tuple(self._parsers)

    def for_labels(self, labels: Mapping[str, str]) -> tuple[MetricsParser, bool]:
        """(parser, known): an unknown engine type falls back to the default mapping."""
        engine = labels.get(self.engine_label_key)
        if not engine:
            return self._default, True
        parser = self._parsers.get(engine)
        if parser is None:
            return self._default, False
        return parser, True


@functools.cache
def _builtin_parser(engine_type: str) -> MetricsParser:
    return MetricsParser(BUILTIN_MAPPINGS[engine_type])


def parse_metrics(text: str, engine_type: str = DEFAULT_ENGINE_TYPE,
                  ) -> tuple[EndpointMetrics, frozenset[str]]:
    """Convenience for one-off use (tests, tools): parse with a built-in mapping."""
    return _builtin_parser(engine_type).parse(text)
