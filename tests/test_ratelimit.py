from __future__ import annotations

import asyncio

import pytest

from sidecar import errors
from sidecar.ratelimit import ConcurrencyCap, TokenBucket, format_duration


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def spend(bucket: TokenBucket, n: int) -> None:
    for _ in range(n):
        bucket.take()


def test_full_bucket_allows_rpm_requests_then_429() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, clock=clock, plan="starter")
    spend(bucket, 60)
    with pytest.raises(errors.RateLimited) as caught:
        bucket.take()
    err = caught.value
    assert err.status == 429 and err.code == "rate_limit_exceeded"
    assert err.headers["Retry-After"] == "1"
    assert err.headers["x-ratelimit-limit-requests"] == "60"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-reset-requests"] == "1s"
    assert "starter plan allows 60 requests per minute" in err.message
    assert "Retry after 1 second," in err.message


def test_refill_is_rpm_over_60_per_second() -> None:
    clock = FakeClock()
    bucket = TokenBucket(120, clock=clock)  # 2 per second
    spend(bucket, 120)
    clock.advance(0.5)
    bucket.take()
    with pytest.raises(errors.RateLimited):
        bucket.take()
    clock.advance(1.0)
    spend(bucket, 2)
    with pytest.raises(errors.RateLimited):
        bucket.take()


def test_refill_never_exceeds_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, clock=clock)
    clock.advance(3600)
    spend(bucket, 10)
    with pytest.raises(errors.RateLimited):
        bucket.take()


@pytest.mark.parametrize(("rpm", "elapsed", "retry_after"), [(6, 0, 10), (6, 9.2, 1), (6, 5.5, 5)])
def test_retry_after_is_whole_seconds_rounded_up_at_least_one(
    rpm: int, elapsed: float, retry_after: int
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rpm, clock=clock)
    spend(bucket, rpm)
    clock.advance(elapsed)
    with pytest.raises(errors.RateLimited) as caught:
        bucket.take()
    assert caught.value.headers["Retry-After"] == str(retry_after)


def test_a_refused_request_spends_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, clock=clock)
    spend(bucket, 60)
    for _ in range(5):
        with pytest.raises(errors.RateLimited):
            bucket.take()
    clock.advance(1)
    bucket.take()


def test_clock_stepping_back_does_not_break_the_bucket() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, clock=clock)
    spend(bucket, 60)
    clock.advance(-100)
    with pytest.raises(errors.RateLimited):
        bucket.take()
    clock.advance(1)
    bucket.take()


def test_success_headers() -> None:
    clock = FakeClock()
    bucket = TokenBucket(600, clock=clock)
    assert bucket.headers() == {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "600",
        "x-ratelimit-reset-requests": "0s",
    }
    spend(bucket, 5)
    headers = bucket.headers()
    assert headers["x-ratelimit-remaining-requests"] == "595"
    assert headers["x-ratelimit-reset-requests"] == "500ms"


def test_resize_keeps_the_share_left() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock)
    spend(bucket, 50)
    bucket.resize(1000, plan="pro")
    assert bucket.rpm == 1000
    assert bucket.headers()["x-ratelimit-remaining-requests"] == "500"


def test_rpm_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.0004, "1ms"),
        (0.25, "250ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.999, "59.999s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (3725.5, "1h2m5.5s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


async def test_concurrency_cap_queues_beyond_the_limit() -> None:
    cap = ConcurrencyCap(2)
    release = asyncio.Event()
    entered: list[int] = []

    async def request(i: int) -> None:
        async with cap:
            entered.append(i)
            await release.wait()

    tasks = [asyncio.create_task(request(i)) for i in range(4)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert entered == [0, 1]
    assert (cap.in_flight, cap.waiting) == (2, 2)
    release.set()
    await asyncio.gather(*tasks)
    assert entered == [0, 1, 2, 3]
    assert (cap.in_flight, cap.waiting) == (0, 0)


async def test_cancelled_waiter_leaves_no_trace() -> None:
    cap = ConcurrencyCap(1)
    async with cap:
        waiter = asyncio.create_task(cap.__aenter__())
        await asyncio.sleep(0)
        assert cap.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert cap.waiting == 0
    assert cap.in_flight == 0
    async with cap:
        assert cap.in_flight == 1


async def test_cap_is_released_on_error() -> None:
    cap = ConcurrencyCap(1)
    with pytest.raises(RuntimeError):
        async with cap:
            raise RuntimeError("boom")
    assert cap.in_flight == 0
    async with cap:
        pass
