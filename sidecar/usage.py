"""Reading the ledger: ``usage`` sums, ``ledger verify`` and the budget's starting spend.

Built to read a million lines in a few seconds: lines are summed by ``ledger_scan``, large
ledgers are split at line boundaries and summed in worker processes.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any, TextIO

import orjson

from sidecar import ledger_summary
from sidecar.ledger import GENESIS, format_ts, line_hash, rotated_numbers, rotated_path
from sidecar.ledger_scan import (
    GROUP_FIELDS,
    NO_UPPER_BOUND,
    SUM_CONTEXT,
    TOTAL_FIELDS,
    GroupKey,
    LedgerFormatError,
    Segment,
    Summer,
    Totals,
)
from sidecar.ledger_summary import Summary

FORMATS = ("table", "json", "csv")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_ZERO = Decimal(0)
PARALLEL_MIN_BYTES = 50_000_000


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


def _line_start(path: Path, offset: int) -> int:
    """The start of the first line that begins at or after ``offset``."""
    if offset <= 0:
        return 0
    with path.open("rb") as f:
        f.seek(offset - 1)
        skipped = 0
        while block := f.read(1 << 16):
            newline = block.find(b"\n")
            if newline >= 0:
                return offset + skipped + newline
            skipped += len(block)
    return offset + skipped - 1


def split_segments(files: Sequence[Path], parts: int) -> list[list[Segment]]:
    """Cut the files into ``parts`` runs of about equal bytes, each cut at a line boundary."""
    sizes = [file.stat().st_size for file in files]
    total = sum(sizes)
    cuts: list[tuple[int, int]] = []  # (file index, offset) of each inner cut
    for n in range(1, parts):
        at, index = total * n // parts, 0
        while index < len(sizes) - 1 and at >= sizes[index]:
            at -= sizes[index]
            index += 1
        cuts.append((index, _line_start(files[index], at)))
    bounds = [(0, 0), *cuts, (len(files) - 1, sizes[-1] if sizes else 0)]
    plan: list[list[Segment]] = []
    for (i, start), (j, stop) in zip(bounds, bounds[1:], strict=False):
        segments = [
            (files[k], start if k == i else 0, stop if k == j else sizes[k])
            for k in range(i, j + 1)
        ]
        plan.append([s for s in segments if s[2] > s[1]])
    return plan


def _scan(
    segments: list[Segment], since: str, until: str, by: tuple[str, ...], span: bool
) -> tuple[dict[GroupKey, Totals], bool]:
    summer = Summer(since, until, by, span=span)
    with localcontext(SUM_CONTEXT):
        for segment in segments:
            summer.add_segment(segment)
    return summer.groups, summer.day_aligned


def _summarize(file: Path) -> Summary:
    """A rotated file's summary, stored beside it if the folder allows (it is only a cache)."""
    summary = ledger_summary.compute(file)
    with suppress(OSError, ledger_summary.SummaryUnstorable):
        ledger_summary.store(file, summary)
    return summary


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_Scanned = tuple[dict[GroupKey, Totals], bool]


def _run(
    workers: int,
    parallel_min_bytes: int,
    to_summarize: list[Path],
    to_scan: list[Path],
    query: tuple[str, str, tuple[str, ...], bool],
) -> tuple[list[Summary], list[_Scanned]]:
    """Summarize and scan these files, in ``workers`` processes when they are large."""
    size = sum(file.stat().st_size for file in [*to_summarize, *to_scan])
    if workers > 1 and size >= parallel_min_bytes and size > 0:
        plan = split_segments(to_scan, workers) if to_scan else []
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            summaries = [pool.apply_async(_summarize, (file,)) for file in to_summarize]
            scans = [pool.apply_async(_scan, (part, *query)) for part in plan]
            return [r.get() for r in summaries], [r.get() for r in scans]
    segments = [(file, 0, file.stat().st_size) for file in to_scan]
    return [_summarize(file) for file in to_summarize], [_scan(segments, *query)]


@dataclass(slots=True)
class Sums:
    """Groups by ``by``; ``day_aligned``: every ts counted was (see ``Summer``). The files read
    line by line for the query are ``scanned``, those summarized on the way ``summarized``; the
    rest came from their summaries alone."""

    by: tuple[str, ...]
    groups: dict[GroupKey, Totals] = field(default_factory=dict)
    day_aligned: bool = True
    scanned: list[Path] = field(default_factory=list)
    summarized: list[Path] = field(default_factory=list)

    def add(self, groups: dict[GroupKey, Totals], *, by_all_fields: bool = False) -> None:
        columns = [GROUP_FIELDS.index(f) for f in self.by]
        with localcontext(SUM_CONTEXT):
            for key, totals in groups.items():
                own = tuple(key[i] for i in columns) if by_all_fields else key
                target = self.groups.get(own)
                if target is None:
                    target = self.groups[own] = Totals()
                target.merge(totals)

    def add_summary(self, summary: Summary, since: str, until: str) -> bool:
        """Add what a scan of the summarized file would; False if only a scan can tell."""
        chosen = summary.select(since, until)
        if chosen is None:
            return False
        if chosen:
            self.add(chosen, by_all_fields=True)
            self.day_aligned = self.day_aligned and summary.day_aligned
        return True

    def overall(self) -> Totals:
        overall = Totals()
        with localcontext(SUM_CONTEXT):
            for totals in self.groups.values():
                overall.merge(totals)
        return overall


