"""``epp serve``'s model-placement flags: off by default, errors that name the flag or field."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from epp.config.loader import ConfigError
from epp.runner.placement import add_placement_arguments, placement_options


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_placement_arguments(p)
    return p.parse_args(list(argv))


def test_off_unless_asked_for() -> None:
    assert placement_options(parse()) == {"placement": None, "placement_self": None}


def test_a_mode_alone_takes_the_defaults() -> None:
    opts = placement_options(parse("--model-placement", "observe"))
    assert opts["placement"].mode == "observe" and opts["placement"].hold_timeout == 30.0


@pytest.mark.parametrize("config, argv, error", [
    ("holdTimeout: 1s\n", (), "--model-placement-config needs --model-placement"),
    ("peers: [http://127.0.0.1:9005, http://127.0.0.1:9006]\n", ("--model-placement", "manage"),
     "give --model-placement-self"),
    ("peers: [http://127.0.0.1:9005]\n", ("--model-placement", "manage", "--model-placement-self", "http://x:1"),
     "is not one of the peers"),
    ("peers: [http://127.0.0.1]\n", ("--model-placement", "manage", "--model-placement-self", "http://127.0.0.1"),
     "give the port of the peer API"),
    ("peers: [10.0.0.1:9005]\n", ("--model-placement", "manage"), "peers: peer '10.0.0.1:9005': expected an http"),
])
def test_errors_name_the_flag_or_field(tmp_path: Path, config: str, argv: tuple[str, ...], error: str) -> None:
    path = tmp_path / "placement.yaml"
    path.write_text(config)
    with pytest.raises(ConfigError, match=error):
        placement_options(parse("--model-placement-config", str(path), *argv))
