"""`epp usage` against recorded series: a Prometheus-compatible API and a picker's /metrics."""

from __future__ import annotations

import argparse
import threading
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from epp.usage import cli
from epp.usage.series import QUEUE_SECONDS, REQUESTS, TOKENS

DATA = Path(__file__).resolve().parents[2] / "data" / "usage"


class FakeStore:
    """Serves /api/v1/query with recorded answers (by series name) and remembers the queries;
    with ``token``, only to ``Authorization: Bearer <token>`` (401 without one, 403 otherwise)."""

    def __init__(self, answers: dict[str, bytes], status: int = 200, token: str | None = None) -> None:
        self.queries: list[dict[str, str]] = []
        self.auth_seen: list[str | None] = []
        store = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                store.queries.append(params)
                body = next((v for k, v in answers.items() if k in params.get("query", "")), b"{}")
                if url.path == "/metrics":
                    body = answers["/metrics"]
                code = status
                if token is not None:
                    auth = self.headers.get("Authorization")
                    store.auth_seen.append(auth)
                    if auth != f"Bearer {token}":
                        code, body = (401, b"Unauthorized") if auth is None else (403, b"Forbidden")
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store() -> Iterator[FakeStore]:
    s = FakeStore({
        REQUESTS: (DATA / "prometheus_requests.json").read_bytes(),
        TOKENS: (DATA / "prometheus_tokens.json").read_bytes(),
        QUEUE_SECONDS: (DATA / "prometheus_queue.json").read_bytes(),
    })
    yield s
    s.close()


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    code = cli.run(p.parse_args(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_month_from_prometheus_as_csv(store: FakeStore, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--prometheus", store.url, "--period", "month", "--at", "2025-10-15", "--csv",
                         "--pool", "llm"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split(",") == list(cli.COLUMNS)
    berlin, dept, other = (line.split(",") for line in lines[1:])
    # the biggest consumer first; tokens are prompt + cached + completion; share of all tokens
    assert berlin == ["city-berlin", "gold", "1200", "3", "900000", "600000", "300000", "1800000", "90.0", "0.050"]
    assert dept == ["dept-a", "basic", "310", "0", "150000", "0", "50000", "200000", "10.0", "0.500"]
    assert other[:4] == ["other", "basic", "42", "0"] and other[7] == "0"  # NaN ignored
    # one instant query per series at the end of October, over the whole month, for the pool
    assert len(store.queries) == 3
    end = datetime(2025, 11, 1, tzinfo=UTC).timestamp()
    assert {float(q["time"]) for q in store.queries} == {end}
    assert all("[2678400s]" in q["query"] and 'inference_pool="llm"' in q["query"] for q in store.queries)


def test_the_table_names_the_period(store: FakeStore, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--prometheus", store.url, "--period", "week", "--at", "2025-10-15"], capsys)
    assert code == 0
    assert out.splitlines()[0].startswith("usage 2025-10-13 00:00 .. 2025-10-20 00:00 UTC (week)")
    assert "city-berlin" in out and "token_share_pct" in out


def test_the_period_so_far_ends_now() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert cli.period_bounds("month", date(2026, 11, 30), now) == (datetime(2026, 11, 1, tzinfo=UTC), now)
    assert cli.period_bounds("day", date(2026, 11, 29), now) == (
        datetime(2026, 11, 29, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC))
    with pytest.raises(ValueError, match="has not started"):
        cli.period_bounds("week", date(2026, 12, 10), now)


def test_a_failing_store_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    bad = FakeStore({REQUESTS: b'{"status":"error","error":"bad_data: parse error"}'}, status=400)
    try:
        code, out, err = _run(["--prometheus", bad.url], capsys)
    finally:
        bad.close()
    assert code == 2 and out == ""
    assert "HTTP 400" in err and "parse error" in err


def test_an_unreachable_store_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["--prometheus", "http://127.0.0.1:9", "--timeout", "2"], capsys)
    assert code == 2 and "127.0.0.1:9" in err


PICKER_PAGE = b"""# HELP epp_tenant_requests_total Requests per tenant.
# TYPE epp_tenant_requests_total counter
epp_tenant_requests_total{inference_pool="llm",outcome="served",tenant="dept-a",tier="basic"} 10.0
epp_tenant_requests_total{inference_pool="llm",outcome="rejected",tenant="dept-a",tier="basic"} 2.0
epp_tenant_requests_total{inference_pool="other-pool",outcome="served",tenant="dept-b",tier="basic"} 7.0
# HELP epp_tenant_tokens_total Tokens per tenant.
# TYPE epp_tenant_tokens_total counter
epp_tenant_tokens_total{inference_pool="llm",tenant="dept-a",tier="basic",type="prompt"} 1000.0
epp_tenant_tokens_total{inference_pool="llm",tenant="dept-a",tier="basic",type="completion"} 250.0
# HELP epp_tenant_queue_seconds_total Queueing.
# TYPE epp_tenant_queue_seconds_total counter
epp_tenant_queue_seconds_total{inference_pool="llm",tenant="dept-a",tier="basic"} 5.0
"""


def test_a_pickers_own_counters(capsys: pytest.CaptureFixture[str]) -> None:
    s = FakeStore({"/metrics": PICKER_PAGE})
    try:
        code, out, _ = _run(["--metrics", f"{s.url}/metrics", "--pool", "llm", "--csv"], capsys)
    finally:
        s.close()
    assert code == 0
    assert out.splitlines()[1:] == ["dept-a,basic,10,2,1000,0,250,1250,100.0,0.500"]


def test_a_pickers_metrics_behind_auth_need_the_token_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv = FakeStore({"/metrics": PICKER_PAGE}, token="s3cret")
    url = f"{srv.url}/metrics"
    try:
        code, _, err = _run(["--metrics", url], capsys)
        assert code == 2 and "HTTP 401" in err and "--bearer-token-file" in err
        wrong = tmp_path / "wrong"
        wrong.write_text("nope\n")
        code, _, err = _run(["--metrics", url, "--bearer-token-file", str(wrong)], capsys)
        assert code == 2 and "HTTP 403" in err and "refused" in err
        good = tmp_path / "token"
        good.write_text("s3cret\n")  # service-account token files end without one; either works
        code, out, _ = _run(["--metrics", url, "--bearer-token-file", str(good)], capsys)
        assert code == 0 and "dept-a" in out, out
        assert srv.auth_seen[-1] == "Bearer s3cret"
    finally:
        srv.close()


@pytest.mark.parametrize(("flag", "name", "content", "needle"), [
    ("--bearer-token-file", "missing", None, "--bearer-token-file"),
    ("--bearer-token-file", "empty", "\n", "the file is empty"),
    ("--ca-file", "missing-ca", None, "--ca-file"),
])
def test_bad_credential_files_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, name: str,
                                        content: str | None, needle: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code, _, err = _run(["--metrics", "http://127.0.0.1:9/metrics", flag, str(path)], capsys)
    assert code == 2 and needle in err and "Traceback" not in err
