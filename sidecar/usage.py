"""Reading the ledger: ``usage`` sums, ``ledger verify`` and the budget's starting spend.

Built to read a million lines in a few seconds: one orjson parse per line, ``ts`` compared as a
string (its fixed format sorts like time), Decimal sums, no models per line.
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import orjson

from sidecar.billing import usd
from sidecar.ledger import GENESIS, format_ts, line_hash, rotated_numbers, rotated_path

GROUP_FIELDS = ("day", "model", "provider", "outcome")
FORMATS = ("table", "json", "csv")
# Outcomes where the request itself failed; a client cancelling is not a failure.
FAILURE_OUTCOMES = frozenset({"upstream_error", "upstream_failed", "stream_cut"})
TOTAL_FIELDS = (
    "requests",
    "billable_requests",
    "failures",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "model_fee_usd",
    "service_fee_usd",
    "total_usd",
    "saved_usd",
    "unbilled_estimated_usd",
)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_ZERO = Decimal(0)


class UsageError(Exception):
    """A user error in a ``usage`` or ``ledger verify`` invocation; ``str()`` is one line."""


def ledger_files(path: Path) -> list[Path]:
    """The rotated files ``<path>.000001`` ... oldest first, then the live file (if present)."""
    files = [rotated_path(path, n) for n in rotated_numbers(path)]
    return files + [path] if path.exists() else files


def _lines(path: Path) -> Iterator[bytes]:
    for file in ledger_files(path):
        with file.open("rb") as f:
            yield from f


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Each parseable record in file order; unparseable lines are skipped (verify finds them)."""
    loads = orjson.loads
    for line in _lines(path):
        try:
            record = loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


# -- verify --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    files: int
    lines: int
    bad_file: Path | None = None
    bad_line: int | None = None
    reason: str = ""


def _line_problem(line: bytes, expected_prev: str) -> str | None:
    if not line.endswith(b"\n"):
        return "the line is cut off (no newline at the end: a torn write)"
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "the line is not valid JSON"
    if not isinstance(record, dict):
        return "the line is not a JSON object"
    prev = record.get("prev")
    if prev != expected_prev:
        return (
            "prev does not match the SHA-256 of the line before it: a line was edited, "
            "removed or reordered"
        )
    return None


def verify(path: Path) -> VerifyResult:
    """Check every line parses and the chain is unbroken across the rotated and live files."""
    files = ledger_files(path)
    head = GENESIS
    total = 0
    for file in files:
        with file.open("rb") as f:
            for number, line in enumerate(f, start=1):
                problem = _line_problem(line, head)
                if problem is not None:
                    return VerifyResult(False, len(files), total, file, number, problem)
                head = line_hash(line)
                total += 1
    return VerifyResult(True, len(files), total)


def cmd_verify(ledger: Path, out: TextIO, err: TextIO | None = None) -> int:
    """``tokenhub-sidecar ledger verify``: 0 intact, 1 a bad line, 2 no ledger."""
    if not ledger_files(ledger):
        print(
            f"ledger verify: no ledger at {ledger} (check --ledger or ledger.path)",
            file=err or sys.stderr,
        )
        return 2
    try:
        result = verify(ledger)
    except OSError as exc:
        print(f"ledger verify: cannot read {ledger}: {exc.strerror or exc}", file=err or sys.stderr)
        return 2
    if result.ok:
        print(f"ok: {result.lines} lines in {result.files} file(s), hash chain intact", file=out)
        return 0
    print(f"{result.bad_file}:{result.bad_line}: {result.reason}", file=out)
    return 1


# -- sums ----------------------------------------------------------------------------------


class Totals:
    """Running sums for one group (or all lines)."""

    __slots__ = (
        "requests",
        "billable_requests",
        "failures",
        "input_tokens",
        "output_tokens",
        "cached_tokens",
        "model_fee_usd",
        "service_fee_usd",
        "total_usd",
        "saved_usd",
        "unbilled_estimated_usd",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.billable_requests = 0
        self.failures = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cached_tokens = 0
        self.model_fee_usd = _ZERO
        self.service_fee_usd = _ZERO
        self.total_usd = _ZERO
        self.saved_usd = _ZERO
        self.unbilled_estimated_usd = _ZERO

    def add(self, record: dict[str, Any]) -> None:
        self.requests += 1
        if record.get("outcome") in FAILURE_OUTCOMES:
            self.failures += 1
        saved = record.get("saved_usd")
        if saved and saved != "0":
            self.saved_usd += Decimal(saved)
        if not record.get("billable"):
            estimated = record.get("estimated_usd")
            if estimated:
                self.unbilled_estimated_usd += Decimal(estimated)
            return
        self.billable_requests += 1
        usage = record.get("usage") or {}
        self.input_tokens += usage.get("input_tokens", 0)
        self.output_tokens += usage.get("output_tokens", 0)
        self.cached_tokens += usage.get("cached_tokens", 0)
        self.model_fee_usd += Decimal(record.get("model_fee_usd") or 0)
        self.service_fee_usd += Decimal(record.get("service_fee_usd") or 0)
        self.total_usd += Decimal(record.get("total_usd") or 0)

    def merge(self, other: Totals) -> None:
        for name in TOTAL_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int | str]:
        return {
            name: usd(value) if isinstance(value, Decimal) else value
            for name in TOTAL_FIELDS
            for value in (getattr(self, name),)
        }


GroupKey = tuple[str | None, ...]


def _bound(text: str, option: str, *, upper: bool) -> str:
    """A ``--since``/``--until`` value as a ``ts`` string; ``upper`` bounds are exclusive."""
    try:
        if _DATE.fullmatch(text):
            day = date.fromisoformat(text) + timedelta(days=1 if upper else 0)
            return f"{day.isoformat()}T00:00:00.000Z"
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{option}: {text!r} is not a date (YYYY-MM-DD) or an ISO-8601 timestamp"
        ) from None
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    return format_ts(moment + timedelta(milliseconds=1) if upper else moment)


