"""Quantized GEMMs against the bf16 matmul in the same run (issue 18): int4 W4A16 and FP8 W8A8.

For each layer of Llama-3-8B and Llama-3-70B (fused qkv, o, fused gate/up, down) and each batch of
``--batches`` token rows, the median device time (CUDA events, ``--reps`` launches after warm-up) of:

  bf16_us    ``F.linear`` on bf16 weights (cuBLAS)
  int4_us    ``kernels/int4_matmul`` on packed int4 weights, group size 128 (dequantized in the GEMM)
  fp8_us     ``Fp8Linear``: per-token FP8 quantization of x + ``torch._scaled_mm`` with row-wise scales
             (sm_90+; null where the device has no row-wise FP8 GEMM)

and the speed-ups over bf16. The MARLIN paper reports ~3.9x for int4 at small batches (the weights'
bytes dominate). Random weights: timing only. ``--smoke`` runs tiny shapes on the CPU (Triton's
interpreter, the FP8 reference) to check the script. The JSON is rewritten atomically after every
layer, so a run cut off by a deadline keeps what it finished; ``"complete"`` turns true at the end.

    python scripts/bench_quant.py --json out.json [--budget-s 60] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# a plain checkout (no pip install) imports batchllm from this repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (out_features, in_features) of each projection, fused as batchllm runs them
SHAPES = {
    "llama-3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "llama-3-70b": {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)},
}
SMOKE_SHAPES = {"tiny": {"qkv": (48, 256), "down": (32, 256)}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new layers after this many seconds")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        from batchllm.kernels.runtime import use_interpreter

        use_interpreter(True)  # CPU tensors: the interpreter, even on a machine with a GPU
    from batchllm.kernels.int4_matmul import int4_matmul
    from batchllm.models.layers import Fp8Linear, _has_fp8_rowwise_mm

    dev = "cpu" if args.smoke else "cuda"
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    batches = [1, 4] if args.smoke else [int(b) for b in args.batches.split(",")]
    reps = 2 if args.smoke else args.reps
    fp8_ok = not args.smoke and _has_fp8_rowwise_mm(torch.cuda.current_device())
    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)", "torch": torch.__version__,
               "group_size": 128, "reps": reps, "fp8_rowwise_mm": fp8_ok, "rows": [], "complete": False}
    start = time.perf_counter()
    for model, layers in shapes.items():
        for layer, (N, K) in layers.items():
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                results["stopped"] = f"budget of {args.budget_s} s spent before {model} {layer}"
                _dump(results, args.json)
                return 0
            g = torch.Generator(device=dev).manual_seed(0)
            w = torch.randn(N, K, device=dev, generator=g, dtype=torch.float32).to(torch.bfloat16) * 0.02
            packed = torch.randint(-2**31, 2**31 - 1, (N, K // 8), device=dev, generator=g, dtype=torch.int64).to(torch.int32)
            scale = torch.rand(N, K // 128, device=dev, generator=g) * 0.01
            fp8 = Fp8Linear(K, N).to(dev)
            with torch.no_grad():
                fp8.weight.copy_((w.float() * 20).to(torch.float8_e4m3fn))
                fp8.weight_scale.fill_(0.05)
            for M in batches:
                x = torch.randn(M, K, device=dev, generator=g, dtype=torch.float32).to(torch.bfloat16)
                row = {"model": model, "layer": layer, "N": N, "K": K, "M": M,
                       "bf16_us": _time(lambda: torch.nn.functional.linear(x, w), reps, dev),
                       "int4_us": _time(lambda: int4_matmul(x, packed, scale, None), reps, dev),
                       "fp8_us": _time(lambda: fp8(x), reps, dev) if fp8_ok or args.smoke else None}
                row["int4_speedup"] = round(row["bf16_us"] / row["int4_us"], 3)
                row["fp8_speedup"] = round(row["bf16_us"] / row["fp8_us"], 3) if row["fp8_us"] else None
                results["rows"].append(row)
                print(f"{model:12s} {layer:8s} M={M:4d}  bf16 {row['bf16_us']:9.1f} us  int4 {row['int4_us']:9.1f} us "
                      f"({row['int4_speedup']:.2f}x)  fp8 {row['fp8_us'] or float('nan'):9.1f} us "
                      f"({row['fp8_speedup'] or float('nan'):.2f}x)", flush=True)
            _dump(results, args.json)
            del w, packed, scale, fp8
    results["complete"] = True
    _dump(results, args.json)
    return 0


def _time(fn, reps: int, dev: str) -> float:
    """Median microseconds of ``fn`` over ``reps`` runs after 3 warm-ups (CUDA events on a GPU)."""
    for _ in range(3 if dev == "cuda" else 1):
        fn()
    times = []
    for _ in range(reps):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return round(statistics.median(times), 2)


def _dump(results: dict, path: str | None) -> None:
    """Rewrite the JSON report atomically (``bench.report.write_json``: a reader or a kill never sees half
    a file); no path, no file."""
    if path:
        from batchllm.bench.report import write_json

        write_json(results, path)


if __name__ == "__main__":
    sys.exit(main())
