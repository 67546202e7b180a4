"""Benchmark the Triton kernels against their torch references and SDPA on one GPU (docs/benchmarks.md).

Sections (each written to the JSON as soon as it finishes, so a run killed at a deadline keeps them):
  * ``decode_default``: shared-prefix decode attention for one group (32 query heads, 8 KV heads, head dim
    128, bf16, 128 own tokens per request): 64 x 1024, 64 x 4096, 256 x 1024 (requests x shared prefix).
    Measured: the prefix-shared Triton path, the same kernels without sharing (plain paged), the torch
    backend, SDPA with KV expanded to 32 heads, SDPA ``enable_gqa=True`` with KV per request, and the
    memory bound of reading the prefix once (bytes / the device copy bandwidth measured in the same run).
  * ``mixed``: a mixed step (decodes + prefill chunks); ``prefill``: a long causal prefill chunk against
    SDPA; ``kv_store``: the KV store kernel against index_copy_; ``sampling``: the Triton sampling kernel
    against the torch sampler, 256 rows x 128,256 (Llama 3 vocab).
  * without ``--quick``: ``sweep`` (tile / split search on 64 x 1024) and ``decode_best`` (the three decode
    cases with the best tuning found).

``--budget-s N``: sections that would start after N seconds are skipped and recorded as such
(``sections[name].status == "skipped"``); a section that fails is recorded as "error" and the others
still run (exit status 1). Timing: CUDA events around a CUDA graph of ``inner`` back-to-back calls (so
Python launch overhead is not counted; "eager" figures are also given where it matters), warm-up first,
median of ``--reps``. Attention inputs rotate over enough copies of the KV cache that each call reads
from HBM, not from L2. Random tensors are drawn on the device from a generator of the
device; permutations for host-built block tables from a CPU generator (a CUDA generator cannot drive
``randperm`` on the host).

    python scripts/bench_kernels.py --json out.json [--smoke] [--quick] [--budget-s SECONDS]

``--smoke`` runs every section on the CPU through Triton's interpreter at toy sizes (same code, same
JSON layout), to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# a plain checkout (no pip install) imports batchllm from this repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H, KVH, D, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DEV = "cuda"
# --smoke: the whole script on the CPU through Triton's interpreter at toy sizes, to check the script itself
SMOKE = False
# Random numbers: tensors are drawn on DEV from a generator of DEV (DEV_GEN, made in main; the big KV
# caches never pass through the host), permutations that index host-side tables on the CPU from CPU_GEN.
# A generator only drives ops of its own device: torch.randperm(n, generator=<cuda>) without a CUDA
# device= raises, which is what the smoke run (CPU generator) used to hide.
CPU_GEN = torch.Generator()
DEV_GEN: torch.Generator = CPU_GEN


def randn(*shape, scale: float = 1.0) -> torch.Tensor:
    """Normal samples in DTYPE on DEV (drawn in float32 on DEV)."""
    return (torch.randn(*shape, generator=DEV_GEN, device=DEV, dtype=torch.float32) * scale).to(DTYPE)


def randperm(n: int) -> torch.Tensor:
    """A permutation of range(n) as int64 on the CPU (callers build host tables with it, then move them)."""
    return torch.randperm(n, generator=CPU_GEN)


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def bench(fns, *, reps: int, graph: bool = True, min_inner: int = 20) -> tuple[float, str]:
    """Median microseconds per call of ``fns`` (cycled: one closure per data copy); (us, 'graph'|'eager')."""
    n = len(fns)
    if SMOKE:
        min_inner, reps = 1, 1
    inner = max(1, math.ceil(min_inner / n)) * n
    for f in fns:
        f()
    if DEV == "cpu":
        t = time.perf_counter()
        for i in range(inner):
            fns[i % n]()
        return (time.perf_counter() - t) * 1e6 / inner, "cpu"
    torch.cuda.synchronize()
    mode = "eager"

    def run_eager():
        for i in range(inner):
            fns[i % n]()

    run = run_eager
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for f in fns:
                    f()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run_eager()
            run, mode = g.replay, "graph"
        except Exception as e:  # noqa: BLE001 - fall back, but say so in the report
            print(f"  (graph capture failed: {type(e).__name__}: {e}; timing eagerly)", file=sys.stderr)
            torch.cuda.synchronize()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / inner)
    return statistics.median(times), mode


def copies_for(nbytes: int) -> int:
    """How many copies of the data make each call miss L2 (3x the L2 size in all, at most 8)."""
    if DEV == "cpu":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return int(min(8, max(1, math.ceil(3 * l2 / max(nbytes, 1)))))


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    x = torch.empty(1 << (20 if SMOKE else 30), dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    us, _ = bench([lambda: y.copy_(x)], reps=reps, graph=False, min_inner=5)
    return 2 * x.numel() / (us * 1e-6)


# --------------------------------------------------------------------------------------------------
# shared-prefix decode
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GroupCase:
    requests: int
    prefix: int
    own: int = 128

    @property
    def name(self) -> str:
        return f"{self.requests}x{self.prefix}"


def build_group(case: GroupCase):
    """A paged cache where every request's table starts with the shared prefix pages, then its own pages."""
    from batchllm.engine.attention_backend import AttentionMetadata, PrefixGroupDescriptor

    B, P, own = case.requests, case.prefix, case.own
    if P % PAGE or own % PAGE:
        raise ValueError("bench cases use page-aligned lengths")
    n_prefix, n_own = P // PAGE, own // PAGE
    num_pages = n_prefix + B * n_own
    kv = randn(2, num_pages, PAGE, KVH, D)
    perm = randperm(num_pages).to(torch.int32)
    bt = torch.empty(B, n_prefix + n_own, dtype=torch.int32)
    bt[:, :n_prefix] = perm[:n_prefix]
    bt[:, n_prefix:] = perm[n_prefix:].view(B, n_own)
    bt = bt.to(DEV)
    q = randn(B, H, D)
    L = P + own
    meta = AttentionMetadata(
        query_start_loc=torch.arange(B + 1, dtype=torch.int32, device=DEV),
        seq_lens=torch.full((B,), L, dtype=torch.int32, device=DEV),
        block_tables=bt,
        slot_mapping=torch.full((B,), -1, dtype=torch.int64, device=DEV),
        num_decodes=B,
        query_lens_host=[1] * B,
        seq_lens_host=[L] * B,
        prefix_groups=[PrefixGroupDescriptor(0, B, P)],
    )
    return q, kv, bt, meta


