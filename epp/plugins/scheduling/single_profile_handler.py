"""``single-profile-handler``: run the one configured profile; its result is primary (GIE)."""

from __future__ import annotations

from collections.abc import Mapping

from epp.framework.scheduling import LLMRequest, ProfileHandler, ProfileRunResult, SchedulerProfile, SchedulingResult


class SingleProfileHandler(ProfileHandler):
    """One round, every configured profile (the loader allows exactly one), first is primary."""

    type_name = "single-profile-handler"

    def pick_profiles(
        self,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileRunResult | None],
    ) -> dict[str, SchedulerProfile]:
        if results:
            return {}
        return profiles if isinstance(profiles, dict) else dict(profiles)

    def process_results(
        self, request: LLMRequest, results: Mapping[str, ProfileRunResult | None]
    ) -> SchedulingResult:
        name = next(iter(results), "")
        return SchedulingResult(
            profile_results=results if isinstance(results, dict) else dict(results),
            primary_profile_name=name,
        )