def _sum_files(
    rotated: list[Path],
    live: list[Path],
    *,
    since: str = "",
    until: str = NO_UPPER_BOUND,
    by: tuple[str, ...] = (),
    workers: int = 1,
    parallel_min_bytes: int = PARALLEL_MIN_BYTES,
    span: bool = False,
) -> Sums:
    """Rotated files from their summaries where those answer (writing missing ones), the rest
    (the live file, a file a bound cuts inside a day) scanned."""
    sums = Sums(by)
    missing: list[Path] = []
    to_scan = list(live)
    for file in rotated:
        summary = ledger_summary.load(file)
        if summary is None:
            missing.append(file)
        elif not sums.add_summary(summary, since, until):
            to_scan.append(file)
    query = (since, until, by, span)
    summaries, scanned = _run(workers, parallel_min_bytes, missing, to_scan, query)
    pairs = zip(missing, summaries, strict=True)
    cut = [file for file, summary in pairs if not sums.add_summary(summary, since, until)]
    if cut:
        scanned += _run(workers, parallel_min_bytes, [], cut, query)[1]
    sums.scanned, sums.summarized = to_scan + cut, missing
    for groups, aligned in scanned:
        sums.add(groups)
        sums.day_aligned = sums.day_aligned and aligned
    return sums


def ledger_sums(
    path: Path,
    *,
    since: str = "",
    until: str = NO_UPPER_BOUND,
    by: tuple[str, ...] = (),
    workers: int | None = None,
    parallel_min_bytes: int = PARALLEL_MIN_BYTES,
) -> Sums:
    """``summarize`` over the ledger files: rotated files from their summaries when those can
    answer, the rest read, in ``workers`` processes when that is large.

    ``workers`` defaults to the CPUs this process may use; under ``parallel_min_bytes`` to read,
    everything happens in this process.
    """
    files = ledger_files(path)
    return _sum_files(
        [file for file in files if file != path],
        [file for file in files if file == path],
        since=since,
        until=until,
        by=by,
        workers=workers if workers is not None else _usable_cpus(),
        parallel_min_bytes=parallel_min_bytes,
    )


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
    until: str = NO_UPPER_BOUND,
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
    """Billed ``total_usd`` since the starts of the UTC day and month, to seed the Budget.

    In this process (the daemon calls it from a thread: no worker processes)."""
    day_lo, month_lo = format_ts(day_start), format_ts(month_start)
    cutoff = month_start.timestamp()
    files = ledger_files(path)
    # A rotated file closed before this month began has nothing in it that counts.
    rotated = [file for file in files if file != path and file.stat().st_mtime >= cutoff]
    live = [file for file in files if file == path]
    sums = _sum_files(rotated, live, since=month_lo, by=("day",), span=True)
    month = sums.overall().total_usd
    if not sums.day_aligned:  # some ts sorts before its day's midnight: count by ts after all
        return _sum_files(rotated, live, since=day_lo).overall().total_usd, month
    with localcontext(SUM_CONTEXT):
        day = sum(
            (t.total_usd for (d,), t in sums.groups.items() if d is not None and d >= day_lo[:10]),
            _ZERO,
        )
    return day, month


# -- output --------------------------------------------------------------------------------


def _sorted(groups: dict[GroupKey, Totals]) -> list[tuple[GroupKey, Totals]]:
    return sorted(groups.items(), key=lambda item: tuple(v or "" for v in item[0]))


def json_document(
    groups: dict[GroupKey, Totals], overall: Totals, by: tuple[str, ...]
) -> dict[str, Any]:
    """SPEC's ``usage --format json`` document: ``{"groups": [...], "totals": {...}}``."""
    return {
        "groups": [
            {"key": dict(zip(by, key, strict=True)), **totals.as_dict()}
            for key, totals in _sorted(groups)
        ]
        if by
        else [],
        "totals": overall.as_dict(),
    }


def _write_json(
    groups: dict[GroupKey, Totals], overall: Totals, by: tuple[str, ...], out: TextIO
) -> None:
    document = json_document(groups, overall, by)
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
    workers: int | None = None,
    parallel_min_bytes: int = PARALLEL_MIN_BYTES,
) -> int:
    """``tokenhub-sidecar usage``: 0, or one line on ``err`` and 2 for a user error."""
    try:
        if fmt not in FORMATS:
            raise UsageError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
        fields = _group_fields(by)
        lo = _bound(since, "--since", upper=False) if since else ""
        hi = _bound(until, "--until", upper=True) if until else NO_UPPER_BOUND
        if not ledger_files(ledger):
            raise UsageError(f"no ledger at {ledger} (check --ledger or ledger.path)")
        sums = ledger_sums(
            ledger,
            since=lo,
            until=hi,
            by=fields,
            workers=workers,
            parallel_min_bytes=parallel_min_bytes,
        )
    except UsageError as exc:
        print(f"usage: {exc}", file=err or sys.stderr)
        return 2
    except OSError as exc:
        print(f"usage: cannot read {ledger}: {exc.strerror or exc}", file=err or sys.stderr)
        return 2
    except LedgerFormatError as exc:
        print(f"usage: {exc}", file=err or sys.stderr)
        return 1
    _WRITERS[fmt](sums.groups, sums.overall(), fields, out)
    return 0
