"""The floor for `usage`: read a ledger, parse each line, sum tokens and Decimal cost per model.

python bench/usage_floor.py FILE...   (rotated files first, then the live file)
"""

from __future__ import annotations

import sys
from collections import defaultdict
from decimal import Decimal

import orjson


def totals(paths: list[str]) -> dict[str, list[Decimal]]:
    sums: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0)] * 4)
    for path in paths:
        with open(path, "rb") as ledger:
            for line in ledger:
                record = orjson.loads(line)
                row, usage = sums[record["model"]], record["usage"]
                row[0] += 1
                row[1] += usage["input_tokens"]
                row[2] += usage["output_tokens"]
                row[3] += Decimal(record["total_usd"])
    return sums


def main() -> None:
    result = {model: [str(v) for v in row] for model, row in totals(sys.argv[1:]).items()}
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
