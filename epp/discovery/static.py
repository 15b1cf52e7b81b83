"""Static (non-Kubernetes) discovery: ``--endpoints ip:port,...`` or a pool file (format and
validation: :mod:`epp.discovery.pool_file`).

The file is polled (stat every ``poll_interval`` seconds) and re-read when it changes, so a
pool can grow from zero endpoints while the picker runs. A change that fails validation is
logged and the last good set is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from epp.datalayer.datastore import CatalogueModel, Datastore, Objective, PoolInfo
from epp.discovery.base import Discovery
from epp.discovery.pool_file import PoolFileError, load_pool_file, parse_endpoints_flag
from epp.framework.datalayer import Endpoint

log = logging.getLogger(__name__)


def _file_signature(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


class StaticDiscovery(Discovery):
    """A fixed endpoint list, or a pool file followed by polling."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint] = (),
        *,
        pool: PoolInfo | None = None,
        path: str | os.PathLike[str] | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self._endpoints = list(endpoints)
        base = pool or PoolInfo()
        self._pool = PoolInfo(name=base.name, namespace=base.namespace,
                              target_ports=base.target_ports
                              or tuple(sorted({ep.port for ep in self._endpoints})),
                              app_protocol=base.app_protocol)
        self.path = Path(path) if path is not None else None
        self.poll_interval = poll_interval
        self._default_pool = pool
        self._signature: tuple[int, int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._datastore: Datastore | None = None
        self._file_missing = False
        self._objectives: dict[str, Objective] = {}
        self._models: dict[str, CatalogueModel] = {}
        self.reloads = 0  # applied reloads (tests, debugging)
        self.rejected_reloads = 0

    @classmethod
    def from_endpoints_flag(cls, value: str, *, pool_name: str = "default",
                            namespace: str = "default") -> StaticDiscovery:
        """From ``--endpoints 10.0.0.1:8000,[::1]:8000``. Raises PoolFileError naming the entry."""
        return cls(parse_endpoints_flag(value), pool=PoolInfo(name=pool_name, namespace=namespace))

    @classmethod
    def from_pool_file(cls, path: str | os.PathLike[str], *, poll_interval: float = 1.0,
                       default_pool: PoolInfo | None = None) -> StaticDiscovery:
        """Load and validate ``path`` now (config errors fail at start), follow it after start.

        ``poll_interval`` <= 0 disables following changes.
        """
        p = Path(path)
        try:
            sig = _file_signature(p)
        except OSError as e:
            raise PoolFileError(f"{path}: cannot read: {e.strerror or e}") from None
        d = load_pool_file(p, default_pool=default_pool)
        self = cls(d.endpoints, pool=d.pool, path=p, poll_interval=poll_interval)
        self._objectives = d.objectives
        self._models = d.models
        self._default_pool = default_pool
        self._signature = sig
        return self

    @property
    def description(self) -> str:
        if self.path is not None:
            return f"static pool file {self.path}"
        return f"static endpoints ({len(self._endpoints)})"

    @property
    def pool(self) -> PoolInfo:
        return self._pool

    def endpoints(self) -> list[Endpoint]:
        """The last good endpoint definitions (fresh objects; the datastore holds live state)."""
        return list(self._endpoints)

    async def start(self, datastore: Datastore) -> None:
        self._datastore = datastore
        self._apply()
        datastore.synced = True
        log.info("static discovery synced", extra={
            "source": self.description, "endpoints": len(self._endpoints), "pool": self._pool.name})
        if self.path is not None and self.poll_interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._watch(), name=f"pool-file-watch {self.path}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _apply(self) -> None:
        ds = self._datastore
        if ds is None:
            return
        ds.pool = self._pool
        if self.path is not None:
            ds.objectives = dict(self._objectives)
            ds.catalogue = dict(self._models)
        ds.replace_endpoints(
            Endpoint(name=e.name, address=e.address, port=e.port, labels=dict(e.labels),
                     metrics_host=e.metrics_host, metrics_port=e.metrics_port)
            for e in self._endpoints)

    def check_file(self) -> bool:
        """Re-read the pool file if it changed since the last look. True when a new set was
        applied. Invalid content is logged and the last good set kept. (The watcher calls
        this every ``poll_interval``; tests may call it directly.)"""
        if self.path is None:
            return False
        try:
            sig = _file_signature(self.path)
        except OSError as e:
            if not self._file_missing:
                self._file_missing = True
                log.warning("pool file unreadable; keeping the last good endpoint set",
                            extra={"path": str(self.path), "error": e.strerror or str(e)})
            return False
        if self._file_missing:
            self._file_missing = False
            log.info("pool file readable again", extra={"path": str(self.path)})
        if sig == self._signature:
            return False
        self._signature = sig
        try:
            d = load_pool_file(self.path, default_pool=self._default_pool)
        except PoolFileError as e:
            self.rejected_reloads += 1
            log.error("pool file change rejected; keeping the last good endpoint set",
                      extra={"path": str(self.path), "error": str(e)})
            return False
        pool, endpoints = d.pool, d.endpoints
        before = {(ep.key, ep.name, tuple(sorted(ep.labels.items())), ep.metrics_port)
                  for ep in self._endpoints}
        after = {(ep.key, ep.name, tuple(sorted(ep.labels.items())), ep.metrics_port)
                 for ep in endpoints}
        if (before == after and pool == self._pool and d.objectives == self._objectives
                and d.models == self._models):
            return False
        self._pool = pool
        self._endpoints = endpoints
        self._objectives = d.objectives
        self._models = d.models
        self._apply()
        self.reloads += 1
        log.info("pool file reloaded", extra={"path": str(self.path), "endpoints": len(endpoints)})
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.check_file()
            except Exception:  # keep following the file whatever happens
                log.exception("pool file watch error", extra={"path": str(self.path)})
