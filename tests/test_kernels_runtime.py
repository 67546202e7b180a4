"""kernels/runtime.py: one decision per process where the Triton kernels run, made before Triton loads.

Each case runs in a fresh interpreter (a subprocess): the decision is per process by design, and this
test process has usually decided already.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the device decides the interpreter only without CUDA")
def test_without_cuda_the_kernels_are_interpreted_and_importing_the_runtime_changes_nothing():
    proc = run("""
        import os, sys
        from batchllm.kernels import runtime
        assert "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules  # nothing at import
        from batchllm.kernels.kv_store import _store_kv_kernel
        from triton.runtime.interpreter import InterpretedFunction
        assert runtime.interpreting() and isinstance(_store_kv_kernel, InterpretedFunction)
        try:
            runtime.use_interpreter(False)
        except RuntimeError as e:
            print("refused:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "refused: the Triton kernels already run in Triton's interpreter" in proc.stdout


def test_use_interpreter_false_gives_compiled_kernels_on_any_machine():
    proc = run("""
        from batchllm.kernels import runtime
        runtime.use_interpreter(False)
        runtime.use_interpreter(False)  # the same answer again is fine
        import triton
        from batchllm.kernels.sampling import _sampling_kernel
        assert isinstance(_sampling_kernel, triton.JITFunction) and not runtime.interpreting()
        runtime.check_device(__import__("torch").device("cuda"))
        try:
            runtime.check_device(__import__("torch").device("cpu"))
        except ValueError as e:
            print("cpu:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "cpu: cpu tensors need Triton's interpreter" in proc.stdout


def test_triton_imported_earlier_in_the_other_mode_is_one_clear_error():
    proc = run("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import triton  # its language library: interpreter functions
        from batchllm.kernels import runtime
        runtime.use_interpreter(False)
        try:
            import batchllm.kernels.paged_attention
        except RuntimeError as e:
            print("refused:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "refused: Triton was imported before batchllm.kernels.runtime decided" in proc.stdout
