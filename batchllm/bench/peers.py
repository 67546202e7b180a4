"""Peers: Hugging Face transformers generating the same requests on the same weights.

- ``transformers``: ``model.generate`` in static batches, the way one would batch offline by hand:
  requests sorted by prompt (so a batch holds one prefix group, its best case), ``batch_size`` (64) per
  batch, left padding, greedy, EOS ignored through ``min_new_tokens = max_new_tokens``.
- ``transformers-cb``: transformers' continuous batching (``generate_batch``: paged KV, block sharing),
  when the installed version has it; otherwise the peer is reported unavailable, not an error.
- ``vllm``: ``vllm.LLM.generate`` where vLLM is installed (``batchllm.bench.vllm_peer``), else
  reported unavailable.

The HF model is built from the same weights batchllm loads: a GGUF through transformers' own GGUF
loader (``from_pretrained(dir, gguf_file=...)``, dequantized like ours), an HF folder through
``from_pretrained``, a dummy preset by building the architecture from ``ModelConfig.to_hf()`` and
copying in the tensors ``loader.iter_weights`` yields (HF names), one at a time.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

from batchllm.bench.peer_run import PeerRun
from batchllm.errors import BatchLLMError
from batchllm.models import loader
from batchllm.models.config import ModelConfig

PEERS = ("transformers", "transformers-cb", "vllm")


def unavailable_reason(name: str) -> str | None:
    """Why peer ``name`` cannot run with the installed packages (None when it can)."""
    if name not in PEERS:
        raise BatchLLMError(f"unknown peer {name!r}; known peers: {', '.join(PEERS)}")
    if name == "vllm":
        from batchllm.bench import vllm_peer

        return vllm_peer.unavailable_reason()
    if name == "transformers-cb":
        from transformers import GenerationMixin

        if not hasattr(GenerationMixin, "generate_batch"):
            import transformers

            return f"transformers {transformers.__version__} has no continuous batching (generate_batch)"
    return None


def load_hf_model(src: loader.ModelSource, mcfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The transformers model of ``src`` in ``dtype`` on ``device``, eval mode (see module docstring)."""
    import transformers

    if src.kind == "gguf":
        m = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(src.path), gguf_file=os.path.basename(src.path), dtype=dtype)
        return m.to(device).eval()
    if src.kind == "hf":
        m = transformers.AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, device_map=str(device) if device.type == "cuda" else None)
        return m.to(device).eval()
    hf_cfg = transformers.AutoConfig.for_model(**mcfg.to_hf())
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers keep it here
        from transformers.modeling_utils import no_init_weights
    # built on the device without random init (the weights are overwritten next): seconds, not minutes, at 8B
    with torch.device(device), no_init_weights():
        m = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    if mcfg.tie_word_embeddings:
        m.tie_weights()  # then named_parameters lists the shared tensor once, as iter_weights yields it
    params = dict(m.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, tensor in loader.iter_weights(src, mcfg, dtype, device):
            if name not in params:
                raise BatchLLMError(f"transformers' {type(m).__name__} has no parameter {name}")
            params[name].copy_(tensor)
            seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise BatchLLMError(f"weights for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} were not loaded")
    return m.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_static(model: torch.nn.Module, rows: list[dict[str, Any]], device: torch.device, batch_size: int = 64, pad_id: int = 0) -> PeerRun:
    """``generate`` over static batches of requests sorted by prompt tokens (see module docstring).

    A batch generates its longest max_tokens for every member (static batching cannot stop one row);
    outputs are trimmed to each request's max_tokens. KV peak: the largest batch x (padded prompt +
    new tokens), what the dynamic cache holds when the batch ends.
    """
    order = sorted(range(len(rows)), key=lambda i: rows[i]["prompt_token_ids"])
    outputs: dict[str, list[int]] = {}
    decode_batches: list[tuple[int, int]] = []
    peak = computed = 0
    _sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(r["prompt_token_ids"]) for r in batch)
        new = max(r["max_tokens"] for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            p = r["prompt_token_ids"]
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=pad_id,
        )
        gen = out[:, width:].tolist()  # syncs
        for r, g in zip(batch, gen):
            outputs[r["custom_id"]] = g[: r["max_tokens"]]
        decode_batches.append((len(batch), new - 1))  # the first token comes from the prefill
        peak = max(peak, len(batch) * (width + new))
        computed += len(batch) * width  # every prompt token and every pad is computed
    _sync(device)
    return PeerRun(time.perf_counter() - t0, outputs, decode_batches, peak, computed)


@torch.inference_mode()
def run_continuous(model: torch.nn.Module, rows: list[dict[str, Any]], device: torch.device, max_batch_tokens: int | None = None) -> PeerRun:
    """transformers' ``generate_batch`` (greedy, EOS disabled), one call per distinct max_tokens value
    (its ``max_new_tokens`` is per call). On the CPU the paged cache is sized to the requests (its
    automatic sizing assumes a GPU and spends tens of seconds); on CUDA its own sizing is used."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    by_len: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_len.setdefault(r["max_tokens"], []).append(r)
    outputs: dict[str, list[int]] = {}
    _sync(device)
    t0 = time.perf_counter()
    for new, batch in by_len.items():
        gen_cfg = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)  # -1: EOS disabled
        cb_cfg = None
        if device.type != "cuda":
            page = 16
            blocks = sum(-(-(len(r["prompt_token_ids"]) + new) // page) for r in batch) + 8
            cb_cfg = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=max_batch_tokens or 1024)
        res = model.generate_batch(
            [r["prompt_token_ids"] for r in batch], generation_config=gen_cfg, continuous_batching_config=cb_cfg,
            max_new_tokens=new, warmup=device.type == "cuda",
        )
        if len(res) != len(batch):  # it logs failures and returns what finished
            raise BatchLLMError(f"transformers generate_batch returned {len(res)} of {len(batch)} results")
        for r, out in zip(batch, res.values()):  # results come back in input order
            if out.error is not None:
                raise BatchLLMError(f"transformers generate_batch failed on {r['custom_id']}: {out.error}")
            outputs[r["custom_id"]] = list(out.generated_tokens)[:new]
    _sync(device)
    return PeerRun(time.perf_counter() - t0, outputs, [], None, None)


def decode_batch_stats(decode_batches: list[tuple[int, int]]) -> dict[str, float] | None:
    """min / median / max sequences per decode step from (size, steps) pairs."""
    sizes = [b for b, steps in decode_batches for _ in range(steps)]
    if not sizes:
        return None
    return {"min": min(sizes), "median": float(statistics.median(sizes)), "max": max(sizes)}
