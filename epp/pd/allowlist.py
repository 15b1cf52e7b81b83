"""Which prefill hosts the sidecar may call (SSRF protection).

The prefill target comes from a request header. Envoy strips any client-sent value and the
picker sets it, but a request that reaches the sidecar by another path (a pod-to-pod call, a
misconfigured gateway) could name any host, and the sidecar would POST the prompt there. The
allowlist bounds that to the pool's pods:

* static entries: ``ip:port`` (that port only), ``ip`` (any port) or a CIDR (any address in
  it, any port); host names are matched literally;
* a pool file (the picker's static-discovery format) re-read when it changes: every
  endpoint's ``ip:port`` is allowed.

No entries and no pool file = no protection (every target allowed; the CLI warns).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from epp.framework.datalayer import format_hostport, parse_hostport

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_hostport(value: str) -> tuple[str, int | None]:
    """``ip[:port]`` / ``[v6][:port]`` / ``name[:port]`` → (canonical host, port or None).
    Raises ValueError when it is not an address."""
    host, port = parse_hostport(value.strip())
    if not host:
        raise ValueError(f"no host in {value!r}")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port out of range in {value!r}")
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    return host.lower(), port


@dataclass(slots=True)
class PrefillAllowlist:
    hostports: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)
    networks: list[IPNetwork] = field(default_factory=list)
    pool_file: str | None = None
    #: ip:port of every endpoint in the pool file (last good read)
    pool_hostports: frozenset[str] = frozenset()
    _signature: tuple[int, int] | None = None

    @classmethod
    def build(cls, entries: list[str], pool_file: str | None = None) -> PrefillAllowlist:
        """Parse static entries; raises ValueError naming a bad one."""
        al = cls(pool_file=pool_file)
        for raw in entries:
            for item in (p.strip() for p in raw.split(",")):
                if not item:
                    continue
                if "/" in item:
                    try:
                        al.networks.append(ipaddress.ip_network(item, strict=False))
                    except ValueError:
                        raise ValueError(f"allowlist entry {item!r}: not a CIDR") from None
                    continue
                try:
                    host, port = normalize_hostport(item)
                except ValueError as exc:
                    raise ValueError(f"allowlist entry {item!r}: {exc}") from None
                if port is None:
                    al.hosts.add(host)
                else:
                    al.hostports.add(format_hostport(host, port))
        if pool_file is not None:
            al.reload()
        return al

    @property
    def enabled(self) -> bool:
        return bool(self.hostports or self.hosts or self.networks or self.pool_file)

    def allows(self, target: str) -> bool:
        if not self.enabled:
            return True
        try:
            host, port = normalize_hostport(target)
        except ValueError:
            return False
        if host in self.hosts:
            return True
        if port is not None:
            hp = format_hostport(host, port)
            if hp in self.hostports or hp in self.pool_hostports:
                return True
        if self.networks:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                return False
            return any(ip in net for net in self.networks)
        return False

    # ---- the pool file ----
    def reload(self) -> bool:
        """Re-read the pool file if it changed; keeps the last good set on errors."""
        if self.pool_file is None:
            return False
        from epp.discovery.pool_file import PoolFileError, load_pool_file

        try:
            st = os.stat(self.pool_file)
        except OSError as exc:
            if self._signature is not None:
                log.warning("pool file %s: %s (keeping the last allowlist)", self.pool_file, exc)
                self._signature = None
            return False
        sig = (st.st_mtime_ns, st.st_size)
        if sig == self._signature:
            return False
        self._signature = sig
        try:
            definition = load_pool_file(Path(self.pool_file))
        except PoolFileError as exc:
            log.warning("%s (keeping the last allowlist)", exc)
            return False
        self.pool_hostports = frozenset(ep.key for ep in definition.endpoints)
        log.info("prefill allowlist from %s: %d endpoints", self.pool_file, len(self.pool_hostports))
        return True

    async def follow(self, interval: float = 1.0) -> None:
        """Poll the pool file until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.reload()
