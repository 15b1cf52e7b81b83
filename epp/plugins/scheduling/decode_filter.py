"""``decode-filter`` (llm-d): keep the endpoints that can decode.

P/D pods carry the label ``llm-d.ai/role``. A decode-capable pod is one labelled ``decode``,
``prefill-decode`` (aggregated pod that can do both), the deprecated ``both`` or
``encode-prefill-decode``; a pod with *no* role label counts as decode-capable too, so an
unlabelled (aggregated) pool keeps working unchanged when this filter is configured.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework.datalayer import (
    ROLE_BOTH,
    ROLE_DECODE,
    ROLE_ENCODE_PREFILL_DECODE,
    ROLE_LABEL,
    ROLE_PREFILL_DECODE,
    Endpoint,
)
from epp.framework.scheduling import Filter, LLMRequest

DECODE_ROLES = frozenset({ROLE_DECODE, ROLE_PREFILL_DECODE, ROLE_BOTH, ROLE_ENCODE_PREFILL_DECODE})


class DecodeFilter(Filter):
    """Endpoints whose role can decode, plus unlabelled ones."""

    type_name = "decode-filter"

    def filter(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        roles = DECODE_ROLES
        out = []
        for ep in endpoints:
            role = ep.labels.get(ROLE_LABEL)
            if role is None or role in roles:
                out.append(ep)
        return out
