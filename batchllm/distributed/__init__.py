"""Scale-out on Ray: one plan, whole prefix groups on many engine replicas, one durable job folder.

- ``assign``: group costs, cost-balanced assignment (LPT), work units, the work-stealing queue (no Ray);
- ``replica``: ``Replica``, the engine of one GPU (a Ray actor): loads the model once, runs units,
  writes each unit's shard (not committed);
- ``driver``: ``run_distributed``, called by ``pipeline`` for ``--replicas N`` / ``--ray-address``:
  starts the replicas, hands out units, commits their shards to the manifest, reschedules the work of
  failed replicas, aggregates progress and the status file.

Ray is imported lazily, by ``driver`` only: ``pip install 'batchllm[ray]'``. See docs/scale-out.md.
"""
