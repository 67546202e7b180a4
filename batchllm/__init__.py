"""batchllm: offline batch inference for large language models with global prefix sharing.

The pipeline, one sub-package per stage: ``io`` (read + validate prompt files, write Parquet shards),
``plan`` (global prefix tree, groups, order), ``engine`` (paged KV cache, token-budget scheduler,
attention backends, sampling), ``models`` (the Llama-family decoder and its weight loaders). The CLI in
``cli`` and the job driver in ``pipeline`` tie them together.
"""

__version__ = "0.1.0"
