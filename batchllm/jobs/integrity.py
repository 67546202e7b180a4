"""Integrity of a job folder on read, and its repair.

Every shard the manifest lists must exist and match what the manifest recorded when it was committed:
- the fast check (``run``, ``resume``, ``show`` by default): its size, from one listing of the folder
  (shards committed before sizes were recorded: that the file exists);
- the full check (``export`` always; ``show --verify``, ``resume --verify`` / ``--repair``): its size
  and the sha256 of its bytes, reading every shard once.

A damaged job (a listed shard missing, truncated, replaced or with a flipped bit) is reported in one
line (``DamagedJob``, from ``batchllm.io.writer``: ``read_results(verify=True)`` raises it too) that names the shards and how to repair it: ``batchllm resume DIR --repair`` drops
the damaged shards from the manifest (``repair_job``), so the resume reruns exactly their rows. The
repair also clears the manifest's ``read_complete`` flag: the resume then reads every input row again
(and skips the finished ones), so a dropped error record (a duplicate ``custom_id``, say) is produced
again exactly as the first run produced it.

A listed shard may still sit under its hidden pending name (``batchllm.io.writer.pending_name``: the
process was killed between the manifest write and the rename): it is committed, checked and read under
that name, and the next writer renames it (``pending_shards`` names them, for ``show``).

``unlisted_shards`` names visible shard files the manifest does not list: left by an earlier version
killed between a shard's rename and its manifest write (this version lists a shard before it becomes
visible). batchllm never reads them (not done, so their rows are redone) and the next ``run`` /
``resume`` in the folder deletes them; until then dataset readers pointed at the folder do read them.
``show`` reports them while no job runs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from batchllm.errors import BatchLLMError
from batchllm.io.storage import Storage, storage_of
from batchllm.io.writer import (
    _SHARD_RE,
    DamagedJob,
    claim_job_folder,
    lock_folder,
    pending_name,
    read_shard_bytes,
    shard_bytes_problem,
    store_manifest,
)
from batchllm.jobs.manifest import read_manifest


@dataclasses.dataclass
class Damage:
    file: str
    rows: int
    reason: str  # "missing", "12 bytes, the manifest records 3,456", "sha256 differs from the manifest's"


def check_shards(output_dir: str | Storage, manifest: dict[str, Any], full: bool = False) -> list[Damage]:
    """The listed shards that fail the fast check (existence and size) or, with ``full``, the sha256
    check too. Raises OSError when the folder cannot be listed or read."""
    storage = storage_of(output_dir)
    sizes = storage.sizes()
    damaged = []
    for entry in manifest.get("shards") or []:
        name = entry.get("file")
        size = sizes.get(pending_name(name), sizes.get(name))  # committed, maybe not renamed yet
        if size is None and name is not None:  # the listing may have raced the rename: look again
            data = read_shard_bytes(storage, name)
            size = None if data is None else len(data)
        reason = _fast_problem(entry, size)
        if reason is None and full:
            reason = shard_bytes_problem(entry, read_shard_bytes(storage, name))
        if reason is not None:
            damaged.append(Damage(str(name), int(entry.get("rows") or 0), reason))
    return damaged


def _fast_problem(entry: dict[str, Any], size: int | None) -> str | None:
    if size is None:
        return "missing"
    want = entry.get("bytes")
    if want is not None and size != want:
        return f"{size:,} bytes, the manifest records {want:,}"
    return None


def damage_message(output_dir: str, damaged: list[Damage], total: int) -> str:
    """One line: which shards are damaged, how many rows that loses, and the repair command."""
    shown = "; ".join(f"{d.file}: {d.reason}" for d in damaged[:3])
    more = f"; {len(damaged) - 3} more" if len(damaged) > 3 else ""
    rows = sum(d.rows for d in damaged)
    which = "shard is" if total == 1 else "shards are"
    return (f"{output_dir} is damaged: {len(damaged)} of {total} committed {which} not as the manifest records "
            f"({shown}{more}), {rows:,} rows; repair with: batchllm resume {output_dir} --repair "
            "(drops the damaged shards from the manifest and reruns exactly their rows)")


def verify_job(output_dir: str, manifest: dict[str, Any] | None = None, full: bool = False) -> None:
    """Raise ``DamagedJob`` (one line, with the repair command) when a listed shard fails the check;
    BatchLLMError when the folder cannot be read."""
    storage = storage_of(output_dir)
    if manifest is None:
        manifest = read_manifest(storage)
        if manifest is None:
            raise BatchLLMError(f"{output_dir} holds no batchllm job (no .manifest.json)")
    try:
        damaged = check_shards(storage, manifest, full)
    except OSError as e:
        raise BatchLLMError(f"cannot read {output_dir}: {e.strerror or e}") from None
    if damaged:
        raise DamagedJob(damage_message(output_dir, damaged, len(manifest["shards"])))


def unlisted_shards(output_dir: str | Storage, manifest: dict[str, Any]) -> list[str]:
    """Visible shard files in the folder that the manifest does not list (orphans of an earlier
    version's interrupted commit)."""
    listed = {s.get("file") for s in manifest.get("shards") or []}
    try:
        names = storage_of(output_dir).names()
    except OSError:
        return []
    return sorted(n for n in names if _SHARD_RE.match(n) and n not in listed)


def pending_shards(output_dir: str | Storage, manifest: dict[str, Any]) -> list[str]:
    """Listed shards still under their pending name only (a kill between the manifest write and the
    rename): committed, but invisible to dataset readers until the next writer renames them."""
    try:
        names = set(storage_of(output_dir).names())
    except OSError:
        return []
    files = [s.get("file") for s in manifest.get("shards") or []]
    return [f for f in files if f and pending_name(f) in names and f not in names]


def repair_job(output_dir: str) -> list[Damage]:
    """Drop the shards that fail the full check from the manifest (under the folder's lock) and delete
    their files, so that a resume reruns exactly their rows; returns what was dropped (empty: nothing to
    repair). BatchLLMError when the folder holds no job or is locked by a running job."""
    storage = storage_of(output_dir)
    if read_manifest(storage) is None:
        raise BatchLLMError(f"{output_dir} holds no batchllm job to repair (no .manifest.json)")
    lock = lock_folder(storage, output_dir)
    try:
        manifest = read_manifest(storage)  # again, under the lock
        if manifest is None:
            raise BatchLLMError(f"{output_dir} holds no batchllm job to repair (no .manifest.json)")
        claim_job_folder(storage)  # a job folder: the damaged shards are batchllm's to delete
        damaged = check_shards(storage, manifest, full=True)
        if not damaged:
            return []
        bad = {d.file for d in damaged}
        manifest["shards"] = [s for s in manifest["shards"] if s.get("file") not in bad]
        manifest["read_complete"] = False  # the resume reads every row again (see the module docstring)
        manifest.setdefault("repairs", []).append(
            {"at": time.time(), "dropped": sorted(bad), "rows": sum(d.rows for d in damaged),
             "reasons": {d.file: d.reason for d in damaged}})
        manifest["updated_at"] = time.time()
        lock.check()
        for name in bad:  # first: a kill before the manifest write leaves them listed and missing (repair
            storage.remove(name)  # again), never visible and unlisted, where dataset readers would read them
            storage.remove(pending_name(name))
        store_manifest(storage, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return damaged
    except OSError as e:
        raise BatchLLMError(f"cannot repair {output_dir}: {e.strerror or e}") from None
    finally:
        lock.release()
