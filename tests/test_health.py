from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar import config
from sidecar.health import HealthBook, HealthPolicy, Prober, iso_utc, parse_retry_after

WALL0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL0 + self.now - 1000.0


def make_book(clock: FakeClock, **policy: Any) -> HealthBook:
    settings = config.from_mapping(
        {
            "providers": [
                {
                    "name": name,
                    "base_url": f"http://127.0.0.1:{port}/v1",
                    "region": region,
                    "models": {"m": {"input_per_mtok": "1", "output_per_mtok": "2"}},
                }
                for name, port, region in (("a", 1, "eu"), ("b", 2, "us"))
            ]
        },
        environ={},
    )
    return HealthBook(
        settings.providers, clock=clock, wall=clock.wall, policy=HealthPolicy(**policy)
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"Retry-After-Ms": "1500", "Retry-After": "9"}, 1.5),
        ({"retry-after-ms": "junk", "retry-after": "3"}, 3.0),
        ({"Retry-After": "Thu, 01 Jan 2026 00:00:30 GMT"}, 30.0),
        ({"Retry-After": "Wed, 31 Dec 2025 23:59:00 GMT"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": ""}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=WALL0) == expected


# -- state machine ---------------------------------------------------------------------------


def test_consecutive_failures_eject_then_half_open_then_healthy(clock: FakeClock) -> None:
    book = make_book(clock)
    for _ in range(2):
        book.record_failure("a", reason="connect error")
    assert book.state("a") == "healthy"
    book.record_failure("a", reason="timeout", status=None)
    assert book.state("a") == "ejected"
    assert book.ejected_until("a") == "2026-01-01T00:00:10.000Z"
    assert book.state("b") == "healthy"
    clock.now += 10
    assert book.state("a") == "half_open"
    assert book.ejected_until("a") is None
    book.record_success("a")
    assert book.state("a") == "healthy"


def test_success_resets_the_run(clock: FakeClock) -> None:
    book = make_book(clock, min_requests=100)
    for _ in range(10):
        book.record_failure("a", reason="x", status=500)
        book.record_failure("a", reason="x", status=500)
        book.record_success("a")
    assert book.state("a") == "healthy"


def test_back_off_grows_on_repeat_and_is_capped(clock: FakeClock) -> None:
    book = make_book(clock, consecutive_failures=1, base_ejection_s=10, max_ejection_s=35)
    lengths = []
    for _ in range(4):
        start = clock.now
        book.record_failure("a", reason="x", status=503)
        while book.state("a") == "ejected":
            clock.now += 1
        lengths.append(clock.now - start)
        assert book.state("a") == "half_open"
    assert lengths == [10, 20, 35, 35]


def test_back_off_starts_over_after_a_quiet_period(clock: FakeClock) -> None:
    book = make_book(clock, consecutive_failures=1, base_ejection_s=10, forget_after_s=600)
    book.record_failure("a", reason="x", status=503)
    clock.now += 10
    book.record_failure("a", reason="x", status=503)  # half-open trial fails: 20 s
    clock.now += 20
    book.record_success("a")
    clock.now += 601
    book.record_failure("a", reason="x", status=503)
    assert book.ejected_until("a") == iso_utc(clock.wall() + 10)


def test_half_open_failure_ejects_at_once(clock: FakeClock) -> None:
    book = make_book(clock)
    for _ in range(3):
        book.record_failure("a", reason="x", status=502)
    clock.now += 10
    book.record_failure("a", reason="x", status=502)
    assert book.state("a") == "ejected"


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_key_ejects_at_once(clock: FakeClock, status: int) -> None:
    book = make_book(clock)
    book.record_failure("a", reason="upstream status", status=status)
    assert book.state("a") == "ejected"
    assert f"status {status}" in book.describe("a")


def test_retry_after_ejects_until_then_and_success_does_not_cut_it_short(
    clock: FakeClock,
) -> None:
    book = make_book(clock)
    book.record_failure("b", reason="rate limited", status=429, retry_after_s=45)
    assert book.state("b") == "ejected"
    assert book.ejected_until("b") == "2026-01-01T00:00:45.000Z"
    book.record_success("b")
    assert book.state("b") == "ejected"
    clock.now += 45
    assert book.state("b") == "half_open"


def test_retry_after_is_capped(clock: FakeClock) -> None:
    book = make_book(clock, max_retry_after_s=120)
    book.record_failure("a", reason="rate limited", status=429, retry_after_s=86400)
    assert book.ejected_until("a") == iso_utc(clock.wall() + 120)


def test_error_rate_trips_without_a_run(clock: FakeClock) -> None:
    book = make_book(clock, consecutive_failures=99, min_requests=5, max_error_rate=0.5)
    for _ in range(3):
        book.record_success("a")
        book.record_failure("a", reason="x", status=500)
    assert book.state("a") == "healthy"  # 3 of 6 is not above 50%
    book.record_failure("a", reason="x", status=500)
    assert book.state("a") == "ejected"


def test_error_rate_forgets_old_outcomes(clock: FakeClock) -> None:
    book = make_book(clock, window_s=60)
    book.record_failure("a", reason="x", status=500)
    book.record_success("a")
    assert book.error_rate("a") == 0.5
    clock.now += 61
    assert book.error_rate("a") == 0.0


def test_failures_while_ejected_do_not_grow_the_back_off(clock: FakeClock) -> None:
    book = make_book(clock, consecutive_failures=1)
    book.record_failure("a", reason="x", status=500)
    until = book.ejected_until("a")
    book.record_failure("a", reason="x", status=500)
    assert book.ejected_until("a") == until


def test_snapshot_shape(clock: FakeClock) -> None:
    book = make_book(clock, consecutive_failures=1)
    book.record_success("a")
    book.record_failure("a", reason="x", status=500)
    assert book.snapshot() == [
        {
            "name": "a",
            "region": "eu",
            "state": "ejected",
            "ejected_until": "2026-01-01T00:00:10.000Z",
            "error_rate": 0.5,
            "models": ["m"],
        },
        {
            "name": "b",
            "region": "us",
            "state": "healthy",
            "ejected_until": None,
            "error_rate": 0.0,
            "models": ["m"],
        },
    ]


def test_unknown_provider_is_a_programming_error(clock: FakeClock) -> None:
    with pytest.raises(KeyError):
        make_book(clock).record_success("zzz")


# -- probes ----------------------------------------------------------------------------------


async def test_probe_success_ends_an_ejection_early(clock: FakeClock) -> None:
    book = make_book(clock, consecutive_failures=1)
    book.record_failure("a", reason="x", status=500)
    probed: list[str] = []

    async def probe(name: str) -> bool:
        probed.append(name)
        return True

    await Prober(book, probe, interval_s=1).probe_once()
    assert probed == ["a"]
    assert book.state("a") == "half_open"


async def test_probe_does_not_override_retry_after(clock: FakeClock) -> None:
    book = make_book(clock)
    book.record_failure("a", reason="x", status=429, retry_after_s=30)

    async def probe(name: str) -> bool:
        return True

    await Prober(book, probe, interval_s=1).probe_once()
    assert book.state("a") == "ejected"


async def test_failing_or_broken_probe_on_half_open_ejects_again(clock: FakeClock) -> None:
    book = make_book(clock, consecutive_failures=1)
    for name in ("a", "b"):
        book.record_failure(name, reason="x", status=500)
    clock.now += 10

    async def probe(name: str) -> bool:
        if name == "b":
            raise OSError("refused")
        return False

    await Prober(book, probe, interval_s=1).probe_once()
    assert book.state("a") == "ejected"
    assert book.state("b") == "ejected"
    assert "probe failed" in book.describe("b")


async def test_prober_runs_until_cancelled(clock: FakeClock) -> None:
    book = make_book(clock, consecutive_failures=1)
    book.record_failure("b", reason="x", status=500)
    seen = asyncio.Event()

    async def probe(name: str) -> bool:
        seen.set()
        return False

    task = asyncio.create_task(Prober(book, probe, interval_s=0.001).run())
    await asyncio.wait_for(seen.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_reason_shows_the_status_once(clock: FakeClock) -> None:
    book = make_book(clock, consecutive_failures=1)
    book.record_failure("a", reason="HTTP 503", status=503)
    assert book.describe("a").endswith("(HTTP 503)")


def test_reload_adopts_state_of_providers_that_remain(clock: FakeClock) -> None:
    old = make_book(clock, consecutive_failures=1)
    old.record_failure("a", reason="x", status=500)
    new = make_book(clock, consecutive_failures=1)
    new.adopt(old)
    assert new.state("a") == "ejected"
    assert new.ejected_until("a") == old.ejected_until("a")
    assert new.error_rate("a") == 1.0
    assert new.state("b") == "healthy"