def gathered_kv(kv, bt, L):
    """(B, KVH, L, D) K and V per request, as SDPA wants them."""
    k = kv[0][bt.long()].flatten(1, 2)[:, :L].transpose(1, 2).contiguous()
    v = kv[1][bt.long()].flatten(1, 2)[:, :L].transpose(1, 2).contiguous()
    return k, v


def group_case(case: GroupCase, tuning, reps: int, bw: float, full: bool) -> dict:
    from batchllm.kernels.paged_attention import plan_paged_attention, run_plan
    from batchllm.kernels.prefix_attention import plan_prefix_shared_attention

    from batchllm.engine.attention import TorchAttention

    q, kv, bt, meta = build_group(case)
    scale = D**-0.5
    B, L = case.requests, case.prefix + case.own
    kv_bytes_once = (case.prefix + B * case.own) * KVH * D * 2 * kv.element_size()
    io_bytes = 2 * q.numel() * q.element_size()
    n = copies_for(kv.numel() * kv.element_size())
    kvs = [kv] + [kv.clone() for _ in range(n - 1)]
    row = {"case": case.name, "requests": B, "prefix": case.prefix, "own": case.own, "kv_copies": n,
           "bytes_prefix_once": kv_bytes_once + io_bytes,
           "bound_us": (kv_bytes_once + io_bytes) / (bw / 2) * 1e6}  # bw counts read + write

    plan = plan_prefix_shared_attention([1] * B, [L] * B, meta.prefix_groups, num_heads=H, num_kv_heads=KVH,
                                        head_dim=D, device=DEV, tuning=tuning)
    plain = plan_paged_attention([1] * B, [L] * B, num_heads=H, num_kv_heads=KVH, head_dim=D, device=DEV,
                                 tuning=tuning)
    row["plan"] = {"launches": [(int(l.work.shape[0]), dataclasses.asdict(l.tile)) for l in plan.launches],
                   "partials": plan.num_partials}
    row["triton_prefix_us"], row["timing"] = bench([lambda c=c: run_plan(q, c, bt, plan, scale) for c in kvs], reps=reps)
    row["triton_prefix_eager_us"], _ = bench([lambda c=c: run_plan(q, c, bt, plan, scale) for c in kvs], reps=reps, graph=False)
    row["triton_plain_us"], _ = bench([lambda c=c: run_plan(q, c, bt, plain, scale) for c in kvs], reps=reps)

    # correctness against SDPA (GQA) on the same data, float32 math
    k, v = gathered_kv(kv, bt, L)
    ref = F.scaled_dot_product_attention(q.float()[:, :, None], k.float(), v.float(), scale=scale, enable_gqa=True)[:, :, 0]
    out, _ = run_plan(q, kv, bt, plan, scale)
    out_plain, _ = run_plan(q, kv, bt, plain, scale)
    row["max_abs_err_prefix"] = float((out.float() - ref).abs().max())
    row["max_abs_err_plain"] = float((out_plain.float() - ref).abs().max())

    if full:
        q4 = q[:, :, None]  # (B, H, 1, D)
        row["sdpa_gqa_us"], _ = bench([lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)], reps=reps)
        del k, v
        ke, ve = gathered_kv(kv, bt, L)
        ke, ve = ke.repeat_interleave(H // KVH, dim=1), ve.repeat_interleave(H // KVH, dim=1)
        row["sdpa_expanded_us"], _ = bench([lambda: F.scaled_dot_product_attention(q4, ke, ve, scale=scale)], reps=reps)
        del ke, ve
        torch_be = TorchAttention()
        row["torch_backend_us"], _ = bench([lambda: torch_be.forward(q, kv, meta, scale)], reps=max(3, reps // 4), graph=False, min_inner=3)
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return row


def sweep(reps: int, deadline: float) -> tuple[list[dict], object]:
    """Coordinate search over tile shapes and split size on 64 x 1024; returns (rows, best tuning).
    Stops measuring at ``deadline`` (time.time()) and says so in the rows."""
    from batchllm.kernels.paged_attention import (
        AttentionTuning,
        TileConfig,
        default_tiles,
        run_plan,
    )
    from batchllm.kernels.prefix_attention import plan_prefix_shared_attention

    case = GroupCase(4, 32, 16) if SMOKE else GroupCase(64, 1024)
    q, kv, bt, meta = build_group(case)
    n = copies_for(kv.numel() * kv.element_size())
    kvs = [kv] + [kv.clone() for _ in range(n - 1)]
    B, L = case.requests, case.prefix + case.own
    rows = []

    def measure(t: AttentionTuning) -> float:
        if time.time() > deadline:
            rows.append({"tuning": repr(t), "skipped": "budget"})
            return float("inf")
        try:
            plan = plan_prefix_shared_attention([1] * B, [L] * B, meta.prefix_groups, num_heads=H, num_kv_heads=KVH,
                                                head_dim=D, device=DEV, tuning=t)
            us, _ = bench([lambda c=c: run_plan(q, c, bt, plan, D**-0.5) for c in kvs], reps=reps)
        except Exception as e:  # noqa: BLE001 - a config that does not compile (e.g. shared memory) is reported
            rows.append({"tuning": repr(t), "error": f"{type(e).__name__}: {str(e)[:200]}"})
            return float("inf")
        rows.append({"tuning": repr(t), "us": us})
        print(f"  {us:8.1f} us  {t}")
        return us

    wide, narrow = default_tiles(D, H // KVH, interpret=False)
    best = AttentionTuning(wide=wide, narrow=narrow)
    best_us = measure(best)
    # one coordinate at a time, each starting from the best so far
    coordinates = [
        lambda b: [dataclasses.replace(b, narrow=TileConfig(16, bn, w, st))
                   for bn, w, st in ((32, 4, 2), (64, 4, 2), (128, 4, 2), (64, 4, 3), (128, 4, 3), (64, 2, 2), (128, 8, 2))],
        lambda b: [dataclasses.replace(b, wide=TileConfig(bm, bn, w, 2)) for bm in (64, 128) for bn in (32, 64) for w in (4, 8)],
        lambda b: [dataclasses.replace(b, kv_chunk=c) for c in (0, 256, 512, 1024)]
        + [dataclasses.replace(b, programs_per_sm=p) for p in (1, 4)],
    ]
    for make in coordinates:
        for t in make(best):
            if t != best and (us := measure(t)) < best_us:
                best, best_us = t, us
    return rows, best


# --------------------------------------------------------------------------------------------------
# mixed step, prefill, elementwise
# --------------------------------------------------------------------------------------------------


def mixed_step(reps: int) -> dict:
    """256 decodes (context 512..2048) and 4 prefill chunks of 256 tokens after 1024 cached tokens."""
    from batchllm.kernels.paged_attention import (
        AttentionTuning,
        plan_paged_attention,
        run_plan,
    )

    from batchllm.engine.attention import TorchAttention
    from batchllm.engine.attention_backend import AttentionMetadata

    rng = np.random.default_rng(0)
    n_dec, chunk, hist, ctx = (8, 16, 32, (20, 60)) if SMOKE else (256, 256, 1024, (512, 2048))
    ql = [1] * n_dec + [chunk] * 4
    sl = rng.integers(ctx[0], ctx[1] + 1, n_dec).tolist() + [hist + chunk] * 4
    pages = [(s + PAGE - 1) // PAGE for s in sl]
    kv = randn(2, sum(pages), PAGE, KVH, D)
    perm = randperm(sum(pages)).to(torch.int32)
    bt = torch.zeros(len(sl), max(pages), dtype=torch.int32)
    off = 0
    for i, p in enumerate(pages):
        bt[i, :p] = perm[off : off + p]
        off += p
    bt = bt.to(DEV)
    q = randn(sum(ql), H, D)
    meta = AttentionMetadata(torch.tensor(np.concatenate([[0], np.cumsum(ql)]), dtype=torch.int32, device=DEV),
                             torch.tensor(sl, dtype=torch.int32, device=DEV), bt,
                             torch.full((sum(ql),), -1, dtype=torch.int64, device=DEV), n_dec, ql, sl)
    plan = plan_paged_attention(ql, sl, num_heads=H, num_kv_heads=KVH, head_dim=D, device=DEV)
    one = plan_paged_attention(ql, sl, num_heads=H, num_kv_heads=KVH, head_dim=D, device=DEV,
                               tuning=AttentionTuning(one_launch=True))
    n = copies_for(kv.numel() * kv.element_size())
    kvs = [kv] + [kv.clone() for _ in range(n - 1)]
    row = {"case": f"mixed {n_dec} decodes + 4x{chunk} chunks", "kv_copies": n}
    row["triton_us"], _ = bench([lambda c=c: run_plan(q, c, bt, plan, D**-0.5) for c in kvs], reps=reps)
    row["triton_one_launch_us"], _ = bench([lambda c=c: run_plan(q, c, bt, one, D**-0.5) for c in kvs], reps=reps)
    torch_be = TorchAttention()
    row["torch_backend_us"], _ = bench([lambda: torch_be.forward(q, kv, meta, D**-0.5)], reps=max(3, reps // 4), graph=False, min_inner=3)
    ref = torch_be.forward(q, kv, meta, D**-0.5)
    row["max_abs_err"] = float((run_plan(q, kv, bt, plan, D**-0.5)[0].float() - ref.float()).abs().max())
    return row


def prefill(reps: int) -> dict:
    """One 4096-token first chunk (causal, no history) against SDPA is_causal on contiguous K/V."""
    from batchllm.kernels.paged_attention import plan_paged_attention, run_plan

    T = 64 if SMOKE else 4096
    kv = randn(2, T // PAGE, PAGE, KVH, D)
    bt = randperm(T // PAGE).to(torch.int32).view(1, -1).to(DEV)
    q = randn(T, H, D)
    plan = plan_paged_attention([T], [T], num_heads=H, num_kv_heads=KVH, head_dim=D, device=DEV)
    k = kv[0][bt[0].long()].reshape(T, KVH, D).transpose(0, 1)[None].contiguous()
    v = kv[1][bt[0].long()].reshape(T, KVH, D).transpose(0, 1)[None].contiguous()
    qt = q.transpose(0, 1)[None].contiguous()
    row = {"case": f"prefill {T} causal", "tflops_counted": 2 * 2 * T * T / 2 * H * D / 1e12}
    row["triton_us"], _ = bench([lambda: run_plan(q, kv, bt, plan, D**-0.5)], reps=reps, min_inner=5)
    row["sdpa_gqa_causal_us"], _ = bench([lambda: F.scaled_dot_product_attention(qt, k, v, is_causal=True, enable_gqa=True)], reps=reps, min_inner=5)
    ref = F.scaled_dot_product_attention(qt, k, v, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    row["max_abs_err"] = float((run_plan(q, kv, bt, plan, D**-0.5)[0].float() - ref.float()).abs().max())
    return row


def kv_store(reps: int) -> dict:
    """The KV store kernel (one step's new K/V into the paged cache) against the torch reference."""
    from batchllm.kernels.kv_store import store_kv, store_kv_ref

    T = 32 if SMOKE else 4096
    qkv = randn(T, H + 2 * KVH, D)  # k and v are strided views of a fused projection, as in the model
    kk, vv = qkv[:, H : H + KVH], qkv[:, H + KVH :]
    cache = torch.zeros(2, T // PAGE + 8, PAGE, KVH, D, device=DEV, dtype=DTYPE)
    cache_ref = cache.clone()
    slots = randperm(T).to(DEV)
    row = {"case": f"store_kv {T} tokens x{KVH}x{D}", "bytes": 4 * T * KVH * D * 2}
    row["triton_us"], _ = bench([lambda: store_kv(kk, vv, cache, slots)], reps=reps)
    row["torch_us"], _ = bench([lambda: store_kv_ref(kk, vv, cache_ref, slots)], reps=reps)
    row["triton_GBps"] = row["bytes"] / row["triton_us"] / 1e3
    row["max_abs_err"] = float((cache.float() - cache_ref.float()).abs().max())
    return row


def sampling(reps: int) -> list[dict]:
    """The sampler's Triton kernel against its torch path (``sample(backend=...)``, whole calls with their
    launch overhead, no graph) on one step's logits, and the share of rows where they pick the same token."""
    from batchllm.engine.sampler import SamplingBatch, SamplingRow, sample
    from batchllm.sampling_params import SamplingParams

    V, B = (1000, 8) if SMOKE else (128256, 256)
    # float32, as the engine hands the sampler its (penalised) logits
    logits = torch.randn(B, V, generator=DEV_GEN, device=DEV, dtype=torch.float32) * 3
    rows = []
    for label, kw in (("temperature 0.8", {}), ("top-p 0.95", dict(top_p=0.95)), ("top-k 50 + top-p 0.9", dict(top_k=50, top_p=0.9)),
                      ("min-p 0.05", dict(min_p=0.05))):
        params = SamplingParams(temperature=0.8, **kw)
        batch = SamplingBatch.build([SamplingRow(params=params, seed=i, step=0, prompt_ids=[1], output_ids=[]) for i in range(B)], V, logits.device)
        t_us, _ = bench([lambda: sample(logits, batch, backend="triton")], reps=reps, graph=False)
        r_us, _ = bench([lambda: sample(logits, batch, backend="torch")], reps=reps, graph=False)
        same = float((sample(logits, batch, backend="triton").token_ids == sample(logits, batch, backend="torch").token_ids).float().mean())
        rows.append({"case": f"sample {B}x{V} {label}", "triton_us": t_us, "torch_us": r_us, "same_tokens": same})
    return rows


# --------------------------------------------------------------------------------------------------


def main() -> int:
    global DEV, SMOKE, H, KVH, D, DEV_GEN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write all results here (rewritten after every section)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="skip the sweep and the decode cases with its best tuning")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (Triton interpreter): checks the script")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip the sections that would start after this many seconds (recorded as skipped)")
    args = ap.parse_args()
    from batchllm.kernels import runtime

    if args.smoke:
        runtime.use_interpreter(True)  # CPU tensors: the interpreter, even on a machine with a GPU
        DEV, SMOKE, H, KVH, D = "cpu", True, 4, 1, 16
    elif not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    triton, _ = runtime.load_triton()
    from batchllm.kernels.paged_attention import AttentionTuning

    t0 = time.time()
    deadline = t0 + args.budget_s if args.budget_s is not None else float("inf")
    CPU_GEN.manual_seed(0)
    DEV_GEN = CPU_GEN if DEV == "cpu" else torch.Generator(device=DEV).manual_seed(0)
    bw = copy_bandwidth(args.reps)
    name, sms = ("cpu (smoke)", 0) if SMOKE else (torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count)
    result = {"device": name, "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_TBps": bw / 1e12, "smoke": SMOKE, "budget_s": args.budget_s, "sections": {}}
    print(f"{name}: {sms} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy {bw / 1e12:.2f} TB/s (read + write)")
    _dump(result, args.json)

    cases = [GroupCase(4, 32, 16), GroupCase(3, 48, 32)] if SMOKE else [GroupCase(64, 1024), GroupCase(64, 4096), GroupCase(256, 1024)]
    best: list = [None]

    def decode_default(save):
        rows = []
        for c in cases:  # each case saved as it finishes
            rows.append(group_case(c, AttentionTuning(), args.reps, bw, full=True))
            save(rows)
        _print_decode(rows, full=True)
        return rows

    def run_sweep(save):
        rows, best[0] = sweep(args.reps, deadline)
        result["best_tuning"] = repr(best[0])
        print(f"best: {best[0]}")
        return rows

    def decode_best(save):
        rows = []
        for c in cases:
            rows.append(group_case(c, best[0], args.reps, bw, full=False))
            save(rows)
        _print_decode(rows, full=False)
        return rows

    sections = [("decode_default", decode_default),
                ("mixed", lambda save: mixed_step(args.reps)),
                ("prefill", lambda save: prefill(args.reps)),
                ("kv_store", lambda save: kv_store(args.reps)),
                ("sampling", lambda save: sampling(args.reps))]
    if not args.quick:
        sections += [("sweep", run_sweep), ("decode_best", decode_best)]
    failed = False
    for key, fn in sections:
        status = result["sections"][key] = {"status": "running", "start_s": round(time.time() - t0, 2)}
        if time.time() > deadline or (key == "decode_best" and best[0] is None):
            status["status"] = "skipped"
            status["reason"] = "budget spent" if time.time() > deadline else "no sweep result"
            print(f"\n{key}: skipped ({status['reason']})")
            _dump(result, args.json)
            continue
        print(f"\n{key}")
        t = time.time()

        def save(value, key=key):
            result[key] = value
            _dump(result, args.json)

        try:
            result[key] = fn(save)
            status["status"] = "done"
        except Exception as e:  # noqa: BLE001 - one broken section must not cost the others their figures
            import traceback

            traceback.print_exc()
            status["status"] = "error"
            status["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            failed = True
        status["wall_s"] = round(time.time() - t, 2)
        if key in ("mixed", "prefill", "kv_store", "sampling") and key in result:
            for r in result[key] if isinstance(result[key], list) else [result[key]]:
                print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
        if DEV == "cuda":
            torch.cuda.empty_cache()
        _dump(result, args.json)
    result["skipped"] = [k for k, v in result["sections"].items() if v["status"] == "skipped"]
    result["wall_s"] = time.time() - t0
    _dump(result, args.json)
    return 1 if failed else 0


def _dump(result: dict, path: str | None) -> None:
    """Write the results so far, atomically (a kill mid-write leaves the previous complete file)."""
    if path:
        import os

        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, path)


def _print_decode(rows, full: bool) -> None:
    cols = ["case", "triton_prefix_us", "triton_prefix_eager_us", "triton_plain_us", "bound_us"]
    if full:
        cols += ["sdpa_gqa_us", "sdpa_expanded_us", "torch_backend_us"]
    cols += ["max_abs_err_prefix", "max_abs_err_plain"]
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>14.4g}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols))
    for r in rows:
        if "sdpa_gqa_us" in r:
            print(f"  {r['case']}: prefix-shared {r['triton_prefix_us']:.1f} us = {r['sdpa_gqa_us'] / r['triton_prefix_us']:.2f}x "
                  f"SDPA-GQA, {r['sdpa_expanded_us'] / r['triton_prefix_us']:.2f}x SDPA-expanded, "
                  f"{r['bound_us'] / r['triton_prefix_us']:.0%} of the read-once bound; plan {r['plan']}")


if __name__ == "__main__":
    sys.exit(main())
