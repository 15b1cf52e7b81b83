"""Static discovery: --endpoints flag, pool file validation, live reload."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from epp.datalayer.datastore import Datastore, PoolInfo
from epp.discovery.base import Discovery
from epp.discovery.pool_file import PoolFileError, parse_endpoints_flag, parse_pool_definition
from epp.discovery.static import StaticDiscovery


def write(path: Path, text: str) -> None:
    """Write and move mtime forward explicitly (coarse file-system clocks in CI)."""
    path.write_text(text)
    st = path.stat()
    bump = getattr(write, "bump", 0) + 1
    write.bump = bump  # type: ignore[attr-defined]
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


# ---- --endpoints ----

def test_flag_parsing_ipv4_and_ipv6() -> None:
    eps = parse_endpoints_flag(" 10.0.0.1:8000, 10.0.0.2:8001,[::1]:8000,[0:0::2]:9000 ")
    assert [(e.name, e.address, e.port, e.key) for e in eps] == [
        ("ep-10.0.0.1-8000", "10.0.0.1", 8000, "10.0.0.1:8000"),
        ("ep-10.0.0.2-8001", "10.0.0.2", 8001, "10.0.0.2:8001"),
        ("ep-::1-8000", "::1", 8000, "[::1]:8000"),
        ("ep-::2-9000", "::2", 9000, "[::2]:9000"),
    ]
    assert all(e.labels == {} for e in eps)


@pytest.mark.parametrize(("value", "match"), [
    ("10.0.0.1", "entry 0 '10.0.0.1': missing port"),
    ("10.0.0.1:8000,host.local:8000", "entry 1 'host.local:8000': 'host.local' is not an IP"),
    ("10.0.0.1:99999", "out of range"),
    ("10.0.0.1:x", "bad port"),
    ("[::1:8000", "unterminated"),
    ("", "no endpoints"),
    ("10.0.0.1:8000,10.0.0.1:8000", r"duplicate address 10.0.0.1:8000 \(also endpoints\[0\]\)"),
])
def test_flag_errors(value: str, match: str) -> None:
    with pytest.raises(PoolFileError, match=match):
        StaticDiscovery.from_endpoints_flag(value)


async def test_flag_discovery_fills_datastore() -> None:
    d = StaticDiscovery.from_endpoints_flag("127.0.0.1:8001,127.0.0.1:8002", pool_name="p")
    assert isinstance(d, Discovery)
    ds = Datastore()
    await d.start(ds)
    try:
        assert ds.synced
        assert [e.key for e in ds.endpoints()] == ["127.0.0.1:8001", "127.0.0.1:8002"]
        assert ds.pool.name == "p" and ds.pool.target_ports == (8001, 8002)
        assert "static endpoints" in d.description
    finally:
        await d.stop()
        await d.stop()


# ---- pool file validation ----

GOOD = """\
pool: {name: my-pool, namespace: ns1}
endpoints:
- name: vllm-0
  address: 10.0.0.1
  port: 8000
  labels: {llm-d.ai/role: decode}
  metricsPort: 9000
- address: 10.0.0.2:8000
- name: v6
  address: "[fd00::1]:8000"
