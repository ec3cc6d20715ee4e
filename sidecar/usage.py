"""Reading the ledger: ``usage`` sums, ``ledger verify`` and the budget's starting spend.

Built to read a million lines in a few seconds. Lines in the layout our writer emits (fixed key
order, no spaces) are matched by one regular expression over a whole chunk of the file at a time
(``findall`` does the per-line work in C) and summed column-wise; any other line, e.g. one edited by
hand, is parsed with orjson and summed the same way. Large ledgers are split at line boundaries and
summed in worker processes. ``ts`` is compared as a string (its fixed format sorts like time).
"""

from __future__ import annotations

import csv
import mmap
import multiprocessing
import os
import re
import sys
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Context, Decimal, localcontext
from itertools import compress, filterfalse
from operator import and_, itemgetter, not_
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
# Sums are exact: ample precision for any ledger (the default context keeps only 28 digits).
_SUM_CONTEXT = Context(prec=200)
NO_UPPER_BOUND = "\uffff"
PARALLEL_MIN_BYTES = 50_000_000
_CHUNK_BYTES = 1 << 20  # decoded text and its rows stay in cache: ~13% less CPU than 4 MiB


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

    __slots__ = TOTAL_FIELDS

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

    def add_rows(self, rows: Sequence[tuple[str, ...]]) -> None:
        """Add fast-path rows (see ``_fast_line``): the same sums as ``add`` over the same lines.

        Column by column with C-level iterators: no Python code runs per row."""

        def column(index: int) -> Iterator[str]:
            return map(itemgetter(index), rows)

        flags = list(map(_TRUE.__eq__, column(_BILLABLE)))
        billable = sum(flags)
        self.requests += len(rows)
        self.failures += sum(map(FAILURE_OUTCOMES.__contains__, column(_OUTCOME)))
        self.saved_usd += _money(column(_SAVED))
        if billable < len(rows):
            self.unbilled_estimated_usd += _money(compress(column(_ESTIMATED), map(not_, flags)))
        if not billable:
            return
        self.billable_requests += billable
        self.input_tokens += sum(map(int, compress(column(_INPUT), flags)))
        self.output_tokens += sum(map(int, compress(column(_OUTPUT), flags)))
        self.cached_tokens += sum(map(int, compress(column(_CACHED), flags)))
        self.model_fee_usd += _money(compress(column(_MODEL_FEE), flags))
        self.service_fee_usd += _money(compress(column(_SERVICE_FEE), flags))
        self.total_usd += _money(compress(column(_TOTAL), flags))

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
Segment = tuple[Path, int, int]  # a file and a byte range [start, end) on line boundaries

# -- the fast path -------------------------------------------------------------------------
#
# One line as ``sidecar.ledger`` writes it for ``handlers.exchange.record`` (and the videos
# handler, same order): keys in that order, no spaces, every value checked against its JSON
# grammar, so a line that matches is valid JSON and the captured texts are exactly what
# ``orjson.loads`` would give. Strings are ``"[^"]*"``: a chunk containing a backslash uses the
# escape-aware variant instead, and the captured fields never contain escapes (a line whose
# model, say, has one simply takes the slow path). Numbers are restricted to plain forms that
# orjson reads the same way. Any other line matches the last alternative, ``(.*\n)``, and is
# parsed with orjson. Known gap: a raw control character inside a string makes a line invalid
# JSON (orjson skips it) yet it matches here; ``ledger verify`` reports such a line.


