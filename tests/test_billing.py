from decimal import Decimal

import orjson
import pytest

from sidecar.billing import (
    DEFAULT_WORST_CASE_OUTPUT_TOKENS,
    ZERO,
    Cost,
    Usage,
    cost,
    estimate_tokens,
    usage_from_openai,
    usd,
    worst_case,
)
from sidecar.config import AccountConfig, ModelConfig

CHAT = ModelConfig(
    upstream="deepseek-v3.2",
    input_per_mtok=Decimal("0.28"),
    output_per_mtok=Decimal("0.42"),
    cached_input_per_mtok=Decimal("0.028"),
)
STARTER = AccountConfig()  # 3% service fee
PRO_WAIVED = AccountConfig(plan="pro", service_fee_rate=Decimal("0"))

NON_STREAM = orjson.loads(
    b'{"id":"x","object":"chat.completion","choices":[],'
    b'"usage":{"prompt_tokens":1234,"completion_tokens":567,"total_tokens":1801}}'
)["usage"]
NON_STREAM_CACHED = orjson.loads(
    b'{"prompt_tokens":1234,"completion_tokens":567,"total_tokens":1801,'
    b'"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":0}}'
)
# The last chunk of a stream with stream_options.include_usage.
STREAM_CHUNK = orjson.loads(
    b'{"id":"x","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":1234,"completion_tokens":567,"total_tokens":1801}}'
)["usage"]
# The Responses API (response.completed event of a stream, or the plain body).
RESPONSES_CACHED = orjson.loads(
    b'{"input_tokens":1234,"output_tokens":567,"total_tokens":1801,'
    b'"input_tokens_details":{"cached_tokens":1024},'
    b'"output_tokens_details":{"reasoning_tokens":100}}'
)


def _fields(c: Cost) -> tuple[str, str, str]:
    return usd(c.model_fee), usd(c.service_fee), usd(c.total)


@pytest.mark.parametrize(
    ("usage", "account", "expected"),
    [
        (NON_STREAM, STARTER, ("0.00058366", "0.0000175098", "0.0006011698")),
        (NON_STREAM, PRO_WAIVED, ("0.00058366", "0", "0.00058366")),
        (STREAM_CHUNK, STARTER, ("0.00058366", "0.0000175098", "0.0006011698")),
        (STREAM_CHUNK, PRO_WAIVED, ("0.00058366", "0", "0.00058366")),
        # 210 uncached x 0.28 + 1024 cached x 0.028 + 567 x 0.42 = 325.612 per million
        (NON_STREAM_CACHED, STARTER, ("0.000325612", "0.00000976836", "0.00033538036")),
        (NON_STREAM_CACHED, PRO_WAIVED, ("0.000325612", "0", "0.000325612")),
        (RESPONSES_CACHED, STARTER, ("0.000325612", "0.00000976836", "0.00033538036")),
        (RESPONSES_CACHED, PRO_WAIVED, ("0.000325612", "0", "0.000325612")),
    ],
)
def test_exact_cost_digit_for_digit(
    usage: dict[str, object], account: AccountConfig, expected: tuple[str, str, str]
) -> None:
    parsed = usage_from_openai(usage)
    assert parsed is not None
    assert _fields(cost(parsed, CHAT, account.service_fee_rate)) == expected


def test_custom_rate_for_enterprise() -> None:
    account = AccountConfig(plan="enterprise", service_fee_rate=Decimal("0.015"))
    c = cost(Usage(input_tokens=1_000_000, output_tokens=1_000_000), CHAT, account.service_fee_rate)
    assert _fields(c) == ("0.7", "0.0105", "0.7105")


def test_cached_tokens_at_input_price_when_no_cached_price() -> None:
    model = ModelConfig(upstream="m", input_per_mtok=Decimal("2.5"), output_per_mtok=Decimal("10"))
    c = cost(Usage(input_tokens=1000, cached_tokens=800, output_tokens=3), model, Decimal(0))
    assert usd(c.model_fee) == "0.00253"


