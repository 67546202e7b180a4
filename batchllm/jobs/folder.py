"""Opening a job's output folder: start fresh, resume, or refuse.

``open_job_folder`` takes the folder's lock first (one writer per folder: an ``flock`` on a local
folder, a lease object on an object store; see ``batchllm.io.storage``), then looks at the manifest:
- none: a new job;
- present and ``overwrite``: a new job starts; the ``ShardWriter`` replaces the old manifest and then
  deletes the previous job's shards (nothing is removed here);
- present with the same fingerprint: the job resumes; ``done`` says which input rows are finished;
  first every listed shard passes the fast integrity check (``batchllm.jobs.integrity``: it exists with
  its recorded size), else ``DamagedJob`` says how to repair it;
- present with a different fingerprint: ``BatchLLMError`` naming what changed.

Nothing in the folder is deleted or replaced before the ``ShardWriter`` has claimed it
(``batchllm.io.writer.claim_job_folder``: refuses an input inside the folder and a folder that is not a
job folder but holds files named like batchllm's, then marks it).

``read_complete`` (a manifest flag the pipeline sets once every input row was read and every error
record the readers produced was committed) lets a resume skip finished rows without even parsing them:
all cross-row state the readers keep (duplicate ``custom_id`` detection) was settled by then, because a
duplicate of any row is itself a finished (error) row. Before that point a resume reads everything
again and only filters finished rows out afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from batchllm.errors import BatchLLMError
from batchllm.io.storage import FolderLock, Lease, storage_of
from batchllm.io.writer import lock_folder
from batchllm.jobs.completed import CompletedSet
from batchllm.jobs.integrity import verify_job
from batchllm.jobs.manifest import check_same_job, read_manifest


@dataclasses.dataclass
class JobFolder:
    output_dir: str  # a path or a URI, as given
    lock: FolderLock | Lease
    manifest: dict[str, Any] | None  # None: a new job
    done: CompletedSet

    @property
    def resuming(self) -> bool:
        return self.manifest is not None

    @property
    def read_complete(self) -> bool:
        return bool(self.manifest and self.manifest.get("read_complete"))

    def skip_masks(self, inputs: list[str]) -> list[np.ndarray | None] | None:
        """Per input file, the bool array of rows a reader may skip unread; None when it may not.

        Inputs match the manifest's by position (the fingerprint compared their contents), so a job
        whose input files moved still resumes."""
        if not self.read_complete:
            return None
        return [self.done.array(i) for i in range(len(inputs))]


def open_job_folder(output_dir: str, fingerprint: dict[str, Any], overwrite: bool = False) -> JobFolder:
    """Lock the folder (a path or a URI) and decide: new job, resume, or refuse (BatchLLMError)."""
    storage = storage_of(output_dir)
    try:
        storage.ensure_folder()
    except OSError as e:
        raise BatchLLMError(f"cannot create output folder {output_dir}: {e.strerror or e}") from None
    if not storage.writable():
        raise BatchLLMError(f"cannot write to output folder {output_dir}: permission denied")
    lock = lock_folder(storage, output_dir)
    try:
        if overwrite:  # the writer replaces the manifest, then deletes the old shards (claimed folders only)
            return JobFolder(output_dir, lock, None, CompletedSet())
        manifest = read_manifest(storage)
        if manifest is None:
            return JobFolder(output_dir, lock, None, CompletedSet())
        check_same_job(manifest, fingerprint, output_dir)
        verify_job(output_dir, manifest, full=False)  # a lost or damaged shard: DamagedJob, with the repair
        return JobFolder(output_dir, lock, manifest, CompletedSet.from_shards(manifest["shards"]))
    except BaseException:
        lock.release()
        raise