def _fast_line(string: str, char: str, captured: frozenset[str]) -> str:
    """The regular expression for one line; ``string`` matches any JSON string, ``char`` one
    character of a string without escapes, and only the ``captured`` optional fields (ts, day,
    model, provider) are groups. Each value has the type our writer gives it; a line with
    another (say a hand-edited ``null``) is simply not a fast line."""

    def group(name: str, body: str) -> str:
        return f"({body})" if name in captured else body

    number = "(?:0|[1-9][0-9]*)"
    money = r'"([0-9]+(?:\.[0-9]+)?)"'
    count = "(0|[1-9][0-9]*)"
    flag = "(?:true|false)"
    attempt = rf'\{{"provider":{string},"status":{number},"reason":{string},"ms":{number}\}}'
    ts = group("ts", group("day", f"{char}{{0,10}}") + f"{char}*")
    return (
        rf'\{{"v":{number},"ts":"{ts}","request_id":{string},'
        rf'"endpoint":{string},"requested":{string},'
        rf'"model":"{group("model", char + "*")}","provider":"{group("provider", char + "*")}",'
        rf'"upstream_model":{string},"region":{string},"stream":{flag},"status":{number},'
        rf'"outcome":"({char}*)","billable":(true|false),'
        rf'"attempts":\[(?:{attempt}(?:,{attempt})*)?\],'
        rf'"usage":\{{"input_tokens":{count},"output_tokens":{count},"cached_tokens":{count},'
        rf'"images":{number},"seconds":(?:{number}|{string})\}},"usage_source":{string},'
        rf'"model_fee_usd":{money},"service_fee_usd":{money},"total_usd":{money},'
        rf'"saved_usd":{money},"latency_ms":{number}(?:,"estimated_usd":{money})?,'
        rf'"prev":{string}\}}\n'
    )


_PLAIN_STRING = r'"[^"]*"'
_ESCAPED_STRING = r'"[^"\\]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\]*)*"'
_PLAIN_CHAR = r'[^"]'
_ESCAPED_CHAR = r'[^"\\]'
_OPTIONAL = ("ts", "day", "model", "provider")  # captured only when needed, in this order


def _lines_pattern(escaped: bool, captured: frozenset[str]) -> re.Pattern[str]:
    """Whole lines: the fast line's groups, then ``(.*\n)`` (any other line) as the last one."""
    string, char = (_ESCAPED_STRING, _ESCAPED_CHAR) if escaped else (_PLAIN_STRING, _PLAIN_CHAR)
    return re.compile(f"^(?:{_fast_line(string, char, captured)}|(.*\n))", re.MULTILINE)


# Columns of a fast row, counted from its end (the optional ones come first).
_OUTCOME, _BILLABLE, _INPUT, _OUTPUT, _CACHED = -11, -10, -9, -8, -7
_MODEL_FEE, _SERVICE_FEE, _TOTAL, _SAVED, _ESTIMATED, _SLOW = -6, -5, -4, -3, -2, -1
_TRUE = "true"
_NEWLINE = ord("\n")
_NOTHING = frozenset({"", "0"})


def is_fast_line(line: str) -> bool:
    """Whether one line (with its newline) is summed by the fast path rather than by orjson."""
    match = _lines_pattern("\\" in line, frozenset()).match(line)
    return match is not None and match.group(match.re.groups) is None


def _money(values: Iterable[str]) -> Decimal:
    return sum(map(Decimal, filterfalse(_NOTHING.__contains__, values)), _ZERO)


