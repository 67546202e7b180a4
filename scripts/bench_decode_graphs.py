"""Decode-step timing with and without CUDA graphs (issue #5), on dummy weights, one GPU.

For each batch size: a decode-only step of that many sequences with ``--context`` tokens of history each
is run through the ``ModelRunner`` eagerly and as a graph replay. Reported per batch size:

  eager_ms / graph_ms     wall time of one step (input preparation + upload + forward + LM head, then a
                          device synchronisation), median over ``--reps``
  kernel_ms               device time of the graph replay alone (CUDA events): the step's GPU kernel time
                          with no launch gaps
  outside_eager / _graph  share of the step's wall time spent outside GPU kernels: 1 - kernel_ms / wall
  replay_ms               host time of ``graph.replay()`` without synchronising (launch cost)

Then a whole engine run (greedy, ignore_eos) eager vs graphs: output tokens/s and whether the tokens agree.

    python scripts/bench_decode_graphs.py --json out.json [--preset llama-3.2-1b] [--smoke]

``--smoke`` runs the same code on the CPU (tiny model, graphs in ``static`` mode) to check the script.
The JSON is rewritten (atomically) after every batch size and engine run, so a run cut off by a deadline
keeps what it finished; ``"complete"`` turns true at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

# a plain checkout (no pip install) imports batchllm from this repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        from batchllm.kernels.runtime import use_interpreter

        use_interpreter(True)  # CPU tensors: the interpreter, even on a machine with a GPU
    from batchllm.engine.attention import get_backend
    from batchllm.engine.engine import LLMEngine
    from batchllm.engine.kv_cache import KVCache
    from batchllm.engine.model_runner import ModelRunner
    from batchllm.engine.scheduler import ScheduledStep, SchedulerConfig
    from batchllm.engine.sequence import Sequence
    from batchllm.models import dummy
    from batchllm.models.llama import build_model
    from batchllm.sampling_params import SamplingParams

    dev = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    preset = "tiny" if args.smoke else args.preset
    cfg = dummy.preset_config(preset)
    model = build_model(cfg, dummy.iter_weights(cfg, 0, dtype, dev), dtype, dev)
    batches = [1, 2] if args.smoke else [int(b) for b in args.batches.split(",")]
    ctx = 24 if args.smoke else args.context
    reps = 2 if args.smoke else args.reps
    ps = 16
    max_b = max(batches)
    pages_per = -(-(ctx + 1) // ps)
    kv = KVCache(cfg, max_b * pages_per + 1, ps, dtype, dev)
    max_len = ctx + 64
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    backend_name = "torch" if args.smoke else "triton"
    runners = {
        "eager": ModelRunner(model, kv, get_backend(backend_name), dev, graphs="off", max_model_len=max_len),
        "graph": ModelRunner(model, kv, get_backend(backend_name), dev, graphs="static" if args.smoke else "cuda",
                             max_model_len=max_len, max_graph_batch=max_b),
    }
    results: dict = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "preset": preset,
                     "context": ctx, "captured": bool(runners["graph"].graphs and runners["graph"].graphs.captured),
                     "steps": [], "complete": False}
    rng = np.random.default_rng(0)
    for b in batches:
        seqs = []
        for i in range(b):
            s = Sequence(i, i, 0, rng.integers(0, cfg.vocab_size, ctx, dtype=np.int32), SamplingParams(temperature=0.0), 0, frozenset())
            s.output_ids.append(int(rng.integers(cfg.vocab_size)))
            s.num_computed = ctx
            s.pages = list(range(1 + i * pages_per, 1 + (i + 1) * pages_per))
            seqs.append(s)
        step = ScheduledStep(seqs, [1] * b, b)
        row: dict = {"batch": b}
        for name, runner in runners.items():
            for _ in range(3):
                runner.run(step)
            sync()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                runner.run(step)
                sync()
                times.append(time.perf_counter() - t0)
            row[f"{name}_ms"] = 1e3 * statistics.median(times)
        g = runners["graph"].graphs
        bucket = g.bucket_for(b) if g is not None else None
        if dev.type == "cuda" and g is not None and g.captured and bucket is not None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            kern, launch = [], []
            for _ in range(reps):
                start.record()
                t0 = time.perf_counter()
                g.run(bucket)
                launch.append(time.perf_counter() - t0)
                end.record()
                end.synchronize()
                kern.append(start.elapsed_time(end))
            row["kernel_ms"] = statistics.median(kern)
            row["replay_ms"] = 1e3 * statistics.median(launch)
            row["outside_eager"] = 1 - row["kernel_ms"] / row["eager_ms"]
            row["outside_graph"] = 1 - row["kernel_ms"] / row["graph_ms"]
        results["steps"].append(row)
        _dump(results, args.json)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    # whole engine, decode-heavy: eager vs graphs, same tokens?
    prompts = [rng.integers(0, cfg.vocab_size, int(rng.integers(16, 200)), dtype=np.int32) for _ in range(8 if args.smoke else 96)]
    params = SamplingParams(max_tokens=4 if args.smoke else 64, temperature=0.0, ignore_eos=True)
    outs = {}
    for name, graphs in (("eager", "off"), ("graph", "static" if args.smoke else "cuda")):
        kv2 = KVCache(cfg, 4096 if not args.smoke else 256, ps, dtype, dev)
        sched = SchedulerConfig(page_size=ps, max_num_batched_tokens=2048 if not args.smoke else 64, max_model_len=512)
        eng = LLMEngine(model, None, kv2, get_backend(backend_name), sched, dev, cfg.vocab_size, graphs=graphs,
                        max_graph_batch=128 if not args.smoke else 8)
        done: dict = {}
        seqs = [Sequence(i, i, 0, p, params, i, frozenset()) for i, p in enumerate(prompts)]
        eng._finalize_text = lambda seqs: None  # no tokenizer: ids only
        sync()
        t0 = time.perf_counter()
        eng.run(iter(seqs), lambda s, done=done: done.__setitem__(s.request_index, list(s.output_ids)))
        sync()
        wall = time.perf_counter() - t0
        outs[name] = done
        dec = [s for s in eng.step_stats if s.num_decodes == s.num_seqs]
        results[f"engine_{name}"] = {"seconds": wall, "tok_s": sum(len(v) for v in done.values()) / wall,
                                     "decode_steps": len(dec), "decode_step_ms": 1e3 * statistics.median(s.seconds for s in dec) if dec else None}
        _dump(results, args.json)
        print(name, results[f"engine_{name}"], flush=True)
        del eng, kv2
    same = sum(outs["eager"][i] == outs["graph"][i] for i in outs["eager"])
    results["engine_same_tokens"] = f"{same}/{len(outs['eager'])}"
    print("engine outputs identical (eager vs graphs):", results["engine_same_tokens"], flush=True)
    results["complete"] = True
    _dump(results, args.json)
    return 0


def _dump(results: dict, path: str | None) -> None:
    """Rewrite the JSON report atomically (a reader or a kill never sees half a file)."""
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
