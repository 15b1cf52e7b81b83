"""Who used what: requests, rejections, prompt / cached / completion tokens and queueing time
per tenant and tier over a month, a week or a day, as a table or CSV.

From a Prometheus-compatible query API (``--prometheus URL``: any period, all replicas), or
from one picker's /metrics (``--metrics URL``: counters since that picker started).
Tenants beyond the picker's ``--usage-max-tenants`` appear as "other".
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

from epp.usage.series import TenantUsage
from epp.usage.sources import Access, UsageSourceError, query_prometheus, read_picker_metrics

COLUMNS = ("tenant", "tier", "requests", "rejected", "prompt_tokens", "cached_tokens", "completion_tokens",
           "tokens", "token_share_pct", "mean_queue_s")


def period_bounds(period: str, at: date, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The calendar month, ISO week (Monday first) or day containing ``at``, in UTC; a period
    that has not ended yet ends now."""
    now = now or datetime.now(UTC)
    if period == "month":
        start_d = at.replace(day=1)
        end_d = (start_d + timedelta(days=32)).replace(day=1)
    elif period == "week":
        start_d = at - timedelta(days=at.weekday())
        end_d = start_d + timedelta(days=7)
    elif period == "day":
        start_d, end_d = at, at + timedelta(days=1)
    else:
        raise ValueError(f"unknown period {period!r}: month, week or day")
    start = datetime(start_d.year, start_d.month, start_d.day, tzinfo=UTC)
    end = datetime(end_d.year, end_d.month, end_d.day, tzinfo=UTC)
    if start >= now:
        raise ValueError(f"the {period} containing {at.isoformat()} has not started yet")
    return start, min(end, now)


def table_rows(rows: Iterable[TenantUsage]) -> list[list[str]]:
    """Rows sorted by tokens (largest first), with each tenant's share of all tokens."""
    ordered = sorted(rows, key=lambda r: (-r.tokens, r.tenant, r.tier))
    total = sum(r.tokens for r in ordered) or 1.0
    out = []
    for r in ordered:
        out.append([
            r.tenant, r.tier, f"{r.requests:.0f}", f"{r.rejected:.0f}", f"{r.prompt_tokens:.0f}",
            f"{r.cached_tokens:.0f}", f"{r.completion_tokens:.0f}", f"{r.tokens:.0f}",
            f"{100.0 * r.tokens / total:.1f}", f"{r.mean_queue_seconds:.3f}",
        ])
    return out


def render_table(rows: list[list[str]], title: str) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    lines = [title, "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(COLUMNS, widths,
                                                                                                  strict=True)))]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths,
                                                                                                   strict=True))))
    if not rows:
        lines.append("(no usage recorded in this period)")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prometheus", metavar="URL",
                     help="base URL of a Prometheus-compatible query API (Prometheus, Thanos, Mimir, ...)")
    src.add_argument("--metrics", metavar="URL", help="a picker's /metrics URL (counters since it started)")
    p.add_argument("--period", choices=("month", "week", "day"), default="month",
                   help="calendar period (UTC) to report, with --prometheus")
    p.add_argument("--at", metavar="YYYY-MM-DD", type=date.fromisoformat, default=None,
                   help="a day inside the period (default: today, i.e. the period so far)")
    p.add_argument("--pool", metavar="NAME", default=None, help="only this InferencePool (inference_pool label)")
    p.add_argument("--csv", action="store_true", help="CSV instead of a table")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    p.add_argument("--bearer-token-file", metavar="PATH", default=None,
                   help="send this file's token as 'Authorization: Bearer' (a picker started with "
                        "--metrics-endpoint-auth, a Prometheus behind an auth proxy); in a pod: "
                        "/var/run/secrets/kubernetes.io/serviceaccount/token")
    p.add_argument("--ca-file", metavar="PATH", default=None, help="CA bundle to verify an https source")
    p.add_argument("--insecure-skip-tls-verify", action="store_true",
                   help="do not verify an https source's certificate")


def run(args: argparse.Namespace) -> int:
    try:
        access = Access.from_files(args.timeout, args.bearer_token_file, args.ca_file, args.insecure_skip_tls_verify)
        if args.prometheus:
            start, end = period_bounds(args.period, args.at or datetime.now(UTC).date())
            rows = query_prometheus(args.prometheus, start, end, args.pool, access)
            title = f"usage {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC ({args.period})"
        else:
            rows = read_picker_metrics(args.metrics, args.pool, access)
            title = f"usage since the picker at {args.metrics} started"
    except (UsageSourceError, ValueError) as exc:
        print(f"epp usage: {exc}", file=sys.stderr)
        return 2
    if args.pool:
        title += f", pool {args.pool}"
    body = table_rows(rows.values())
    if args.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows(body)
    else:
        sys.stdout.write(render_table(body, title))
    return 0
