"""Durable jobs: manifest identity, compact resume state, the status file, show, export and signal handling.

- ``manifest``: the fingerprint of what changes outputs, and the refusal that names what changed;
- ``completed``: which input rows are done, stored compactly per shard and held as bool arrays;
- ``status``: ``.status.json`` shaped like the OpenAI Batch object;
- ``show`` / ``export``: the ``batchllm show`` and ``batchllm export`` commands' logic;
- ``signals``: SIGINT / SIGTERM stop flag and ``JobInterrupted``.

The shard files and the manifest themselves are written by ``batchllm.io.writer.ShardWriter``.
"""
