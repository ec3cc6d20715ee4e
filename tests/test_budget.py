import asyncio
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from sidecar.budget import Budget
from sidecar.config import BudgetConfig
from sidecar.errors import BudgetExceeded


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def budget(
    daily: str | None = None, monthly: str | None = None, clock: Clock | None = None
) -> Budget:
    # Only given caps are passed: BudgetConfig(daily_usd=None) trips a config.py bug (reported).
    caps = {"daily_usd": daily, "monthly_usd": monthly}
    config = BudgetConfig(**{k: v for k, v in caps.items() if v is not None})
    return Budget(config, clock=clock or Clock(datetime(2025, 3, 4, 23, 59, 30, tzinfo=UTC)))


async def test_fifty_concurrent_reservations_never_pass_the_cap() -> None:
    cap = Decimal("1.00")
    b = budget(daily="1.00")
    rng = random.Random(7)
    admitted = 0
    refused = 0

    async def request(worst: Decimal) -> None:
        nonlocal admitted, refused
        try:
            reservation = b.reserve(worst)
        except BudgetExceeded:
            refused += 1
            return
        admitted += 1
        assert b.day_spent + b.reserved <= cap
        await asyncio.sleep(0)  # the upstream call: other requests run meanwhile
        await asyncio.sleep(0)
        actual = (worst * Decimal(rng.randint(0, 100)) / 100).quantize(Decimal("0.0001"))
        b.settle(reservation, actual)
        assert b.day_spent <= cap

    await asyncio.gather(*(request(Decimal("0.05")) for _ in range(50)))
    # Up to 20 worst cases fit at once; the others are refused while those are in flight.
    assert admitted == 20 and refused == 30
    assert b.reserved == 0
    assert b.day_spent <= cap


def test_settle_counts_actual_and_is_idempotent() -> None:
    b = budget(daily="1", monthly="10")
    r = b.reserve(Decimal("0.8"))
    b.settle(r, Decimal("0.3"))
    b.settle(r, Decimal("0.3"))
    assert (b.day_spent, b.month_spent, b.reserved) == (Decimal("0.3"), Decimal("0.3"), 0)
    b.reserve(Decimal("0.7"))
    with pytest.raises(BudgetExceeded):
        b.reserve(Decimal("0.0001"))


def test_refusal_names_cap_and_spend_with_retry_after_to_midnight() -> None:
    b = budget(daily="2")
    b.seed(Decimal("1.9"), Decimal("5"))
    with pytest.raises(BudgetExceeded) as caught:
        b.reserve(Decimal("0.2"))
    error = caught.value
    assert error.status == 429 and error.code == "budget_exceeded"
    assert "daily budget of $2" in error.message and "$1.9 spent" in error.message
    assert "budget.daily_usd" in error.message
    assert error.headers["Retry-After"] == "30"  # 23:59:30 -> midnight UTC


def test_monthly_cap_retry_after_runs_to_next_month() -> None:
    clock = Clock(datetime(2025, 12, 31, 12, 0, 0, tzinfo=UTC))
    b = budget(monthly="10", clock=clock)
    b.seed(Decimal(0), Decimal("10"))
    with pytest.raises(BudgetExceeded) as caught:
        b.reserve(Decimal("0.01"))
    assert "monthly budget of $10" in caught.value.message
    assert caught.value.headers["Retry-After"] == str(12 * 3600)


def test_retry_after_is_at_least_one_second() -> None:
    clock = Clock(datetime(2025, 3, 4, 23, 59, 59, 999000, tzinfo=UTC))
    b = budget(daily="0", clock=clock)
    with pytest.raises(BudgetExceeded) as caught:
        b.reserve(Decimal("0.01"))
    assert caught.value.headers["Retry-After"] == "1"


def test_day_rollover_resets_the_daily_spend_only() -> None:
    clock = Clock(datetime(2025, 3, 4, 23, 0, tzinfo=UTC))
    b = budget(daily="1", monthly="100", clock=clock)
    b.settle(b.reserve(Decimal("1")), Decimal("1"))
    with pytest.raises(BudgetExceeded):
        b.reserve(Decimal("0.5"))
    clock.now += timedelta(hours=2)
    b.reserve(Decimal("0.5"))
    assert (b.day_spent, b.month_spent) == (0, Decimal("1"))


def test_request_larger_than_the_cap_says_so() -> None:
    b = budget(daily="0.01")
    with pytest.raises(BudgetExceeded) as caught:
        b.reserve(Decimal("0.5"))
    assert "alone" in caught.value.message and "max_tokens" in caught.value.message


def test_no_caps_admits_everything() -> None:
    b = budget()
    for _ in range(3):
        b.settle(b.reserve(Decimal("1000")), Decimal("1000"))
    assert b.day_spent == Decimal("3000")


def test_charge_counts_unreserved_spend_and_configure_changes_caps():
    budget = Budget(
        BudgetConfig(daily_usd=Decimal("1")), clock=lambda: datetime(2026, 1, 2, tzinfo=UTC)
    )
    budget.charge(Decimal("0.75"))
    assert budget.day_spent == Decimal("0.75")
    with pytest.raises(BudgetExceeded):
        budget.reserve(Decimal("0.5"))
    budget.configure(BudgetConfig(daily_usd=Decimal("2")))
    budget.settle(budget.reserve(Decimal("0.5")), Decimal("0.5"))
    assert budget.day_spent == Decimal("1.25")
