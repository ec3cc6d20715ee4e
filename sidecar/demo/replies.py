"""What the demo models say: canned replies, token counts and embedding vectors; pure.

Tokens are whitespace-led words (" world"), so a reply's pieces concatenate back to the reply
and the completion token count is exactly the number of pieces streamed.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import re
import struct
from collections.abc import Sequence
from typing import Any

_OPENERS = (
    'Sure, here is a short answer to "{topic}".',
    'Good question: "{topic}".',
    'Here is what I can tell you about "{topic}".',
    'Let me keep this brief on "{topic}".',
)
_SENTENCES = (
    "The short version is that it depends on your constraints, so start small and measure.",
    "A common approach is to split the problem into steps and check each one before moving on.",
    "Most teams find that a simple, well-tested solution beats a clever one in the long run.",
    "If cost matters, cache repeated work and route it to the same provider to keep it warm.",
    "Keep an eye on latency and error rates; they tell you early when something drifts.",
    "Write down the assumptions first, because they are usually where the surprises hide.",
    "For production use, add retries with a budget and log every request's cost.",
    "In practice the boring option is often the right one, at least for the first version.",
)
_CHARS_PER_TOKEN = 4
_MESSAGE_OVERHEAD_TOKENS = 3


def split_tokens(text: str) -> list[str]:
    """Split text into stream pieces whose concatenation is the text."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


def estimate_tokens(text: str) -> int:
    """About four characters a token, as a rule of thumb for English."""
    return math.ceil(len(text) / _CHARS_PER_TOKEN) if text else 0


def message_text(message: Any) -> str:
    """The text of a chat message, whether its content is a string or a list of parts."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def message_tokens(message: Any) -> int:
    return estimate_tokens(message_text(message)) + _MESSAGE_OVERHEAD_TOKENS


def prompt_tokens(prompt: Any) -> int:
    """Tokens of a completions/embeddings input: text, list of texts, or token id arrays."""
    if isinstance(prompt, str):
        return estimate_tokens(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(prompt_tokens(item) for item in prompt)
    return 0


def _topic(prompt: str) -> str:
    words = re.findall(r"[\w'-]+", prompt)
    if not words:
        return "your question"
    return " ".join(words[:8]) + ("..." if len(words) > 8 else "")


def compose_reply(prompt: str, rng: random.Random) -> str:
    """A plausible short assistant reply to ``prompt``; same rng state, same reply."""
    opener = rng.choice(_OPENERS).format(topic=_topic(prompt))
    sentences = rng.sample(_SENTENCES, k=rng.randint(1, 3))
    return " ".join([opener, *sentences])


def seeded_rng(*parts: str) -> random.Random:
    """A random source fixed by the given text, for answers that must not vary."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A unit vector fixed by the text, so equal inputs embed equally."""
    rng = seeded_rng("embedding", text)
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def encode_base64(vector: Sequence[float]) -> str:
    """OpenAI's base64 format: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embedding_inputs(value: Any) -> list[str] | None:
    """The inputs of an embeddings request as texts; token arrays are spelled out."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        return [" ".join(map(str, value))]
    if isinstance(value, list) and value:
        items = [embedding_inputs(item) for item in value]
        if all(item is not None and len(item) == 1 for item in items):
            return [item[0] for item in items if item]
    return None
