"""``epp envoy-config --jwt-*``: the generated config is one Envoy 1.40 accepts (``--mode
validate``), verifies tokens before the picker and forwards the verified payload to it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from epp.envoy.jwt import JWT_NAMESPACE, PAYLOAD_KEY, JwtSpec
from epp.local.topology import envoy_binary

from .jwt_tokens import Issuer

pytestmark = [pytest.mark.envoy]

BASE = ["--pool", "10.0.0.1:8000,10.0.0.2:8000", "--picker", "127.0.0.1:9002", "--picker-tls", "false"]


def _config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "epp", "envoy-config", *BASE, *args],
                          capture_output=True, text=True, timeout=60)


def _validate(path: Path) -> None:
    res = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def _http_filters(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = cfg["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    return list(hcm["httpFilters"])


@pytest.mark.parametrize("jwks", ["file", "inline"])
def test_generated_jwt_config_validates_and_guards_every_route(tmp_path: Path, jwks: str) -> None:
    issuer = Issuer()
    source = ["--jwt-jwks", issuer.jwks()]
    if jwks == "file":
        (tmp_path / "jwks.json").write_text(issuer.jwks())
        source = ["--jwt-jwks-file", str(tmp_path / "jwks.json")]
    res = _config("--jwt-issuer", issuer.issuer, "--jwt-audiences", "inference,batch", *source,
                  "--jwt-claim-header", "tenant=X-EPP-Tenant", "--jwt-claim-header", "tier=x-epp-tier")
    assert res.returncode == 0, res.stderr
    path = tmp_path / "envoy.json"
    path.write_text(res.stdout)
    _validate(path)
    cfg = orjson.loads(res.stdout)
    filters = _http_filters(cfg)
    names = [f["name"] for f in filters]
    # client copies of the claim headers go first, then the token check, then the picker
    assert names == ["envoy.filters.http.header_mutation", "envoy.filters.http.jwt_authn",
                     "envoy.filters.http.ext_proc", "envoy.filters.http.router"]
    removed = {m["remove"] for m in filters[0]["typedConfig"]["mutations"]["requestMutations"]}
    assert removed == {"x-epp-tenant", "x-epp-tier"}
    jwt = filters[1]["typedConfig"]
    (provider_name, provider), = jwt["providers"].items()
    assert provider["issuer"] == issuer.issuer and provider["audiences"] == ["inference", "batch"]
    assert provider["payloadInMetadata"] == PAYLOAD_KEY
    assert jwt["rules"] == [{"match": {"prefix": "/"}, "requires": {"providerName": provider_name}}]
    forwarded = filters[2]["typedConfig"]["metadataOptions"]["forwardingNamespaces"]["untyped"]
    assert JWT_NAMESPACE in forwarded


def test_without_jwt_options_nothing_changes() -> None:
    res = _config()
    assert res.returncode == 0, res.stderr
    filters = _http_filters(orjson.loads(res.stdout))
    assert [f["name"] for f in filters] == ["envoy.filters.http.ext_proc", "envoy.filters.http.router"]
    forwarded = filters[0]["typedConfig"]["metadataOptions"]["forwardingNamespaces"]["untyped"]
    assert JWT_NAMESPACE not in forwarded


@pytest.mark.parametrize(("args", "needle"), [
    (("--jwt-jwks", "{}"), "need --jwt-issuer"),
    (("--jwt-issuer", "https://i"), "exactly one of a JWKS file or an inline JWKS"),
    (("--jwt-issuer", "https://i", "--jwt-jwks", "{}", "--jwt-claim-header", "tenant"), "CLAIM=HEADER"),
])
def test_bad_jwt_options_exit_2_naming_the_problem(args: tuple[str, ...], needle: str) -> None:
    res = _config(*args)
    assert res.returncode == 2, res.stdout
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_jwt_spec_needs_one_jwks_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        JwtSpec(issuer="https://i", jwks_file="a", jwks_inline="b")
