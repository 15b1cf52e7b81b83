"""``epp serve``'s tenant flags: documented in --help, contradictions refused at start."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from epp.config.loader import ConfigError
from epp.plugins.flowcontrol.token_fair_share_policy import TierSpec, TokenFairShareParams, TokenFairSharePolicy
from epp.requestcontrol.tenants import FAIRNESS_HEADER, JWT_NAMESPACE, ClaimsLocation
from epp.runner import cli
from epp.runner.tenants import tenant_options, tier_names


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(["--endpoints", "10.0.0.1:8000", *argv])


def test_help_documents_every_tenant_flag() -> None:
    res = subprocess.run([sys.executable, "-m", "epp", "serve", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0
    for flag in ("--tenant-claim", "--tier-claim", "--tenant-claims-metadata", "--tenant-header",
                 "--tier-header", "--trust-fairness-header", "--usage-max-tenants"):
        assert flag in res.stdout, flag


def test_default_is_gie_behaviour() -> None:
    opts = tenant_options(_args())
    src = opts["tenants"]
    assert not src.verified and src.trusts_client_header and src.claims_at is None
    assert opts["usage_max_tenants"] == 100


def test_claim_flags_build_a_verified_source() -> None:
    src = tenant_options(_args("--tenant-claim", "tenant", "--tier-claim", "tier",
                               "--tenant-claims-metadata", f"{JWT_NAMESPACE}/my-provider"))["tenants"]
    assert src.claims_at == ClaimsLocation(JWT_NAMESPACE, "my-provider")
    assert src.strip_headers == (FAIRNESS_HEADER,)
    assert src.resolve({FAIRNESS_HEADER: "x"}, {"tenant": "acme", "tier": "gold"}).fairness_id == "gold/acme"
    trusted = tenant_options(_args("--tenant-header", "x-epp-tenant", "--trust-fairness-header", "true"))["tenants"]
    assert trusted.resolve({FAIRNESS_HEADER: "fallback"}).tenant == "fallback"


@pytest.mark.parametrize(("argv", "needle"), [
    (("--tenant-claim", "t", "--tenant-header", "h"), "--tenant-claim and --tenant-header"),
    (("--tier-claim", "tier"), "needs a verified tenant"),
    (("--tenant-claim", " "), "--tenant-claim: empty name"),
    (("--usage-max-tenants", "-1"), "--usage-max-tenants"),
    (("--tenant-claim", "t", "--tenant-claims-metadata", "/k"), "--tenant-claims-metadata"),
])
def test_contradictions_are_config_errors_naming_the_flag(argv: tuple[str, ...], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        tenant_options(_args(*argv))


def test_serve_exits_2_on_a_bad_tenant_flag() -> None:
    res = subprocess.run([sys.executable, "-m", "epp", "serve", "--metrics-port", "-1", "--endpoints",
                          "10.0.0.1:8000", "--tier-header", "x-tier"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "needs a verified tenant" in res.stderr and "Traceback" not in res.stderr


def test_tier_names_come_from_the_configured_fair_share_tiers() -> None:
    fair = TokenFairSharePolicy("fair", TokenFairShareParams(tiers=(
        TierSpec(name="gold", fairness_ids=("city-*",)), TierSpec(name="basic", fairness_ids=("dept-a",)))))
    names = tier_names([fair])
    assert names is not None
    assert (names.name("city-rome"), names.name("dept-a"), names.name("x")) == ("gold", "basic", "default")
    assert tier_names([TokenFairSharePolicy("plain")]) is None
