"""``.status.json``: the job's live state, shaped like the OpenAI Batch object, rewritten atomically.

Hidden (a leading ``.``) so dataset readers pointed at the job folder skip it; a folder of an earlier
version has ``status.json`` (``LEGACY_STATUS``), still read when there is no new one.

Fields follow the OpenAI Batch object (``id``, ``object: "batch"``, ``endpoint``, ``input_file_id``,
``completion_window``, ``status``, ``output_file_id``, ``error_file_id``, ``created_at``,
``in_progress_at``, ``expires_at``, ``finalizing_at``, ``completed_at``, ``failed_at``, ``expired_at``,
``cancelling_at``, ``cancelled_at``, ``request_counts {total, completed, failed}``, ``metadata``,
``errors``), timestamps in integer Unix seconds. ``status`` is one of ``in_progress``, ``completed``,
``failed`` (a job-level failure: its message is in ``errors``) or ``cancelled`` (stopped by a signal).
batchllm's own figures live under ``batchllm``: tokens done, samples, committed shards, throughput and
an ETA; in a distributed run also ``replicas``, one entry per engine replica. Live figures, advancing
while requests run (not only when they finish): ``generated_tokens`` (output tokens generated so far,
running requests and earlier runs' finished samples included), ``prompt_tokens_computed`` (prompt
tokens the engine computed in this run: prefill, shared prefixes once) and ``progress`` (the share of
this run's output token budget done, each sample's max_tokens; None in a distributed run).

``request_counts`` include requests finished in earlier runs of the job (resume), and count a request
as completed as soon as its samples are done, committed or still buffered; ``batchllm.committed``
counts what is durably on disk. Tokens and samples also cover earlier runs; throughput and the ETA
count this run's generation phase only: the throughput from ``generated_tokens``, the ETA from
``progress`` when there is one (it moves even when every request runs at once and none has finished),
else from the request rate.

The folder may be a path or a URI (``batchllm.io.storage``): the file is replaced whole either way.

``StatusFile.update`` is cheap to call every engine step: it rewrites the file at most every
``interval`` seconds (``force`` for state changes). A failure to write it (disk full) is ignored here:
the next shard commit reports the problem with a clear message, and a status file is never worth
failing a job over.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from batchllm.errors import BatchLLMError
from batchllm.io.storage import storage_of
from batchllm.io.writer import LEGACY_STATUS, STATUS

IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "in_progress", "completed", "failed", "cancelled"
WRITE_INTERVAL_S = 2.0  # the most often ``update`` rewrites the file (tests lower it)


class StatusFile:
    def __init__(self, output_dir: str, job_id: str, created_at: float, inputs: list[str], model: str,
                 interval: float | None = None):
        self.storage = storage_of(output_dir)
        self.path = self.storage.display(STATUS)
        self.interval = WRITE_INTERVAL_S if interval is None else interval
        self._last_write = 0.0
        now = time.time()
        self.t_start = now
        self.obj: dict[str, Any] = {
            "id": f"batch_{job_id}",
            "object": "batch",
            "endpoint": "batchllm",
            "errors": None,
            "input_file_id": ",".join(inputs),
            "completion_window": None,
            "status": IN_PROGRESS,
            "output_file_id": output_dir,
            "error_file_id": None,
            "created_at": int(created_at),
            "in_progress_at": int(now),
            "expires_at": None,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": {"model": model},
            "batchllm": {
                "stage": "starting",
                "pid": os.getpid(),
                "updated_at": now,
                "committed": {"shards": 0, "rows": 0},
                "samples": 0,
                "tokens": {"prompt": 0, "completion": 0, "cached": 0},
                "generated_tokens": 0,
                "prompt_tokens_computed": 0,
                "progress": None,
                "done_before_this_run": 0,
                "throughput": {"output_tok_s": 0.0, "requests_s": 0.0},
                "eta_seconds": None,
                "eta_at": None,
            },
        }
        self._gen_start: float | None = None
        self._done_at_gen_start = 0
        self._tok_at_gen_start = 0

    # ------------------------------------------------------------------------------------------ updates

    def set_counts(self, *, total: int | None = None, completed: int | None = None, failed: int | None = None) -> None:
        rc = self.obj["request_counts"]
        for key, value in (("total", total), ("completed", completed), ("failed", failed)):
            if value is not None:
                rc[key] = int(value)

    def set_replicas(self, replicas: list[dict[str, Any]]) -> None:
        """A distributed run's replicas (``batchllm.replicas``): state, node, device, units and requests
        done; request_counts and tokens already aggregate over them."""
        self.obj["batchllm"]["replicas"] = replicas

    def generation_started(self, done_before: int) -> None:
        """Mark the start of the engine phase; the throughput and ETA count from here."""
        self._gen_start = time.time()
        self._done_at_gen_start = self.done
        self._tok_at_gen_start = self._generated()
        self.obj["batchllm"]["done_before_this_run"] = done_before
        self.obj["batchllm"]["stage"] = "generating"

    @property
    def done(self) -> int:
        rc = self.obj["request_counts"]
        return rc["completed"] + rc["failed"]

    def update(self, *, stage: str | None = None, samples: int | None = None, tokens: dict[str, int] | None = None,
               committed: dict[str, int] | None = None, progress: dict[str, Any] | None = None,
               force: bool = False) -> None:
        """``progress``: the live figures (``generated_tokens``, ``prompt_tokens_computed``, and
        ``fraction``, the share of the run's output token budget done)."""
        b = self.obj["batchllm"]
        if stage is not None:
            b["stage"] = stage
        if samples is not None:
            b["samples"] = samples
        if tokens is not None:
            b["tokens"].update(tokens)
        if committed is not None:
            b["committed"].update(committed)
        if progress is not None:
            b["generated_tokens"] = int(progress.get("generated_tokens") or 0)
            b["prompt_tokens_computed"] = int(progress.get("prompt_tokens_computed") or 0)
            if progress.get("fraction") is not None:
                b["progress"] = round(min(1.0, float(progress["fraction"])), 4)
        now = time.time()
        if force or now - self._last_write >= self.interval:
            self._refresh_rates(now)
            self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        """Final state: ``completed``, ``failed`` (with the job-level ``error``) or ``cancelled``."""
        now = int(time.time())
        self.obj["status"] = status
        self.obj["batchllm"]["stage"] = status
        if status == COMPLETED:
            self.obj["finalizing_at"] = self.obj["finalizing_at"] or now
            self.obj["completed_at"] = now
            self.obj["batchllm"]["eta_seconds"] = 0
        elif status == FAILED:
            self.obj["failed_at"] = now
            self.obj["errors"] = {"object": "list", "data": [{"code": "job_failed", "message": error or "", "param": None, "line": None}]}
        elif status == CANCELLED:
            self.obj["cancelling_at"] = self.obj["cancelling_at"] or now
            self.obj["cancelled_at"] = now
        self._refresh_rates(time.time())
        self.write()

    def write(self) -> None:
        self.obj["batchllm"]["updated_at"] = time.time()
        self._last_write = time.time()
        try:
            self.storage.replace(STATUS, json.dumps(self.obj, indent=1).encode())
        except OSError:
            pass  # see the module docstring: the shard commits report disk problems

    def _refresh_rates(self, now: float) -> None:
        b = self.obj["batchllm"]
        if self._gen_start is None:
            return
        dt = now - self._gen_start
        if dt <= 0:
            return
        done_now = self.done - self._done_at_gen_start
        rate = done_now / dt
        b["throughput"] = {"output_tok_s": round((self._generated() - self._tok_at_gen_start) / dt, 2), "requests_s": round(rate, 3)}
        remaining = self.obj["request_counts"]["total"] - self.done
        frac = b.get("progress")
        if remaining <= 0:
            b["eta_seconds"], b["eta_at"] = 0, int(now)
        elif frac is not None and 0 < frac < 1:  # the output token budget: it moves while requests run
            eta = dt * (1 - frac) / frac
            b["eta_seconds"], b["eta_at"] = round(eta, 1), int(now + eta)
        elif rate > 0:
            eta = remaining / rate
            b["eta_seconds"], b["eta_at"] = round(eta, 1), int(now + eta)

    def _generated(self) -> int:
        b = self.obj["batchllm"]
        return max(b["tokens"]["completion"], b.get("generated_tokens") or 0)


def read_status(output_dir: str) -> dict[str, Any] | None:
    """The folder's status file, or None if absent or unreadable (it is rewritten atomically, so a
    partial file is never seen; a missing one means the job has not started)."""
    try:
        storage = storage_of(output_dir)
        data = storage.read_bytes(STATUS)
        if data is None:
            data = storage.read_bytes(LEGACY_STATUS)
        return json.loads(data) if data is not None else None
    except (OSError, ValueError, BatchLLMError):  # BatchLLMError: a URI naming no usable filesystem
        return None