"""


def test_good_file(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    write(path, GOOD)
    d = StaticDiscovery.from_pool_file(path)
    eps = d.endpoints()
    assert [(e.name, e.key) for e in eps] == [
        ("vllm-0", "10.0.0.1:8000"), ("ep-10.0.0.2-8000", "10.0.0.2:8000"), ("v6", "[fd00::1]:8000")]
    assert eps[0].labels == {"llm-d.ai/role": "decode"}
    assert eps[0].metrics_port == 9000 and eps[1].metrics_port is None
    assert d.pool == PoolInfo(name="my-pool", namespace="ns1", target_ports=(8000,))


@pytest.mark.parametrize(("text", "error"), [
    ("endpoints:\n- {address: 10.0.0.1, port: 8000}\n- {address: 10.0.0.2, port: 70000}\n",
     "pool.yaml: endpoints[1].port: Input should be less than 65536"),
    ("endpoints:\n- {address: 10.0.0.1, port: 8000, weight: 3}\n",
     "pool.yaml: endpoints[0].weight: Extra inputs are not permitted"),
    ("endpoints: []\nextra: 1\n", "pool.yaml: extra: Extra inputs are not permitted"),
    ("pool: {name: p, zone: a}\nendpoints: []\n", "pool.yaml: pool.zone: Extra inputs are not permitted"),
    ("endpoints:\n- {address: 10.0.0.1}\n", "pool.yaml: endpoints[0]: port is required"),
    ("endpoints:\n- {address: my-host, port: 1}\n",
     "pool.yaml: endpoints[0].address: 'my-host' is not an IP"),
    ("endpoints:\n- {address: '10.0.0.1:8000', port: 8001}\n", "carries port 8000 but port is 8001"),
    ("endpoints:\n- {address: 10.0.0.1, port: 1, labels: {tier: 1}}\n",
     "pool.yaml: endpoints[0].labels.tier: Input should be a valid string"),
    ("endpoints:\n- {address: 10.0.0.1, port: 1, metricsPort: 0}\n",
     "pool.yaml: endpoints[0].metricsPort: Input should be greater than or equal to 1"),
    ("endpoints:\n- {address: 10.0.0.1, port: 1}\n- {address: '10.0.0.1:1'}\n",
     "pool.yaml: endpoints[1]: duplicate address 10.0.0.1:1 (also endpoints[0])"),
    ("endpoints:\n- {name: a, address: 10.0.0.1, port: 1}\n- {name: a, address: 10.0.0.2, port: 1}\n",
     "pool.yaml: endpoints[1].name: duplicate name 'a'"),
    ("endpoints: [\n", "pool.yaml: not valid YAML"),
    ("- 10.0.0.1:8000\n", "pool.yaml: expected a mapping"),
    ("", "pool.yaml: file is empty"),
    ("# only a comment\n", "pool.yaml: file has no content"),
])
def test_file_errors_name_file_and_field(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "pool.yaml"
    write(path, text)
    with pytest.raises(PoolFileError) as exc:
        StaticDiscovery.from_pool_file(path)
    assert error in str(exc.value)
    assert str(exc.value).startswith(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PoolFileError, match=r"pool\.yaml: cannot read"):
        StaticDiscovery.from_pool_file(tmp_path / "pool.yaml")


def test_empty_endpoint_list_is_valid() -> None:
    d = parse_pool_definition("endpoints: []\n", "x.yaml")
    assert d.endpoints == [] and d.pool.name == "default"
    d = parse_pool_definition("pool: {name: z}\nendpoints:\n", "x.yaml")
    assert d.endpoints == [] and d.pool.name == "z" and d.pool.namespace == "default"


# ---- live reload ----

async def test_reload_grows_from_zero_and_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    write(path, "pool: {name: live}\nendpoints: []\n")
    d = StaticDiscovery.from_pool_file(path, poll_interval=0.02)
    ds = Datastore()
    changes: list[tuple[list[str], list[str]]] = []
    ds.add_listener(lambda a, r: changes.append(([e.key for e in a], [e.key for e in r])))
    await d.start(ds)
    try:
        assert ds.synced and ds.endpoints() == () and ds.pool.name == "live"
        write(path, "pool: {name: live}\nendpoints:\n- {address: 127.0.0.1, port: 8001}\n")
        await until(lambda: len(ds.endpoints()) == 1)
        first = ds.endpoints()[0]
        write(path, "pool: {name: live}\nendpoints:\n- {address: 127.0.0.1, port: 8001}\n"
                    "- {address: 127.0.0.1, port: 8002, labels: {role: prefill}}\n")
        await until(lambda: len(ds.endpoints()) == 2)
        assert ds.endpoints()[0] is first  # unchanged endpoints keep their live state
        assert ds.get("127.0.0.1:8002").labels == {"role": "prefill"}  # type: ignore[union-attr]
        assert ds.pool.target_ports == (8001, 8002)
        write(path, "pool: {name: live}\nendpoints:\n- {address: 127.0.0.1, port: 8002}\n")
        await until(lambda: [e.key for e in ds.endpoints()] == ["127.0.0.1:8002"])
        assert changes == [(["127.0.0.1:8001"], []), (["127.0.0.1:8002"], []), ([], ["127.0.0.1:8001"])]
    finally:
        await d.stop()


async def test_bad_edit_keeps_last_good_set(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="epp.discovery.static")
    path = tmp_path / "pool.yaml"
    write(path, "endpoints:\n- {address: 127.0.0.1, port: 8001}\n")
    d = StaticDiscovery.from_pool_file(path, poll_interval=0)  # driven by check_file()
    ds = Datastore()
    await d.start(ds)
    keys = [e.key for e in ds.endpoints()]
    write(path, "endpoints:\n- {address: 127.0.0.1, port: 99999}\n")
    assert not d.check_file()
    assert [e.key for e in ds.endpoints()] == keys
    assert d.rejected_reloads == 1
    rejected = [r for r in caplog.records if r.getMessage().startswith("pool file change rejected")]
    assert len(rejected) == 1 and "endpoints[0].port" in rejected[0].error  # type: ignore[attr-defined]
    assert not d.check_file()  # unchanged bad file: not re-read, not re-logged
    assert d.rejected_reloads == 1
    write(path, "")  # an editor truncating before writing must not empty the pool
    assert not d.check_file()
    assert [e.key for e in ds.endpoints()] == keys
    path.unlink()
    assert not d.check_file()
    assert [e.key for e in ds.endpoints()] == keys
    write(path, "endpoints:\n- {address: 127.0.0.1, port: 8003}\n")
    assert d.check_file()
    assert [e.key for e in ds.endpoints()] == ["127.0.0.1:8003"]
    assert not d.check_file()
    await d.stop()


async def test_touch_without_change_is_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    write(path, "endpoints:\n- {address: 127.0.0.1, port: 8001}\n")
    d = StaticDiscovery.from_pool_file(path, poll_interval=0)
    ds = Datastore()
    await d.start(ds)
    write(path, "# same pool, new comment\nendpoints:\n- {address: 127.0.0.1, port: 8001}\n")
    assert not d.check_file()
    assert d.reloads == 0


async def until(cond: Callable[[], bool]) -> None:
    """Wait until ``cond()`` holds, at most 5 s."""
    async with asyncio.timeout(5.0):
        while True:
            if cond():
                return
            await asyncio.sleep(0.01)


async def test_pool_file_objectives_reach_the_datastore_and_follow_edits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from epp.datalayer.datastore import Datastore

    path = tmp_path / "pool.yaml"
    path.write_text("endpoints: []\nobjectives:\n- {name: premium, priority: 10}\n- {name: batch, priority: -1}\n")
    disc = StaticDiscovery.from_pool_file(path, poll_interval=0)
    ds = Datastore()
    await disc.start(ds)
    assert {k: v.priority for k, v in ds.objectives.items()} == {"premium": 10, "batch": -1}
    path.write_text("endpoints: []\nobjectives:\n- {name: premium, priority: 5}\n")
    assert disc.check_file()
    assert {k: v.priority for k, v in ds.objectives.items()} == {"premium": 5}
    await disc.stop()


def test_duplicate_objective_named_in_error() -> None:
    with pytest.raises(PoolFileError, match=r"objectives\[1\].name: duplicate objective 'a'"):
        parse_pool_definition("endpoints: []\nobjectives: [{name: a}, {name: a}]\n", "p.yaml")
