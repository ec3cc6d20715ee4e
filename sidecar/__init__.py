"""tokenhub-sidecar: a local OpenAI-compatible daemon with stored keys, hard bounds, failover,
a response cache and an append-only cost ledger."""

__version__ = "0.1.0"
