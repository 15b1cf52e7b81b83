"""The scheduling cycle (GIE §4.1): profile handler → per profile filters → scorers → picker.

This runs once per request on the event loop, so it is written for speed: no logging, no
per-plugin allocations beyond the score lists the interfaces require (the picker gets the
candidates and their totals as a view, not N objects), and the metrics children are bound
once at construction.

``inference_extension_plugin_duration_seconds`` is recorded on the same code path as every
other cycle, for one cycle in ``plugin_duration_sample`` (default 16): timing a plugin costs
two clock reads and a histogram observation (≈ 1 µs), which summed over every plugin of
every request would be a visible share of a decision, while a 1-in-16 sample gives the same
distribution at a sixteenth of the cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import add, mul
from time import perf_counter
from typing import TYPE_CHECKING, Any

from epp.framework.datalayer import Endpoint
from epp.framework.scheduling import (
    LLMRequest,
    ProfileHandler,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingError,
    SchedulingResult,
)
from epp.plugins.scheduling.scoring import ScoredEndpoints

if TYPE_CHECKING:
    from epp.metrics import EppMetrics

#: A profile handler that keeps asking for profiles is a bug; stop it instead of spinning.
MAX_PROFILE_ROUNDS = 16


class _Timers:
    """Pre-bound ``plugin_duration`` children of one profile, in run order."""

    __slots__ = ("filters", "picker", "scorers")

    def __init__(self, profile: SchedulerProfile, hist: Any) -> None:
        self.filters = [hist.labels("Filter", f.type_name, f.name) for f in profile.filters]
        self.scorers = [hist.labels("Scorer", ws.scorer.type_name, ws.scorer.name) for ws in profile.scorers]
        picker = profile.picker
        assert picker is not None
        self.picker = hist.labels("Picker", picker.type_name, picker.name)


class Scheduler:
    """Runs one scheduling cycle per request over the candidate endpoints.

    ``profiles`` are every configured profile by name; the handler chooses which run, in how
    many rounds, and which result is primary.
    """

    __slots__ = ("_cycles", "_e2e", "_handler", "_profiles", "_sample", "_timers", "profiles")

    def __init__(
        self,
        profile_handler: ProfileHandler,
        profiles: dict[str, SchedulerProfile],
        metrics: EppMetrics | None = None,
        *,
        plugin_duration_sample: int = 16,
    ) -> None:
        if not profiles:
            raise ValueError("a scheduler needs at least one profile")
        for name, prof in profiles.items():
            if prof.picker is None:
                raise ValueError(f"profile {name!r} has no picker")
        if plugin_duration_sample < 1:
            raise ValueError("plugin_duration_sample must be >= 1")
        self._handler = profile_handler
        self._profiles = profiles
        self.profiles: Mapping[str, SchedulerProfile] = profiles
        self._e2e = metrics.scheduler_e2e if metrics is not None else None
        self._timers: dict[str, _Timers] = (
            {name: _Timers(p, metrics.plugin_duration) for name, p in profiles.items()} if metrics is not None else {}
        )
        self._sample = plugin_duration_sample
        self._cycles = 0

    @property
    def profile_handler(self) -> ProfileHandler:
        return self._handler

    def schedule(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        """Choose target endpoints for ``request``; raises SchedulingError when none fits."""
        start = perf_counter()
        if not candidates:
            raise SchedulingError("no candidate endpoints")
        handler = self._handler
        profiles = self._profiles
        results: dict[str, ProfileRunResult | None] = {}
        timers = self._timers
        timed = bool(timers) and self._cycles % self._sample == 0
        self._cycles += 1
        for _ in range(MAX_PROFILE_ROUNDS):
            to_run = handler.pick_profiles(request, profiles, results)
            if not to_run:
                break
            for name, profile in to_run.items():
                results[name] = _run_profile(profile, request, candidates, timers.get(name) if timed else None)
        else:
            raise SchedulingError(
                f"profile handler {handler.name!r} did not finish within {MAX_PROFILE_ROUNDS} rounds"
            )
        result = handler.process_results(request, results)
        primary = result.profile_results.get(result.primary_profile_name)
        if primary is None or not primary.target_endpoints:
            raise SchedulingError(
                f"no endpoint fits the request (profile {result.primary_profile_name!r})"
            )
        if self._e2e is not None:
            self._e2e.observe(perf_counter() - start)
        return result


def _run_profile(
    profile: SchedulerProfile, request: LLMRequest, candidates: Sequence[Endpoint], timers: _Timers | None
) -> ProfileRunResult | None:
    """Filters, weighted scorers, picker; ``timers`` (a sampled cycle) records each plugin.

    The weighted sum is one list comprehension per scorer (no per-endpoint indexing), a
    scorer whose scores are all 0 adds nothing and is skipped, and scores are clamped only
    for scorers that do not declare themselves ``bounded`` (every built-in does: its scores
    are in [0, 1] and never NaN).
    """
    endpoints: Sequence[Endpoint] = candidates
    t = 0.0
    for i, flt in enumerate(profile.filters):
        if timers is not None:
            t = perf_counter()
        endpoints = flt.filter(request, endpoints)
        if timers is not None:
            timers.filters[i].observe(perf_counter() - t)
        if not endpoints:
            return None
    n = len(endpoints)
    totals: list[float] | None = None
    for i, ws in enumerate(profile.scorers):
        scorer = ws.scorer
        if timers is not None:
            t = perf_counter()
        scores = scorer.score(request, endpoints)
        if timers is not None:
            timers.scorers[i].observe(perf_counter() - t)
        if len(scores) != n:
            raise ValueError(f"scorer {scorer.name!r} returned {len(scores)} scores for {n} endpoints")
        if not getattr(scorer, "bounded", False):
            # Clamp to [0, 1]; NaN (a scorer bug) counts as 0 rather than poisoning sums.
            scores = [s if 0.0 <= s <= 1.0 else (1.0 if s > 1.0 else 0.0) for s in scores]
        # the weighted sum in C (map over operator functions), one pass per scorer
        weight = ws.weight
        if totals is None:
            totals = list(map(mul, scores, repeat(weight, n)))
        elif any(scores):
            totals = list(map(add, totals, map(mul, scores, repeat(weight, n))))
    if totals is None:
        totals = [0.0] * n
    scored = ScoredEndpoints(endpoints, totals)
    picker = profile.picker
    assert picker is not None  # checked in Scheduler.__init__
    if timers is not None:
        t = perf_counter()
    res = picker.pick(request, scored)
    if timers is not None:
        timers.picker.observe(perf_counter() - t)
    if not res.target_endpoints:
        return None
    if not res.scored:
        res.scored = scored
    return res
