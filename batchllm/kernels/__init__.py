"""Triton kernels of batchllm, importable as ``batchllm.kernels``; each module pairs a kernel with its torch reference.

The modules live in the repository's top-level ``kernels/`` folder, which deliberately has no
``__init__.py``: run from the repository root (pytest, ``python -m batchllm``) the root is on
``sys.path``, and a regular package called ``kernels`` there would shadow the PyPI package ``kernels``
that transformers imports by that name. In a checkout or an editable install this package points its
``__path__`` at that folder; a wheel installs the folder's modules here directly (``pyproject.toml``'s
``package-dir``), so this file is not part of it.

- ``paged_attention``: work-list paged attention for a whole step (decodes + prefill chunks, GQA tiles,
  split-KV, partial outputs with log-sum-exp and their merge).
- ``prefix_attention``: prefix-shared attention (Hydragen decomposition, BatchLLM horizontal fusion) and
  the two-way log-sum-exp merge.
- ``kv_store``: writes a step's new K/V into the paged cache.
- ``sampling``: sort-free sampling with the sampler's hash RNG.
- ``int4_matmul``: the W4A16 GEMM (packed int4 weights dequantized inside the K loop, group scales and
  zero points); its torch reference is ``batchllm.models.quant.int4_linear_reference``.
- ``backend``: ``TritonAttention``, the attention backend ``engine.attention.get_backend("triton")`` builds.
- ``runtime``: where the kernels run (compiled for the GPU, or Triton's interpreter without one): one
  decision per process, explicit (``use_interpreter``) or from the device, applied before Triton loads.
"""

from pathlib import Path

_SOURCE = Path(__file__).resolve().parents[2] / "kernels"
if (_SOURCE / "paged_attention.py").is_file():
    __path__ = [str(_SOURCE)]
