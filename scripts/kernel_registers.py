"""Compile batchllm's Triton kernels for sm_90 (H100/H200) on any machine, no GPU needed, and report per
kernel and config the registers per thread, spill bytes and shared memory (docs/kernels.md).

Each config is compiled with ``triton.compile`` from an ``ASTSource`` for ``GPUTarget("cuda", 90, 32)``
with the argument specialisation Triton's launcher would apply at run time (16-byte aligned pointers;
integers equal to 1 become constants and multiples of 16 get a divisibility hint, except the arguments
a kernel lists in ``do_not_specialize``). The resource figures are those of the cubin Triton built
(``cuobjdump -res-usage``, the ptxas shipped in the triton wheel made it); spills are ptxas' spill
stores + loads for the same PTX and flags (``ptxas -v``).

The kernels must be real ``JITFunction``s, not interpreter functions, so this script asks
``batchllm.kernels.runtime`` for compiled kernels before importing them; run it as its own process:

    python scripts/kernel_registers.py                # markdown table of the default (fast) set
    python scripts/kernel_registers.py --all --json out.json
    python scripts/kernel_registers.py --only attn    # configs whose name contains "attn"

Exit status 1 when a config fails to compile or spills (``--allow-spills`` reports without failing).
``tests/test_kernels_sm90_compile.py`` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice, once per process

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from batchllm.kernels.runtime import use_interpreter  # noqa: E402  (needs ROOT on sys.path)

# before Triton or any kernel module is imported: compiled kernels, not interpreter functions
use_interpreter(False)

ARCH = 90
# Llama-3-8B attention: 32 query heads, 8 KV heads, head dim 128, pages of 16 tokens, vocabulary 128256
H, KVH, D, PAGE, VOCAB = 32, 8, 128, 16, 128256


@dataclasses.dataclass
class Config:
    """One compiled variant: ``args`` maps every non-constexpr argument to a pointer type ("*bf16") or a
    representative run-time value (int / float); ``constexprs`` the constexpr arguments."""

    name: str
    kernel: str  # module:function
    args: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    default: bool = True  # in the fast set (the default test run); the rest only with --all
    why: str = ""

    @property
    def label(self) -> str:
        return self.name


# --------------------------------------------------------------------------------------------------
# the configs the engine launches
# --------------------------------------------------------------------------------------------------


def attention_configs() -> list[Config]:
    from batchllm.kernels.paged_attention import default_tiles

    import torch

    out = []

    def attn(name, dtype, heads, kv_heads, head_dim, page, tile, *, store_lse, default, why, fp8_kv=False):
        ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
        kv_ptr = "*fp8e4nv" if fp8_kv else ptr  # --kv-cache-dtype fp8: float8_e4m3fn pages
        g = heads // kv_heads
        block_d = max(16, 1 << (head_dim - 1).bit_length())
        args = dict(
            q_ptr=ptr, stride_qt=heads * head_dim, stride_qh=head_dim,
            k_ptr=kv_ptr, v_ptr=kv_ptr, stride_kp=page * kv_heads * head_dim, stride_ks=kv_heads * head_dim,
            stride_kh=head_dim,
            bt_ptr="*i32", stride_bt=70,
            work_ptr="*i32", tok_pos_ptr="*i32",
            out_ptr=ptr, stride_ot=heads * head_dim, stride_oh=head_dim,
            lse_ptr="*fp32" if store_lse else ptr, stride_lt=heads,
            part_o_ptr="*fp32", part_lse_ptr="*fp32",
            kv_scale_ptr="*fp32",  # the layer's FP8 KV scales (part_lse_ptr's float32 stand-in without fp8)
            num_heads=heads, qk_scale_log2=0.1,
        )
        const = dict(G=g, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                     PAGE_SIZE=page, STORE_LSE=store_lse, UPCAST=False,
                     DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", FP8_KV=fp8_kv)
        out.append(Config(name, "paged_attention:_attn_tiles_kernel", args, const, tile.num_warps, tile.num_stages,
                          default, why))

    wide, narrow = default_tiles(D, H // KVH, False, torch.bfloat16)
    attn(f"attn bf16 llama3-8b narrow {narrow.block_m}x{narrow.block_n}", torch.bfloat16, H, KVH, D, PAGE, narrow,
         store_lse=False, default=True, why="decodes (eager and graphed), decode part of a mixed step")
    attn(f"attn bf16 llama3-8b wide {wide.block_m}x{wide.block_n}", torch.bfloat16, H, KVH, D, PAGE, wide,
         store_lse=False, default=True, why="prefill chunks, prefix stacks, mixed steps")
    attn(f"attn bf16 fp8-kv llama3-8b narrow {narrow.block_m}x{narrow.block_n}", torch.bfloat16, H, KVH, D, PAGE, narrow,
         store_lse=False, default=True, why="decodes with --kv-cache-dtype fp8", fp8_kv=True)
    attn(f"attn bf16 fp8-kv llama3-8b wide {wide.block_m}x{wide.block_n}", torch.bfloat16, H, KVH, D, PAGE, wide,
         store_lse=False, default=True, why="prefill chunks and prefix stacks with --kv-cache-dtype fp8", fp8_kv=True)
    # the float32 test shapes (tests/test_kernels_attention.py on a GPU): heads/kv heads 2/2, 4/1, 8/1, 6/2,
    # head dims 64 and 128, pages of 4, with lse (return_lse=True)
    for heads, kv_heads in ((2, 2), (4, 1), (8, 1), (6, 2)):
        for head_dim in (64, 128):
            wide32, narrow32 = default_tiles(head_dim, -(-heads // kv_heads), False, torch.float32)
            first = (heads, kv_heads, head_dim) == (8, 1, 128)  # the largest G at the largest head dim
            tiles = [("wide=narrow", wide32)] if wide32 == narrow32 else [("wide", wide32), ("narrow", narrow32)]
            for kind, tile in tiles:
                attn(f"attn fp32 test h{heads}/{kv_heads} d{head_dim} {kind} {tile.block_m}x{tile.block_n}",
                     torch.float32, heads, kv_heads, head_dim, 4, tile, store_lse=True, default=first,
                     why="float32 tests (IEEE dot)")
    return out


def merge_configs() -> list[Config]:
    import torch

    out = []
    for dtype, label, heads, head_dim, block_h, store_lse, default in (
        (torch.bfloat16, "bf16 llama3-8b", H, D, 8, False, True),  # the engine: 8 heads per program
        (torch.float32, "fp32 test h8 d128", 8, 128, 8, True, False),
    ):
        ptr = "*bf16" if dtype == torch.bfloat16 else "*fp32"
        args = dict(part_o_ptr="*fp32", part_lse_ptr="*fp32", dst_ptr="*i32", src_start_ptr="*i32", src_ptr="*i32",
                    out_ptr=ptr, stride_ot=heads * head_dim, stride_oh=head_dim,
                    lse_ptr="*fp32" if store_lse else ptr, stride_lt=heads, num_heads=heads)
        const = dict(HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=head_dim, STORE_LSE=store_lse)
        out.append(Config(f"merge partials {label}", "paged_attention:_merge_partials_kernel", args, const, 4, 3,
                          default, "split-KV pieces and prefix/own parts"))
    args = dict(oa_ptr="*fp32", sa_t=H * D, sa_h=D, la_ptr="*fp32", sla_t=H,
                ob_ptr="*fp32", sb_t=H * D, sb_h=D, lb_ptr="*fp32", slb_t=H,
                o_ptr="*bf16", so_t=H * D, so_h=D, l_ptr="*fp32", num_heads=H)
    out.append(Config("merge two (merge_attn_states) llama3-8b", "prefix_attention:_merge_two_kernel", args,
                      dict(HEAD_DIM=D, BLOCK_H=H, BLOCK_D=D), 4, 3, False, "standalone two-way merge (tests, tools)"))
    return out


def kv_store_configs() -> list[Config]:
    out = []
    for label, ptr, cache, kvh, d, page, default in (("bf16 llama3-8b", "*bf16", "*bf16", KVH, D, PAGE, True),
                                                     ("bf16 -> fp8 llama3-8b", "*bf16", "*fp8e4nv", KVH, D, PAGE, True),
                                                     ("fp32 test", "*fp32", "*fp32", 2, 24, 4, False)):
        args = dict(k_ptr=ptr, stride_kt=(H + 2 * KVH) * D, stride_kh=d, v_ptr=ptr, stride_vt=(H + 2 * KVH) * D,
                    stride_vh=d, cache_ptr=cache, stride_c=4096 * page * kvh * d, stride_cp=page * kvh * d,
                    stride_cs=kvh * d, stride_ch=d, slot_ptr="*i64",
                    scale_ptr="*fp32" if cache == "*fp8e4nv" else "*i64",  # FP8 scales; else slot_ptr again
                    num_kv_heads=kvh)
        const = dict(PAGE_SIZE=page, HEAD_DIM=d, BLOCK_H=1 << (kvh - 1).bit_length(), BLOCK_D=1 << (d - 1).bit_length(),
                     FP8=cache == "*fp8e4nv")
        out.append(Config(f"kv store {label}", "kv_store:_store_kv_kernel", args, const, 4, 3, default,
                          "every layer of every step"))
    return out


def sampling_configs() -> list[Config]:
    out = []
    # the engine's launch: float32 logits (B, 128256), per-row parameters as views of packed columns
    for top_k, top_p, min_p in ((True, True, True), (False, False, False), (True, False, False),
                                (False, True, False), (False, False, True), (True, True, False)):
        args = dict(logits_ptr="*fp32", stride_row=VOCAB, rows_ptr="*i64", out_ptr="*i64", stride_out=1,
                    cut_ptr="*fp32", temp_ptr="*fp32", s_temp=3, seed_lo_ptr="*i64", s_lo=4, seed_hi_ptr="*i64",
                    s_hi=4, step_ptr="*i64", s_step=4, top_k_ptr="*i64" if top_k else "*fp32", s_k=4 if top_k else 0,
                    top_p_ptr="*fp32", s_p=3 if top_p else 0, log_min_p_ptr="*fp32", s_mp=3 if min_p else 0,
                    V=VOCAB)
        const = dict(HAS_TOP_K=top_k, HAS_TOP_P=top_p, HAS_MIN_P=min_p, BLOCK=512, NP=16)
        flags = "+".join(n for n, on in (("top-k", top_k), ("top-p", top_p), ("min-p", min_p)) if on) or "temperature"
        out.append(Config(f"sampling fp32 V{VOCAB} {flags}", "sampling:_sampling_kernel", args, const, 8, 3,
                          (top_k, top_p, min_p) == (True, True, True), "random rows of every sampled step"))
    return out


def int4_configs() -> list[Config]:
    """The W4A16 GEMM (kernels/int4_matmul.py) at Llama-3-8B's gate/up shape: a decode batch, a
    mid-size batch and a prefill chunk (``tiles`` picks each one's tile), group size 128 and per channel."""
    from batchllm.kernels.int4_matmul import tiles

    n, k = 28672, 4096
    out = []
    for group, zero, m, default in ((128, False, 1, True), (128, True, 64, True), (128, False, 4096, True),
                                    (k, False, 1, False), (k, True, 4096, False)):
        bm, bn, bk, warps = tiles(m, group)
        args = dict(x_ptr="*bf16", stride_xm=k, w_ptr="*i32", stride_wn=k // 8, s_ptr="*fp32",
                    z_ptr="*i8" if zero else "*fp32", stride_sn=k // group, y_ptr="*bf16", stride_ym=n, M=3, N=n, K=k)
        const = dict(GROUP_SIZE=group, HAS_ZERO=zero, UPCAST=False, DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn,
                     BLOCK_K=bk)
        label = f"int4 gemm bf16 g{group if group < k else 'channel'}{' zp' if zero else ''} M={m}"
        # num_stages 3: Triton's default, which int4_matmul's launch keeps
        out.append(Config(label, "int4_matmul:_int4_matmul_kernel", args, const, warps, 3, default,
                          "every quantized projection of a W4A16 model"))
    return out


def all_configs() -> list[Config]:
    return attention_configs() + merge_configs() + kv_store_configs() + sampling_configs() + int4_configs()


# --------------------------------------------------------------------------------------------------
# compiling
# --------------------------------------------------------------------------------------------------


def _kernel(ref: str):
    import importlib

    module, fn = ref.split(":")
    kernel = getattr(importlib.import_module(f"batchllm.kernels.{module}"), fn)
    if not hasattr(kernel, "params") or type(kernel).__name__ != "JITFunction":
        raise RuntimeError(f"{ref} is a {type(kernel).__name__}, not a JITFunction: the interpreter was decided before this script's use_interpreter(False)")
    return kernel


def specialise(kernel, cfg: Config):
    """(signature, constexprs, attrs) as Triton's launcher would build them for these argument values."""
    sig, const, attrs = {}, {}, {}
    names = [p.name for p in kernel.params]
    missing = set(names) - set(cfg.args) - set(cfg.constexprs)
    if missing or set(cfg.args) - set(names):
        raise ValueError(f"{cfg.name}: arguments do not match {kernel.__name__}: missing {sorted(missing)}, "
                         f"unknown {sorted(set(cfg.args) - set(names))}")
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = cfg.constexprs[p.name]
            continue
        v = cfg.args[p.name]
        if isinstance(v, str):  # a pointer, 16-byte aligned (torch allocations and the engine's packed sections)
            sig[p.name] = v
            if not p.do_not_specialize and not p.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if not p.do_not_specialize:
                if v == 1:
                    sig[p.name] = "constexpr"
                    const[p.name] = 1
                elif v % 16 == 0 and not p.do_not_specialize_on_alignment:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{cfg.name}: {p.name}={v!r}")
    return sig, const, attrs


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} (the triton wheel's CUDA tools)")
    return str(path)


def _ptxas_stats(ptx: str) -> dict:
    """ptxas -v on the PTX (the flags Triton's make_cubin uses, line info aside): spill stores / loads."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(ARCH).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [ptxas, "-v", f"--gpu-name=sm_{ARCH}a", str(src), "-o", str(Path(tmp) / "k.o")]
        import triton

        if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 7):
            cmd.insert(2, "--regAllocOptLevel=2")  # what triton >= 3.7 passes (a ptxas 13 workaround)
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    r = re.search(r"Used (\d+) registers", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"spill_stores": int(m.group(1)), "spill_loads": int(m.group(2)), "ptxas_registers": int(r.group(1)),
            "stack_bytes": int(stack.group(1)) if stack else 0}


def _res_usage(cubin: bytes) -> dict:
    """cuobjdump -res-usage of Triton's own cubin: REG, SHARED (static), LOCAL."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"unexpected cuobjdump output: {text[:300]}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def compile_one(cfg: Config) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"name": cfg.name, "kernel": cfg.kernel.split(":")[1], "num_warps": cfg.num_warps,
           "num_stages": cfg.num_stages, "constexprs": cfg.constexprs, "why": cfg.why, "default": cfg.default}
    t = time.perf_counter()
    try:
        kernel = _kernel(cfg.kernel)
        sig, const, attrs = specialise(kernel, cfg)
        src = ASTSource(kernel, sig, const, attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        row["compile_s"] = round(time.perf_counter() - t, 2)
        row.update(_res_usage(ck.asm["cubin"]))
        row.update(_ptxas_stats(ck.asm["ptx"]))
        row["shared"] = int(ck.metadata.shared)  # dynamic shared memory the launch requests (bytes)
        row["specialised"] = {"constexpr_ints": sorted(k for k in const if k not in cfg.constexprs),
                              "unspecialised": sorted(p.name for p in kernel.params if p.do_not_specialize)}
    except Exception as e:  # noqa: BLE001 - reported per config, the caller decides
        row["compile_s"] = round(time.perf_counter() - t, 2)
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    return row


def run(configs: list[Config], jobs: int) -> list[dict]:
    if jobs <= 1 or len(configs) <= 1:
        return [compile_one(c) for c in configs]
    import multiprocessing as mp

    # fork after the imports: each worker compiles with the parent's modules already loaded
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(compile_one, configs))


def spills(row: dict) -> int:
    return row.get("spill_stores", 0) + row.get("spill_loads", 0)


def table(rows: list[dict]) -> str:
    import triton

    lines = [f"triton {triton.__version__}, target sm_{ARCH}a (GPUTarget('cuda', {ARCH}, 32)), ptxas from the triton wheel", "",
             "| kernel / config | warps | stages | registers | spill bytes (st+ld) | stack | shared mem (bytes) | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['num_warps']} | {r['num_stages']} | ERROR: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
                     f"{r['spill_stores']}+{r['spill_loads']} | {r['stack']} | {r['shared']} | {r['compile_s']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every config (default: the fast representative set)")
    ap.add_argument("--only", help="configs whose name contains this text")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--allow-spills", action="store_true", help="report spills without failing")
    args = ap.parse_args(argv)
    configs = [c for c in all_configs() if args.all or c.default]
    if args.only:
        configs = [c for c in configs if args.only in c.name]
    t = time.perf_counter()
    rows = run(configs, args.jobs)
    print(table(rows))
    print(f"\n{len(rows)} configs in {time.perf_counter() - t:.1f} s")
    if args.json:
        import triton

        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "arch": ARCH, "rows": rows}, indent=1))
    bad = [r for r in rows if "error" in r or (spills(r) and not args.allow_spills)]
    for r in bad:
        print(f"FAIL {r['name']}: {r.get('error') or f'{spills(r)} spill bytes'}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
