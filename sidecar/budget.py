"""The optional ``[budget]`` caps on ``total_usd`` per UTC day and month.

A request reserves its worst case before it is sent and settles the actual cost afterwards.
Reservations count against the cap while outstanding, so any number of concurrent requests can
never together pass it. ``reserve`` and ``settle`` never await, so on one event loop they are
atomic. Reservations outstanding across midnight count against the new day: conservative.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sidecar.billing import usd
from sidecar.config import BudgetConfig
from sidecar.errors import BudgetExceeded


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Reservation:
    id: int
    amount: Decimal


@dataclass(frozen=True, slots=True)
class _Cap:
    name: str  # "daily" | "monthly"
    limit: Decimal
    spent: Decimal
    period_end: datetime


def day_start(moment: datetime) -> datetime:
    return datetime(moment.year, moment.month, moment.day, tzinfo=UTC)


def month_start(moment: datetime) -> datetime:
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def _next_month(moment: datetime) -> datetime:
    year, month = divmod(moment.year * 12 + moment.month, 12)
    return datetime(year, month + 1, 1, tzinfo=UTC)


class Budget:
    """Daily and monthly spending caps, enforced by reservation."""

    def __init__(self, config: BudgetConfig, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self._daily = config.daily_usd
        self._monthly = config.monthly_usd
        self._clock = clock
        self._ids = itertools.count(1)
        self._outstanding: dict[int, Decimal] = {}
        self._reserved = Decimal(0)
        self._day: date = self._now().date()
        self._month: tuple[int, int] = (self._day.year, self._day.month)
        self._day_spent = Decimal(0)
        self._month_spent = Decimal(0)

    @property
    def day_spent(self) -> Decimal:
        self._roll(self._now())
        return self._day_spent

    @property
    def month_spent(self) -> Decimal:
        self._roll(self._now())
        return self._month_spent

    @property
    def reserved(self) -> Decimal:
        return self._reserved

    def seed(self, day_spent: Decimal, month_spent: Decimal) -> None:
        """Start from what the ledger already holds for the current UTC day and month."""
        self._roll(self._now())
        self._day_spent = day_spent
        self._month_spent = month_spent

    def reserve(self, amount: Decimal) -> Reservation:
        """Hold ``amount`` against the caps, or raise BudgetExceeded naming the cap and spend."""
        now = self._now()
        self._roll(now)
        for cap in self._caps(now):
            if cap.spent + self._reserved + amount > cap.limit:
                raise self._exceeded(cap, amount, now)
        reservation = Reservation(next(self._ids), amount)
        self._outstanding[reservation.id] = amount
        self._reserved += amount
        return reservation

    def configure(self, config: BudgetConfig) -> None:
        """A reloaded config's caps apply from now on; spend so far is kept."""
        self._daily = config.daily_usd
        self._monthly = config.monthly_usd

    def charge(self, amount: Decimal) -> None:
        """Count spend that no reservation held (a video job billed by a later poll)."""
        self._roll(self._now())
        self._day_spent += amount
        self._month_spent += amount

    def settle(self, reservation: Reservation, actual: Decimal) -> None:
        """Release the hold and count ``actual`` (0 for unbilled outcomes); a repeat is a no-op."""
        held = self._outstanding.pop(reservation.id, None)
        if held is None:
            return
        self._reserved -= held
        self._roll(self._now())
        self._day_spent += actual
        self._month_spent += actual

    def _now(self) -> datetime:
        moment = self._clock()
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)

    def _roll(self, now: datetime) -> None:
        if now.date() != self._day:
            self._day = now.date()
            self._day_spent = Decimal(0)
        if (now.year, now.month) != self._month:
            self._month = (now.year, now.month)
            self._month_spent = Decimal(0)

    def _caps(self, now: datetime) -> list[_Cap]:
        caps = []
        if self._daily is not None:
            end = day_start(now) + timedelta(days=1)
            caps.append(_Cap("daily", self._daily, self._day_spent, end))
        if self._monthly is not None:
            caps.append(_Cap("monthly", self._monthly, self._month_spent, _next_month(now)))
        return caps

    def _exceeded(self, cap: _Cap, amount: Decimal, now: datetime) -> BudgetExceeded:
        retry_after = max(1, math.ceil((cap.period_end - now).total_seconds()))
        key = "budget.daily_usd" if cap.name == "daily" else "budget.monthly_usd"
        period = "today (UTC)" if cap.name == "daily" else "this month (UTC)"
        spend = f"${usd(cap.spent)} spent {period}"
        if self._reserved:
            spend += f" and ${usd(self._reserved)} held by requests in flight"
        if amount > cap.limit:
            advice = f"this request alone may cost up to ${usd(amount)}; lower max_tokens"
        else:
            advice = f"this request may cost up to ${usd(amount)}"
        message = (
            f"the {cap.name} budget of ${usd(cap.limit)} would be passed: {spend}; {advice}, "
            f"raise {key}, or wait until the cap resets at "
            f"{cap.period_end.strftime('%Y-%m-%d %H:%M')} UTC"
        )
        return BudgetExceeded(message, headers={"Retry-After": str(retry_after)})
