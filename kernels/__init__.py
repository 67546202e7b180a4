"""Triton kernels of batchllm (installed as ``batchllm.kernels``); each module pairs a kernel with its torch reference.

- ``paged_attention``: work-list paged attention for a whole step (decodes + prefill chunks, GQA tiles,
  split-KV, partial outputs with log-sum-exp and their merge).
- ``prefix_attention``: prefix-shared attention (Hydragen decomposition, BatchLLM horizontal fusion) and
  the two-way log-sum-exp merge.
- ``kv_store``, ``rmsnorm``, ``rope``, ``activation``: the step's elementwise kernels.
- ``backend``: ``TritonAttention``, registered as attention backend "triton" when imported.

Without a CUDA device the kernels can only run in Triton's interpreter, which Triton selects when a
kernel is defined (imported); so importing this package on such a machine turns the interpreter on
unless TRITON_INTERPRET is already set.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
