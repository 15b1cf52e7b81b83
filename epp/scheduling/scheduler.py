"""The scheduling cycle (GIE §4.1): profile handler → per profile filters → scorers → picker.

This runs once per request on the event loop, so it is written for speed: no logging, no
per-plugin allocations beyond the score lists the interfaces require, and the metrics
children are bound once at construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from time import perf_counter
from typing import TYPE_CHECKING

from epp.framework.datalayer import Endpoint
from epp.framework.scheduling import (
    LLMRequest,
    ProfileHandler,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingError,
    SchedulingResult,
    ScoredEndpoint,
)

if TYPE_CHECKING:
    from epp.metrics import EppMetrics

#: A profile handler that keeps asking for profiles is a bug; stop it instead of spinning.
MAX_PROFILE_ROUNDS = 16


class Scheduler:
    """Runs one scheduling cycle per request over the candidate endpoints.

    ``profiles`` are every configured profile by name; the handler chooses which run, in how
    many rounds, and which result is primary. ``plugin_durations`` additionally records
    ``inference_extension_plugin_duration_seconds`` per filter/scorer/picker; it costs a
    couple of microseconds per plugin, so it is off unless asked for.
    """

    __slots__ = ("_e2e", "_handler", "_plugin_hist", "_profiles", "profiles")

    def __init__(
        self,
        profile_handler: ProfileHandler,
        profiles: dict[str, SchedulerProfile],
        metrics: EppMetrics | None = None,
        *,
        plugin_durations: bool = False,
    ) -> None:
        if not profiles:
            raise ValueError("a scheduler needs at least one profile")
        for name, prof in profiles.items():
            if prof.picker is None:
                raise ValueError(f"profile {name!r} has no picker")
        self._handler = profile_handler
        self._profiles = profiles
        self.profiles: Mapping[str, SchedulerProfile] = profiles
        self._e2e = metrics.scheduler_e2e if metrics is not None else None
        self._plugin_hist = metrics.plugin_duration if (metrics and plugin_durations) else None

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
        run = self._run_profile if self._plugin_hist is None else self._run_profile_timed
        for _ in range(MAX_PROFILE_ROUNDS):
            to_run = handler.pick_profiles(request, profiles, results)
            if not to_run:
                break
            for name, profile in to_run.items():
                results[name] = run(profile, request, candidates)
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

    @staticmethod
    def _run_profile(
        profile: SchedulerProfile, request: LLMRequest, candidates: Sequence[Endpoint]
    ) -> ProfileRunResult | None:
        endpoints: Sequence[Endpoint] = candidates
        for flt in profile.filters:
            endpoints = flt.filter(request, endpoints)
            if not endpoints:
                return None
        n = len(endpoints)
        totals = [0.0] * n
        for ws in profile.scorers:
            scores = ws.scorer.score(request, endpoints)
            weight = ws.weight
            for i in range(n):
                s = scores[i]
                # Clamp to [0, 1]; NaN (a scorer bug) counts as 0 rather than poisoning sums.
                if not 0.0 <= s <= 1.0:
                    s = 1.0 if s > 1.0 else 0.0
                totals[i] += s * weight
        scored = [ScoredEndpoint(endpoints[i], totals[i]) for i in range(n)]
        picker = profile.picker
        assert picker is not None  # checked in __init__
        res = picker.pick(request, scored)
        if not res.target_endpoints:
            return None
        if not res.scores:
            res.scores = {endpoints[i].key: totals[i] for i in range(n)}
        return res

    def _run_profile_timed(
        self, profile: SchedulerProfile, request: LLMRequest, candidates: Sequence[Endpoint]
    ) -> ProfileRunResult | None:
        """Same as ``_run_profile`` but records each plugin's duration."""
        hist = self._plugin_hist
        assert hist is not None
        endpoints: Sequence[Endpoint] = candidates
        for flt in profile.filters:
            t = perf_counter()
            endpoints = flt.filter(request, endpoints)
            hist.labels("Filter", flt.type_name, flt.name).observe(perf_counter() - t)
            if not endpoints:
                return None
        n = len(endpoints)
        totals = [0.0] * n
        for ws in profile.scorers:
            t = perf_counter()
            scores = ws.scorer.score(request, endpoints)
            hist.labels("Scorer", ws.scorer.type_name, ws.scorer.name).observe(perf_counter() - t)
            for i in range(n):
                s = scores[i]
                if math.isnan(s) or s < 0.0:
                    s = 0.0
                elif s > 1.0:
                    s = 1.0
                totals[i] += s * ws.weight
        scored = [ScoredEndpoint(endpoints[i], totals[i]) for i in range(n)]
        picker = profile.picker
        assert picker is not None
        t = perf_counter()
        res = picker.pick(request, scored)
        hist.labels("Picker", picker.type_name, picker.name).observe(perf_counter() - t)
        if not res.target_endpoints:
            return None
        if not res.scores:
            res.scores = {endpoints[i].key: totals[i] for i in range(n)}
        return res
