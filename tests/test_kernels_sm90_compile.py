"""Every Triton kernel the engine launches compiles for sm_90 (H100/H200) without a GPU, and none spills.

The compile runs ``scripts/kernel_registers.py`` in its own process (compiled kernels there,
``kernels/runtime.py``: they must be real JITFunctions, and this test process may already hold interpreter ones). The default
run compiles a representative set (the Llama-3-8B bf16 narrow and wide attention tiles the default
tuning picks, the float32 test tile, the merge, the KV store and the sampling kernel with every filter);
``BATCHLLM_SM90_ALL=1`` compiles every config (all float32 test shapes and sampling variants, ~30 s
cold on 2 cores). Triton's cache (~/.triton/cache or TRITON_CACHE_DIR) makes reruns fast.

    python tests/test_kernels_sm90_compile.py --table   # the markdown table of docs/kernels.md (all configs)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kernel_registers.py"


def _missing_backend() -> str | None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"triton's CUDA backend is not installed ({e})"
    try:
        path = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001
        return f"ptxas not found ({e})"
    if not path or not os.path.isfile(path):
        return f"ptxas not found at {path!r}"
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
        return "cuobjdump missing from the triton wheel"
    return None


def compile_kernels(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "regs.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--jobs", str(min(8, os.cpu_count() or 1)),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if not out.is_file():
        pytest.fail(f"kernel_registers.py wrote nothing (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    rows = result["rows"]
    errors = [f"{r['name']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "compile errors for sm_90:\n" + "\n".join(errors)
    spilled = [f"{r['name']}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads, "
               f"{r['registers']} registers" for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "register spills on sm_90:\n" + "\n".join(spilled)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return result


pytestmark = pytest.mark.skipif(_missing_backend() is not None, reason=str(_missing_backend()))


def test_engine_kernels_compile_for_sm90_without_spills(tmp_path):
    result = compile_kernels(tmp_path)
    rows = {r["name"]: r for r in result["rows"]}
    kernels = {r["kernel"] for r in rows.values()}
    assert {"_attn_tiles_kernel", "_merge_partials_kernel", "_store_kv_kernel", "_sampling_kernel", "_int4_matmul_kernel"} <= kernels
    attn = [r for r in rows.values() if r["kernel"] == "_attn_tiles_kernel"]
    assert any("bf16 llama3-8b narrow" in r["name"] for r in attn) and any("bf16 llama3-8b wide" in r["name"] for r in attn)
    assert any("fp32" in r["name"] for r in attn)
    for r in rows.values():
        assert 0 < r["registers"] <= 255 and r["shared"] <= 227 * 1024, r  # sm_90: 227 KB per block
    # the block-table width is left unspecialised (one variant for every eager step)
    assert all(r["specialised"]["unspecialised"] == ["stride_bt"] for r in attn)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BATCHLLM_SM90_ALL") != "1", reason="every config: set BATCHLLM_SM90_ALL=1 (~30 s cold)")
def test_every_kernel_config_compiles_for_sm90_without_spills(tmp_path):
    result = compile_kernels(tmp_path, "--all")
    assert len(result["rows"]) >= 20


if __name__ == "__main__":
    if "--table" in sys.argv:
        sys.exit(subprocess.call([sys.executable, str(SCRIPT), "--all", "--allow-spills"], cwd=ROOT))
    sys.exit(pytest.main([__file__, "-q"]))
