"""Summaries of rotated ledger files, so that ``usage`` need not read them again.

A rotated file never changes, so its sums per (day, model, provider, outcome), its least and
greatest ``ts`` and its size are kept beside it in ``<file>.summary``. A summary is a cache: it
is used only while it still describes its file (same format, size, mtime, ctime and last line,
the chain head ``verify`` relies on), and a checksum over its own text catches a damaged or
hand-edited one. Someone who rewrites a summary and its checksum on purpose is not caught here;
``ledger verify`` reads every line and remains the integrity check.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any, Final

import orjson

from sidecar.ledger_scan import (
    GROUP_FIELDS,
    MIDNIGHT,
    NO_UPPER_BOUND,
    SUM_CONTEXT,
    TOTAL_FIELDS,
    GroupKey,
    Summer,
    Totals,
)

SUMMARY_VERSION: Final = 1
SUFFIX: Final = ".summary"
# One regex call holds the GIL for its whole chunk: ~4 ms for 256 KiB here (1 MiB: ~15 ms), for
# ~3% more CPU. (The daemon summarizes in a child process, ``main``; ``usage`` in threads.)
CHUNK_BYTES: Final = 1 << 18
_TAIL_BYTES = 1 << 16
_MONEY = frozenset(name for name in TOTAL_FIELDS if name.endswith("_usd"))


class SummaryUnstorable(ValueError):
    """The sums hold a value a summary cannot write back exactly (a hand-edited float count)."""


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What must still hold for a summary to describe its file."""

    size: int
    mtime_ns: int
    ctime_ns: int
    last_line_sha256: str


@dataclass(frozen=True, slots=True)
class Summary:
    stamp: FileStamp
    groups: dict[GroupKey, Totals]  # keyed by GROUP_FIELDS
    min_ts: str | None  # None: no line with a ts
    max_ts: str | None
    day_aligned: bool  # see ``Summer``

    def select(self, since: str, until: str) -> dict[GroupKey, Totals] | None:
        """The groups a scan with ``since <= ts < until`` would count, or None: scan the file.

        A bound that the file's ts all lie on one side of filters nothing; any other bound must
        be a midnight, and every ts day-aligned, so that whole days are chosen.
        """
        if self.min_ts is None or self.max_ts is None:
            return {}
        if self.max_ts < since or self.min_ts >= until:
            return {}
        low = "" if since <= self.min_ts else since
        high = NO_UPPER_BOUND if self.max_ts < until else until
        if not low and high == NO_UPPER_BOUND:
            return self.groups
        if self.day_aligned and _at_midnight(low) and _at_midnight(high):
            low, high = low[:10], high[:10]
            return {k: t for k, t in self.groups.items() if k[0] is not None and low <= k[0] < high}
        return None


def _at_midnight(bound: str) -> bool:
    return bound in ("", NO_UPPER_BOUND) or (len(bound) == 24 and bound.endswith(MIDNIGHT))


def summary_path(file: Path) -> Path:
    return file.with_name(file.name + SUFFIX)


def _last_line(fd: int, size: int) -> bytes:
    """The bytes after the newline that ends the last-but-one line (all of a one-line file)."""
    window = _TAIL_BYTES
    while True:
        base = max(0, size - window)
        data = os.pread(fd, size - base, base)
        cut = data.rfind(b"\n", 0, len(data) - 1)
        if cut >= 0 or base == 0:
            return data[cut + 1 :]
        window *= 2


def _stamp(fd: int, stat: os.stat_result) -> FileStamp:
    last = hashlib.sha256(_last_line(fd, stat.st_size)).hexdigest()
    return FileStamp(stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, last)


def file_stamp(file: Path) -> FileStamp:
    with file.open("rb") as f:
        return _stamp(f.fileno(), os.fstat(f.fileno()))


def compute(file: Path, chunk_bytes: int = CHUNK_BYTES) -> Summary:
    """Read the whole file once and sum it per GROUP_FIELDS, as ``usage`` would."""
    summer = Summer("", NO_UPPER_BOUND, GROUP_FIELDS, span=True)
    with file.open("rb") as f:
        stat = os.fstat(f.fileno())
        with localcontext(SUM_CONTEXT):
            summer.add_file(f.fileno(), 0, stat.st_size, chunk_bytes)
        stamp = _stamp(f.fileno(), stat)
    return Summary(stamp, summer.groups, summer.min_ts, summer.max_ts, summer.day_aligned)


# -- the file ------------------------------------------------------------------------------


def _row(key: GroupKey, totals: Totals) -> list[Any]:
    values: list[str] = []
    for name in TOTAL_FIELDS:
        value = getattr(totals, name)
        if type(value) is not (Decimal if name in _MONEY else int):
            raise SummaryUnstorable(f"{name} is a {type(value).__name__}")
        values.append(str(value))  # exact: str(Decimal) and Decimal(str) round-trip
    return [*key, *values]


