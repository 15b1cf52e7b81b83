"""What one picker worker learns in its approximate prefix index, told to the others.

``epp serve --workers N`` runs N processes behind one port, each with its own index learned
from its own picks. Without sharing, a prompt prefix routed by worker A to pod X is unknown
to worker B, which places the same prefix anew (on another pod as soon as in-flight counts,
which are per worker, differ): N workers would cache each shared prefix up to N times.

So each learning (an endpoint and the block hashes it now holds) is sent as one datagram to
every other worker over Unix datagram sockets in a directory the supervisor gives
(``EPP_WORKER_DIR``), and each worker applies what it receives to its own index: within a
millisecond every worker routes the prefix where the first one did. A cold prefix that
two workers see at the same moment is placed alike by the scorer's rendezvous hashing
(``coldPrefixAffinity``). Sending never blocks the request loop (a full peer buffer drops the
datagram: the next request with that prefix teaches it again); receiving runs on the loop,
costing what learning costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from array import array
from collections.abc import Sequence
from pathlib import Path

from epp.framework.datalayer import Endpoint, PoolView
from epp.plugins.scheduling.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

#: set by the supervisor of ``epp serve --workers``: this worker's index, and the directory of
#: every worker's socket (``worker-<index>.sock``)
WORKER_INDEX_ENV = "EPP_WORKER_INDEX"
WORKER_DIR_ENV = "EPP_WORKER_DIR"
#: and how many workers there are (N): several processes share one pod's traffic, each with
#: its own index
WORKER_COUNT_ENV = "EPP_WORKER_COUNT"
_MAX_BATCH = 64


def worker_count() -> int:
    """How many workers this process is one of (1 outside ``--workers``)."""
    try:
        return max(1, int(os.environ.get(WORKER_COUNT_ENV, "1")))
    except ValueError:
        return 1


class PrefixPeers:
    """This worker's socket, and the other workers' addresses."""

    def __init__(self, index: PrefixIndex, pool: PoolView, directory: str, me: int, count: int) -> None:
        self.index = index
        self.pool = pool
        self.path = str(Path(directory) / f"worker-{me}.sock")
        self.peers = [str(Path(directory) / f"worker-{i}.sock") for i in range(count) if i != me]
        self.sent = 0
        self.dropped = 0
        self.applied = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._by_key: dict[str, Endpoint] = {}
        pool.add_listener(self._pool_changed)

    def _pool_changed(self, added: tuple[Endpoint, ...], removed: tuple[Endpoint, ...]) -> None:
        self._by_key = {}  # rebuilt on the next datagram (listeners may run on any thread)

    @classmethod
    def from_env(cls, index: PrefixIndex, pool: PoolView, count: int) -> PrefixPeers | None:
        directory = os.environ.get(WORKER_DIR_ENV)
        me = os.environ.get(WORKER_INDEX_ENV)
        if count < 2 or not directory or me is None or not me.isdigit():
            return None
        return cls(index, pool, directory, int(me), count)

    async def start(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock.bind(self.path)
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def publish(self, endpoint: Endpoint, hashes: Sequence[int]) -> None:
        """Tell the other workers that ``endpoint`` now holds ``hashes`` (never blocks)."""
        sock = self._sock
        if sock is None or not hashes:
            return
        payload = endpoint.key.encode() + b"\0" + array("Q", hashes).tobytes()
        for peer in self.peers:
            try:
                sock.sendto(payload, peer)
                self.sent += 1
            except OSError:  # peer not up yet, gone, or its buffer full
                self.dropped += 1

    def _endpoint(self, key: str) -> Endpoint | None:
        by_key = self._by_key
        if not by_key:
            by_key = self._by_key = {e.key: e for e in self.pool.endpoints()}
        return by_key.get(key)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(_MAX_BATCH):
            try:
                data = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            key, sep, packed = data.partition(b"\0")
            if not sep or len(packed) % 8:
                continue
            ep = self._endpoint(key.decode("utf-8", "replace"))
            if ep is None:
                continue  # an endpoint this worker's pool does not have (yet)
            hashes = array("Q")
            hashes.frombytes(packed)
            self.index.add(ep, hashes)
            self.applied += 1
