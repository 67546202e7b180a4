"""``PeerRun``: what every peer's run returns (``peers.py``: transformers; ``vllm_peer.py``: vLLM).

Its own module so that the peers' registry (``peers.py``, which asks ``vllm_peer`` whether vLLM can run)
and the vLLM peer share it without importing each other.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class PeerRun:
    """One peer run over a request set. ``outputs``: custom_id -> generated token ids (trimmed to the
    request's max_tokens); ``decode_batches``: sequences per decode step, as (size, steps) pairs;
    ``peak_kv_tokens``: KV cache slots held at the peak (None when the peer does not say)."""

    wall_s: float
    outputs: dict[str, list[int]]
    decode_batches: list[tuple[int, int]]
    peak_kv_tokens: int | None
    prompt_tokens_computed: int | None