def test_exact_for_awkward_prices_and_large_counts() -> None:
    model = ModelConfig(
        upstream="m",
        input_per_mtok=Decimal("0.123456789"),
        output_per_mtok=Decimal("7.000000001"),
    )
    c = cost(Usage(input_tokens=987_654_321, output_tokens=123_456_789), model, Decimal("0.03"))
    # 987654321 x 0.123456789 = 121932631.112635269; 123456789 x 7.000000001 = 864197523.123456789
    assert usd(c.model_fee) == "986.130154236092058"
    assert usd(c.service_fee) == "29.58390462708276174"
    assert usd(c.total) == "1015.71405886317481974"


def test_other_kinds() -> None:
    image = ModelConfig(kind="image", upstream="img", per_image=Decimal("0.04"))
    video = ModelConfig(kind="video", upstream="v", per_second=Decimal("0.1"))
    speech = ModelConfig(kind="audio", upstream="tts", per_mchar=Decimal("15"))
    assert usd(cost(Usage(images=3), image, Decimal(0)).total) == "0.12"
    assert usd(cost(Usage(seconds=Decimal("12.5")), video, Decimal(0)).total) == "1.25"
    assert usd(cost(Usage(characters=1234), speech, Decimal(0)).total) == "0.01851"


def test_usage_shapes() -> None:
    assert usage_from_openai(None) is None
    assert usage_from_openai({"prompt_tokens": 8, "total_tokens": 8}) == Usage(input_tokens=8)
    assert usage_from_openai({"type": "duration", "seconds": 61}) == Usage(seconds=Decimal(61))
    # Nonsense values count as zero; cached never exceeds input.
    odd = {
        "prompt_tokens": "7",
        "completion_tokens": -3,
        "prompt_tokens_details": {"cached_tokens": 9},
    }
    assert usage_from_openai(odd) == Usage()


def test_ledger_fields() -> None:
    assert Usage(input_tokens=1, seconds=Decimal("2.50")).ledger_fields() == {
        "input_tokens": 1,
        "output_tokens": 0,
        "cached_tokens": 0,
        "images": 0,
        "seconds": "2.5",
    }
    assert Usage(seconds=Decimal(3)).ledger_fields()["seconds"] == 3
    assert ZERO.ledger_fields() == {"model_fee_usd": "0", "service_fee_usd": "0", "total_usd": "0"}


def test_usd_is_plain_notation() -> None:
    assert usd(Decimal("3.3166E-6")) == "0.0000033166"
    assert usd(Decimal("1E+2")) == "100"
    assert usd(Decimal("0.000")) == "0"
    assert usd(Decimal("1.50")) == "1.5"


def test_worst_case() -> None:
    rate = Decimal("0.03")
    # 1000 x 0.28 + 100 x 0.42 = 322 per million, plus 3%
    assert worst_case(CHAT, rate, input_tokens=1000, max_tokens=100) == Decimal("0.00033166")
    capped = CHAT.model_copy(update={"max_output_tokens": 10})
    assert worst_case(capped, Decimal(0), input_tokens=0, max_tokens=None) == Decimal("0.0000042")
    default = worst_case(CHAT, Decimal(0), input_tokens=0, max_tokens=None)
    assert default == Decimal(DEFAULT_WORST_CASE_OUTPUT_TOKENS) * Decimal("0.42") / 1_000_000


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        ({"prompt_tokens": 12, "completion_tokens": 20}, Usage(12, 20)),
        ({"prompt_tokens": True, "completion_tokens": -3}, Usage(0, 0)),
        ({"prompt_tokens": 7.0, "completion_tokens": "9"}, Usage(0, 0)),
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 99},
            },
            Usage(10, 1, cached_tokens=10),
        ),
        ({"input_tokens": 5, "output_tokens": 2, "prompt_tokens_details": None}, Usage(5, 2)),
        ({"seconds": "1.5"}, Usage(seconds=Decimal("1.5"))),
        ({"seconds": 3}, Usage(seconds=Decimal(3))),
        ({"seconds": True}, Usage()),
        ({"seconds": -1}, Usage()),
        ({"seconds": "NaN"}, Usage()),
        ({"seconds": "soon"}, Usage()),
    ],
)
def test_reported_usage_counts_only_sane_numbers(
    reported: dict[str, object], expected: Usage
) -> None:
    """A provider's odd usage (bools, negatives, floats for counts) bills nothing it cannot mean."""
    assert usage_from_openai(reported) == expected


def test_no_usage_object_is_no_usage() -> None:
    assert usage_from_openai(None) is None
    assert usage_from_openai([1, 2]) is None  # type: ignore[arg-type]
