"""Shared fixtures: a fast simulator config and HTTP helpers (127.0.0.1, free ports)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from epp.sim import SimConfig

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def fast_config() -> SimConfig:
    """Ten times faster than real time, small cache; tests tweak single knobs with replace()."""
    return SimConfig(time_scale=0.1, num_gpu_blocks=2000, histogram_refresh=0.0)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


def metric_value(text: str, name: str, **labels: str) -> float:
    """Value of the first sample ``name{...}`` whose labels include ``labels``."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([^{\s]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise KeyError(f"{name} {labels} not in page")
