"""Usage in, Decimal fees out: the price arithmetic of SPEC "Billing and the ledger". Pure.

Every amount is an exact Decimal product (no rounding): prices are decimal strings, token counts
are integers, and a per-million price is applied with ``scaleb(-6)``, which never rounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Context, Decimal
from types import MappingProxyType
from typing import Any, NamedTuple

from sidecar.config import ModelConfig

# When neither the request's max_tokens nor the model's max_output_tokens bound the answer, a
# budget reservation assumes this many output tokens.
DEFAULT_WORST_CASE_OUTPUT_TOKENS = 4096
CHARS_PER_TOKEN = 4
# Wide enough that no product of a token count and a price is ever rounded.
_EXACT = Context(prec=60)
_ZERO = Decimal(0)
_NO_DETAILS: Mapping[str, Any] = MappingProxyType({})
# Tuples, not ``dict | Mapping``: a union in an isinstance() call is built anew at every call.
_MAPPINGS = (dict, Mapping)
_AMOUNTS = (int, float, str)


class Usage(NamedTuple):
    """What one request consumed; ``input_tokens`` includes ``cached_tokens``, as OpenAI counts.

    A NamedTuple, not a frozen dataclass: one is made per request, and a frozen dataclass's
    ``__init__`` costs several times a tuple's.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    images: int = 0
    seconds: Decimal = Decimal(0)
    characters: int = 0

    def ledger_fields(self) -> dict[str, object]:
        seconds: object = (
            int(self.seconds) if self.seconds == self.seconds.to_integral() else usd(self.seconds)
        )
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "images": self.images,
            "seconds": seconds,
        }


class Cost(NamedTuple):
    model_fee: Decimal
    service_fee: Decimal
    total: Decimal

    def ledger_fields(self) -> dict[str, str]:
        return {
            "model_fee_usd": usd(self.model_fee),
            "service_fee_usd": usd(self.service_fee),
            "total_usd": usd(self.total),
        }


ZERO = Cost(Decimal(0), Decimal(0), Decimal(0))


def _count(value: object) -> int:
    """A token count from a JSON body: a non-negative int, anything else counts as 0."""
    if type(value) is int:  # what orjson gives; not bool, which is an int subclass
        return value if value > 0 else 0
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(value, 0)


def _details(usage: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    details = usage.get(key)
    if details is None:
        return _NO_DETAILS
    return details if isinstance(details, _MAPPINGS) else _NO_DETAILS


def _seconds(value: object) -> Decimal:
    if value is None or isinstance(value, bool) or not isinstance(value, _AMOUNTS):
        return _ZERO
    try:
        amount = Decimal(str(value))
    except ArithmeticError:
        return _ZERO
    return amount if amount.is_finite() and amount > 0 else _ZERO


def usage_from_openai(usage: Mapping[str, Any] | None) -> Usage | None:
    """Read a response's ``usage`` object in any of the OpenAI shapes; None when there is none.

    Chat/completions and embeddings use ``prompt_tokens``/``completion_tokens`` with
    ``prompt_tokens_details.cached_tokens``; responses, images and audio use
    ``input_tokens``/``output_tokens`` with ``input_tokens_details.cached_tokens``; audio
    transcription billed by duration reports ``seconds``.
    """
    if not isinstance(usage, _MAPPINGS):  # a dict (what orjson gives) is checked first
        return None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        input_tokens = _count(usage.get("prompt_tokens"))
        output_tokens = _count(usage.get("completion_tokens"))
        cached = _count(_details(usage, "prompt_tokens_details").get("cached_tokens"))
    else:
        input_tokens = _count(usage.get("input_tokens"))
        output_tokens = _count(usage.get("output_tokens"))
        cached = _count(_details(usage, "input_tokens_details").get("cached_tokens"))
    seconds = _seconds(usage.get("seconds"))
    # Positional: a NamedTuple built with keywords costs twice as much.
    return Usage(input_tokens, output_tokens, min(cached, input_tokens), 0, seconds)


def _per_million(count: int, price: Decimal | None) -> Decimal:
    if price is None or count == 0:
        return _ZERO
    return _EXACT.multiply(count, price).scaleb(-6, _EXACT)


def _times(count: int | Decimal, price: Decimal | None) -> Decimal:
    return _ZERO if price is None or count == 0 else _EXACT.multiply(count, price)


def model_fee(usage: Usage, model: ModelConfig) -> Decimal:
    """The provider's price for ``usage``: each consumed unit at its configured price.

    Every operation names the 60-digit context, so no amount is ever rounded.
    """
    cached = min(usage.cached_tokens, usage.input_tokens)
    cached_price = model.cached_input_per_mtok
    if cached_price is None:
        cached_price = model.input_per_mtok
    add = _EXACT.add
    fee = add(
        _per_million(usage.input_tokens - cached, model.input_per_mtok),
        _per_million(cached, cached_price),
    )
    fee = add(fee, _per_million(usage.output_tokens, model.output_per_mtok))
    if usage.images or usage.seconds or usage.characters:
        fee = add(fee, _times(usage.images, model.per_image))
        fee = add(fee, _times(usage.seconds, model.per_second))
        fee = add(fee, _per_million(usage.characters, model.per_mchar))
    return fee


def cost(usage: Usage, model: ModelConfig, fee_rate: Decimal) -> Cost:
    """Model fee, the service fee on top (``fee_rate`` x model fee), and their sum; exact."""
    fee = model_fee(usage, model)
    service = _EXACT.multiply(fee, fee_rate)
    return Cost(model_fee=fee, service_fee=service, total=_EXACT.add(fee, service))


def worst_case(
    model: ModelConfig,
    fee_rate: Decimal,
    *,
    input_tokens: int,
    max_tokens: int | None,
    images: int = 0,
    seconds: Decimal = Decimal(0),
    characters: int = 0,
) -> Decimal:
    """The most a request can cost, to reserve against a budget before it is sent.

    Input is priced as uncached; output as ``max_tokens``, else the model's
    ``max_output_tokens``, else ``DEFAULT_WORST_CASE_OUTPUT_TOKENS``.
    """
    output = max_tokens or model.max_output_tokens or DEFAULT_WORST_CASE_OUTPUT_TOKENS
    usage = Usage(
        input_tokens=max(input_tokens, 0),
        output_tokens=output,
        images=images,
        seconds=seconds,
        characters=characters,
    )
    return cost(usage, model, fee_rate).total


def estimate_tokens(text: str) -> int:
    """A rough token count (about four characters a token), for streams cut before usage came."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def usd(amount: Decimal) -> str:
    """A USD amount in plain notation without trailing zeros: ``"0.0000033166"``, ``"12"``."""
    if amount == 0:
        return "0"
    return format(amount.normalize(_EXACT), "f")
