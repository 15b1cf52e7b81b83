"""GIE conformance test hooks (``epp serve --enable-conformance-hooks``; off by default).

GIE's gateway conformance suite does not test scheduling; it tests that a gateway does what
the picker says. It drives the picker with one request header and checks one response header
(GIE reference §8):

* ``test-epp-endpoint-selection: ip[:port][,ip[:port]...]`` — the picker routes to exactly
  these endpoints, in this order (the first is the primary, the rest the fallback list of
  ``x-gateway-destination-endpoint``), instead of scheduling. A bare ``ip`` stands for every
  target port of that pod, ``ip:port`` for one (the data-parallel cases). Entries that are not
  endpoints of the pool are skipped; if none is left the answer is 503, as for an empty
  subset hint. Admission still runs (a shed or queued request behaves as usual).
* ``x-conformance-test-served-endpoint`` on the response — the endpoint that served the
  request as the gateway reported it (``envoy.lb`` / ``x-gateway-destination-endpoint-served``
  metadata), or the picker's primary pick when the gateway did not report one.

Never turn this on in production: any client could choose its pod with the header.
"""

from __future__ import annotations

from epp.datalayer.datastore import Datastore
from epp.framework import errors
from epp.framework.scheduling import ProfileRunResult, SchedulingResult
from epp.requestcontrol.candidates import subset_candidates

SELECTION_HEADER = "test-epp-endpoint-selection"
SERVED_RESPONSE_HEADER = "x-conformance-test-served-endpoint"
PROFILE = "conformance"


def selected(datastore: Datastore, value: str) -> SchedulingResult:
    """The scheduling result the test header asks for (ordered as in the header)."""
    targets = subset_candidates(datastore, value)
    if not targets:
        raise errors.unavailable(f"{SELECTION_HEADER} names no endpoint of the inference pool: {value!r}")
    return SchedulingResult({PROFILE: ProfileRunResult(targets)}, PROFILE)


def served_endpoint(served: str | None, destination: str) -> str | None:
    """What ``x-conformance-test-served-endpoint`` carries: the gateway's report, else the
    primary of the picker's destination list."""
    if served:
        return served
    return destination.split(",", 1)[0] or None
