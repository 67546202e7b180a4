"""The repository's layout against the installed world: ``kernels/`` never shadows the PyPI ``kernels``
package, and a plain checkout (no ``pip install``) runs from its root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str, *, plain_checkout: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if plain_checkout:
        # -S skips site-packages' .pth files (the editable install's finder) but then hides every
        # dependency too; instead put the checkout first and check where batchllm came from.
        env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_repository_kernels_folder_is_not_a_regular_package():
    # a kernels/__init__.py would make `import kernels` from the root pick this folder
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "paged_attention.py").is_file()


def test_transformers_hub_kernels_imports_the_real_kernels_package_from_the_root():
    pytest.importorskip("kernels")  # transformers >= 5.25 depends on it
    r = _run_from_root(
        "import kernels, transformers.integrations.hub_kernels as h; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr
    assert not Path(r.stdout.strip()).resolve().is_relative_to(ROOT), r.stdout


def test_transformers_hub_kernels_imports_inside_pytest():
    # pytest's rootdir insertion (tests/ is a package) is the path that broke the suite
    kernels = pytest.importorskip("kernels")
    import transformers.integrations.hub_kernels  # noqa: F401

    assert not Path(kernels.__file__).resolve().is_relative_to(ROOT)


def test_batchllm_kernels_resolve_to_the_checkout_folder():
    r = _run_from_root("import batchllm, batchllm.kernels.backend as b; print(batchllm.__file__); print(b.__file__)",
                       plain_checkout=True)
    assert r.returncode == 0, r.stderr
    pkg, backend = (Path(line) for line in r.stdout.split())
    assert pkg.resolve() == ROOT / "batchllm" / "__init__.py"
    assert backend.resolve() == ROOT / "kernels" / "backend.py"


def test_python_dash_m_batchllm_runs_from_the_root():
    r = subprocess.run([sys.executable, "-m", "batchllm", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "run" in r.stdout
