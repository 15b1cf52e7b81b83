"""The discovery interface: who is in the pool.

A discovery source owns the endpoint set of one ``Datastore``: it writes endpoints
(``replace_endpoints`` / ``upsert_endpoint`` / ``remove_endpoint``) and the pool info, and
nothing else writes them. Everything it writes must be rebuildable from outside state (a
file, the Kubernetes API), so any number of picker replicas can each run their own.

Contract of an implementation:

* ``await start(datastore)`` returns only after the **first full sync** has been written to
  the datastore (an empty pool is a valid result) and ``datastore.synced`` is set to True.
  The runner reports ready only after that, so Envoy never sees a picker that does not know
  its pool yet. A configuration error found during that first sync raises (fail at start,
  naming the field); later errors (a bad edit, a broken watch) are logged and the last good
  state is kept while the source retries.
* After ``start`` returns, the source keeps following changes in background tasks until
  ``await stop()``, which cancels them and is safe to call twice or before ``start``.
* ``description`` is a short human string for logs (``"static file pool.yaml"``,
  ``"InferencePool default/my-pool"``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from epp.datalayer.datastore import Datastore


class Discovery(ABC):
    """A source of the pool's endpoints (static list/file, Kubernetes InferencePool, ...)."""

    @property
    @abstractmethod
    def description(self) -> str:
        """Short human description for logs."""

    @abstractmethod
    async def start(self, datastore: Datastore) -> None:
        """Write the first full endpoint set (and pool info), set ``datastore.synced = True``,
        then keep following changes in the background. Raises on configuration errors."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop following changes. Idempotent; the datastore keeps its last state."""