def _totals(values: list[Any]) -> Totals:
    totals = Totals()
    for name, text in zip(TOTAL_FIELDS, values, strict=True):
        if not isinstance(text, str):
            raise ValueError(f"{name} is not a string")
        setattr(totals, name, Decimal(text) if name in _MONEY else int(text))
    return totals


def _checksum(document: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


def encode(summary: Summary) -> bytes:
    stamp = summary.stamp
    document: dict[str, Any] = {
        "v": SUMMARY_VERSION,
        "size": stamp.size,
        "mtime_ns": stamp.mtime_ns,
        "ctime_ns": stamp.ctime_ns,
        "last_line_sha256": stamp.last_line_sha256,
        "min_ts": summary.min_ts,
        "max_ts": summary.max_ts,
        "day_aligned": summary.day_aligned,
        "fields": GROUP_FIELDS,
        "totals": TOTAL_FIELDS,
        "groups": [_row(key, totals) for key, totals in summary.groups.items()],
    }
    document["sha256"] = _checksum(document)
    return orjson.dumps(document) + b"\n"


def decode(data: bytes) -> Summary | None:
    """The summary in ``data``, or None when it is not one this version wrote intact."""
    try:
        document = orjson.loads(data)
        if not isinstance(document, dict) or document.get("v") != SUMMARY_VERSION:
            return None
        if document.pop("sha256", None) != _checksum(document):
            return None
        if document["fields"] != list(GROUP_FIELDS) or document["totals"] != list(TOTAL_FIELDS):
            return None
        width = len(GROUP_FIELDS)
        groups = {tuple(row[:width]): _totals(row[width:]) for row in document["groups"]}
        stamp = FileStamp(
            int(document["size"]),
            int(document["mtime_ns"]),
            int(document["ctime_ns"]),
            str(document["last_line_sha256"]),
        )
        low, high, aligned = document["min_ts"], document["max_ts"], document["day_aligned"]
        if not all(isinstance(v, str | None) for v in (low, high)) or type(aligned) is not bool:
            return None
        return Summary(stamp, groups, low, high, aligned)
    except (orjson.JSONDecodeError, ArithmeticError, KeyError, TypeError, ValueError):
        return None


def load(file: Path) -> Summary | None:
    """``file``'s summary if there is one and it still describes the file, else None.

    An OSError reading the ledger file itself propagates, as it would for a scan."""
    try:
        data = summary_path(file).read_bytes()
    except OSError:
        return None
    summary = decode(data)
    if summary is None or summary.stamp != file_stamp(file):
        return None
    return summary


def store(file: Path, summary: Summary) -> bool:
    """Write the summary beside ``file`` atomically (0600, fsynced, renamed into place).

    False, and nothing written, when the file no longer matches what was summed; OSError or
    SummaryUnstorable when it cannot be written."""
    data = encode(summary)
    if file_stamp(file) != summary.stamp:
        return False
    target = summary_path(file)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return True


def write_summary(file: Path) -> Summary:
    """Summarize a rotated file and store the summary beside it (what rotation runs)."""
    summary = compute(file)
    store(file, summary)
    return summary


def write_summary_unless_usable(file: Path) -> None:
    """Summarize ``file`` unless its summary still holds (what the back-fill at open runs)."""
    if load(file) is None:
        write_summary(file)


# The least CPU weight a process can ask for: the summary runs when the daemon leaves the CPU.
_LOWEST_PRIORITY = 19


def main(argv: list[str] | None = None) -> int:
    """``python -m sidecar.ledger_summary [--unless-usable] FILE``: what the daemon's ledger runs
    after a rotation and at open, in a child process. In a thread of the daemon, a 100 MiB
    file's 0.5 s of Python held the GIL the event loop needed, in turns of the 5 ms switch
    interval: a 1 ms timer ran 5 ms late at the median, 16 ms at worst. The child also asks for
    the lowest CPU priority (a systemd unit that filters ``@resources`` refuses that: it then
    runs at the daemon's own)."""
    args = sys.argv[1:] if argv is None else argv
    unless_usable = args[:1] == ["--unless-usable"]
    files = args[1:] if unless_usable else args
    if len(files) != 1:
        print("usage: python -m sidecar.ledger_summary [--unless-usable] FILE", file=sys.stderr)
        return 2
    try:
        os.nice(_LOWEST_PRIORITY)
    except OSError:
        pass
    file = Path(files[0])
    try:
        if unless_usable:
            write_summary_unless_usable(file)
        else:
            write_summary(file)
    except (OSError, ValueError) as exc:  # SummaryUnstorable is a ValueError
        print(f"{file}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