def _group_fields(by: Iterable[str]) -> tuple[str, ...]:
    fields = tuple(f.strip() for item in by for f in item.split(",") if f.strip())
    unknown = [f for f in fields if f not in GROUP_FIELDS]
    if unknown:
        raise UsageError(
            f"--by: unknown field {unknown[0]!r}; use any of {', '.join(GROUP_FIELDS)}"
        )
    return tuple(dict.fromkeys(fields))


def summarize(
    records: Iterable[dict[str, Any]],
    *,
    since: str = "",
    until: str = "\uffff",
    by: tuple[str, ...] = (),
) -> tuple[dict[GroupKey, Totals], Totals]:
    """Sum records with ``since <= ts < until`` per group of ``by`` fields, and over all."""
    groups: dict[GroupKey, Totals] = {}
    for record in records:
        ts = record.get("ts")
        if not isinstance(ts, str) or ts < since or ts >= until:
            continue
        key = tuple(ts[:10] if f == "day" else record.get(f) for f in by)
        totals = groups.get(key)
        if totals is None:
            totals = groups[key] = Totals()
        totals.add(record)
    overall = Totals()
    for totals in groups.values():
        overall.merge(totals)
    return groups, overall


def spent_since(path: Path, day_start: datetime, month_start: datetime) -> tuple[Decimal, Decimal]:
    """Billed ``total_usd`` since the starts of the UTC day and month, to seed the Budget."""
    day_lo, month_lo = format_ts(day_start), format_ts(month_start)
    cutoff = month_start.timestamp()
    day = month = _ZERO
    for file in ledger_files(path):
        if file != path and file.stat().st_mtime < cutoff:
            continue  # closed before this month began: nothing in it counts
        with file.open("rb") as f:
            for line in f:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                ts = record.get("ts") if isinstance(record, dict) else None
                if not isinstance(ts, str) or ts < month_lo or not record.get("billable"):
                    continue
                amount = Decimal(record.get("total_usd") or 0)
                month += amount
                if ts >= day_lo:
                    day += amount
    return day, month


# -- output --------------------------------------------------------------------------------


def _sorted(groups: dict[GroupKey, Totals]) -> list[tuple[GroupKey, Totals]]:
    return sorted(groups.items(), key=lambda item: tuple(v or "" for v in item[0]))


def _write_json(
    groups: dict[GroupKey, Totals], overall: Totals, by: tuple[str, ...], out: TextIO
) -> None:
    document = {
        "groups": [
            {"key": dict(zip(by, key, strict=True)), **totals.as_dict()}
            for key, totals in _sorted(groups)
        ]
        if by
        else [],
        "totals": overall.as_dict(),
    }
    out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")


def _write_csv(
    groups: dict[GroupKey, Totals], overall: Totals, by: tuple[str, ...], out: TextIO
) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*by, *TOTAL_FIELDS])
    rows = _sorted(groups) if by else [((), overall)]
    for key, totals in rows:
        values = totals.as_dict()
        writer.writerow([*(v or "" for v in key), *(values[f] for f in TOTAL_FIELDS)])


_TABLE_HEADERS = {
    "requests": "requests",
    "billable_requests": "billable",
    "failures": "failures",
    "input_tokens": "input",
    "output_tokens": "output",
    "cached_tokens": "cached",
    "model_fee_usd": "model_fee",
    "service_fee_usd": "service_fee",
    "total_usd": "total",
    "saved_usd": "saved",
    "unbilled_estimated_usd": "unbilled_est",
}


def _write_table(
    groups: dict[GroupKey, Totals], overall: Totals, by: tuple[str, ...], out: TextIO
) -> None:
    header = [*by, *(_TABLE_HEADERS[f] for f in TOTAL_FIELDS)]
    rows = (
        [
            [*(v or "-" for v in key), *(str(v) for v in totals.as_dict().values())]
            for key, totals in _sorted(groups)
        ]
        if by
        else []
    )
    label = ["TOTAL", *([""] * (len(by) - 1))] if by else []
    rows.append([*label, *(str(v) for v in overall.as_dict().values())])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    keys = len(by)

    def render(row: list[str]) -> str:
        cells = [
            c.ljust(w) if i < keys else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    print(render(header), file=out)
    for row in rows:
        print(render(row), file=out)
    print("money in USD; token counts over billable requests", file=out)


_WRITERS = {"json": _write_json, "csv": _write_csv, "table": _write_table}


def cmd_usage(
    ledger: Path,
    *,
    since: str | None,
    until: str | None,
    by: list[str],
    fmt: str,
    out: TextIO,
    err: TextIO | None = None,
) -> int:
    """``tokenhub-sidecar usage``: 0, or one line on ``err`` and 2 for a user error."""
    try:
        if fmt not in FORMATS:
            raise UsageError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
        fields = _group_fields(by)
        lo = _bound(since, "--since", upper=False) if since else ""
        hi = _bound(until, "--until", upper=True) if until else "\uffff"
        if not ledger_files(ledger):
            raise UsageError(f"no ledger at {ledger} (check --ledger or ledger.path)")
        groups, overall = summarize(iter_records(ledger), since=lo, until=hi, by=fields)
    except UsageError as exc:
        print(f"usage: {exc}", file=err or sys.stderr)
        return 2
    except OSError as exc:
        print(f"usage: cannot read {ledger}: {exc.strerror or exc}", file=err or sys.stderr)
        return 2
    _WRITERS[fmt](groups, overall, fields, out)
    return 0
