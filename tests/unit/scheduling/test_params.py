"""Parameter conventions shared by every plugin: Go durations, camelCase, unknown keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from epp.framework.plugin import parse_duration
from epp.plugins.flowcontrol.utilization_detector import UtilizationParams


@pytest.mark.parametrize(("text", "seconds"), [
    ("200ms", 0.2), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1m30s", 90.0),
    ("1.5s", 1.5), ("500us", 0.0005), ("500µs", 0.0005), ("1500ms", 1.5), ("0", 0.0),
    (0.25, 0.25), (3, 3.0),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5", "ms", "-1s", "2 s", "1d", "abc", True, None, "1s2"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(st.integers(0, 10**6))
def test_milliseconds_roundtrip(ms):
    assert parse_duration(f"{ms}ms") == pytest.approx(ms / 1000)


def test_params_use_camel_case_and_reject_unknown_keys():
    p = UtilizationParams.model_validate({"metricsStalenessThreshold": "500ms",
                                          "queueDepthThreshold": 3})
    assert p.metrics_staleness_threshold == 0.5 and p.queue_depth_threshold == 3
    with pytest.raises(ValidationError, match="Extra inputs"):
        UtilizationParams.model_validate({"queueDepth": 3})