class _Summer:
    """Sums lines into groups; the fast path and the orjson path give identical totals."""

    def __init__(self, since: str, until: str, by: tuple[str, ...]) -> None:
        self.since, self.until, self.by = since, until, by
        self.groups: dict[GroupKey, Totals] = {}
        captured = {"ts"} if since or until != NO_UPPER_BOUND else set()
        captured.update(by)
        names = [name for name in _OPTIONAL if name in captured]
        self._patterns = (
            _lines_pattern(False, frozenset(names)),
            _lines_pattern(True, frozenset(names)),
        )
        self._ts = names.index("ts") if "ts" in names else 0
        columns = [_OUTCOME if f == "outcome" else names.index(f) for f in by]
        self._key = itemgetter(*columns) if columns else None
        self._single = len(columns) == 1

    def _totals(self, key: GroupKey) -> Totals:
        totals = self.groups.get(key)
        if totals is None:
            totals = self.groups[key] = Totals()
        return totals

    def add_record(self, record: dict[str, Any]) -> None:
        ts = record.get("ts")
        if not isinstance(ts, str) or ts < self.since or ts >= self.until:
            return
        self._totals(tuple(ts[:10] if f == "day" else record.get(f) for f in self.by)).add(record)

    def add_line(self, line: bytes | str) -> None:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        if isinstance(record, dict):
            self.add_record(record)

    def add_text(self, text: str) -> None:
        """Whole lines (each ending in a newline) of valid UTF-8."""
        pattern = self._patterns["\\" in text]
        rows: list[tuple[str, ...]] = pattern.findall(text)
        if any(map(itemgetter(_SLOW), rows)):
            for row in rows:
                if row[_SLOW]:
                    self.add_line(row[_SLOW])
            rows = [row for row in rows if not row[_SLOW]]
        if self.since or self.until != NO_UPPER_BOUND:
            stamps = list(map(itemgetter(self._ts), rows))
            inside = map(and_, map(self.since.__le__, stamps), map(self.until.__gt__, stamps))
            rows = list(compress(rows, inside))
        if not rows:
            return
        if not self.by:
            self._totals(()).add_rows(rows)
            return
        for key, part in self._split(rows).items():
            self._totals(key).add_rows(part)

    def _split(self, rows: list[tuple[str, ...]]) -> dict[GroupKey, list[tuple[str, ...]]]:
        key = self._key
        assert key is not None
        parts: defaultdict[Any, list[tuple[str, ...]]] = defaultdict(list)
        # parts[key(row)].append(row) for each row, run by C-level iterators.
        deque(map(list.append, map(parts.__getitem__, map(key, rows)), rows), maxlen=0)
        return {(k,): v for k, v in parts.items()} if self._single else parts

    def add_segment(self, segment: Segment) -> None:
        path, start, end = segment
        if end <= start:
            return
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            end = min(end, len(mm))
            with memoryview(mm) as view:
                pos = start
                while pos < end:
                    stop = _chunk_end(mm, pos, end)
                    self._add_bytes(view[pos:stop])
                    pos = stop

    def _add_bytes(self, data: memoryview) -> None:
        whole = len(data) if data[-1] == _NEWLINE else bytes(data).rfind(b"\n") + 1
        try:
            text = str(data[:whole], "utf-8")
        except UnicodeDecodeError:
            for line in bytes(data[:whole]).splitlines(keepends=True):
                self.add_line(line)
        else:
            self.add_text(text)
        if whole < len(data):
            self.add_line(bytes(data[whole:]))  # a last line without its newline


def _chunk_end(mm: mmap.mmap, pos: int, end: int) -> int:
    stop = pos + _CHUNK_BYTES
    if stop >= end:
        return end
    newline = mm.find(b"\n", stop, end)
    return end if newline < 0 else newline + 1


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


def _sum_segments(
    segments: list[Segment], since: str, until: str, by: tuple[str, ...]
) -> dict[GroupKey, Totals]:
    summer = _Summer(since, until, by)
    with localcontext(_SUM_CONTEXT):
        for segment in segments:
            summer.add_segment(segment)
    return summer.groups


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def sum_ledger(
    path: Path,
    *,
    since: str = "",
    until: str = NO_UPPER_BOUND,
    by: tuple[str, ...] = (),
    workers: int | None = None,
    parallel_min_bytes: int = PARALLEL_MIN_BYTES,
) -> tuple[dict[GroupKey, Totals], Totals]:
    """``summarize`` over the ledger files, in ``workers`` processes when they are large.

    ``workers`` defaults to the CPUs this process may use; a ledger under
    ``parallel_min_bytes`` is summed in this process.
    """
    files = ledger_files(path)
    segments = [(file, 0, file.stat().st_size) for file in files]
    size = sum(s[2] for s in segments)
    count = workers if workers is not None else _usable_cpus()
    if count > 1 and size >= parallel_min_bytes and size > 0:
        plan = split_segments(files, count)
        with multiprocessing.get_context("fork").Pool(len(plan)) as pool:
            results = pool.starmap(_sum_segments, [(p, since, until, by) for p in plan])
    else:
        results = [_sum_segments(segments, since, until, by)]
    groups: dict[GroupKey, Totals] = {}
    with localcontext(_SUM_CONTEXT):
        for result in results:
            for key, totals in result.items():
                if key in groups:
                    groups[key].merge(totals)
                else:
                    groups[key] = totals
        overall = Totals()
        for totals in groups.values():
            overall.merge(totals)
    return groups, overall


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
        groups, overall = sum_ledger(
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
    _WRITERS[fmt](groups, overall, fields, out)
    return 0
