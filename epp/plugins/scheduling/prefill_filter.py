"""``prefill-filter`` (llm-d): keep the endpoints that can run a prefill leg.

Unlike ``decode-filter`` the label is required: an unlabelled pod is never a prefill target,
so adding this filter to a pool that has no P/D roles simply finds no prefill pod (and the
request is served aggregated).
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework.datalayer import (
    ROLE_BOTH,
    ROLE_ENCODE_PREFILL,
    ROLE_ENCODE_PREFILL_DECODE,
    ROLE_LABEL,
    ROLE_PREFILL,
    ROLE_PREFILL_DECODE,
    Endpoint,
)
from epp.framework.scheduling import Filter, LLMRequest

PREFILL_ROLES = frozenset(
    {ROLE_PREFILL, ROLE_ENCODE_PREFILL, ROLE_PREFILL_DECODE, ROLE_BOTH, ROLE_ENCODE_PREFILL_DECODE}
)


class PrefillFilter(Filter):
    """Endpoints labelled with a prefill-capable role."""

    type_name = "prefill-filter"

    def filter(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        roles = PREFILL_ROLES
        return [ep for ep in endpoints if ep.labels.get(ROLE_LABEL) in roles]
