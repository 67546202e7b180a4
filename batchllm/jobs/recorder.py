"""Between the engine and the shard writer: whole requests out, live counts into the status file.

The engine finishes samples one at a time and in any order; a request with ``n`` samples goes to the
writer only when its last sample is done (``ShardWriter.add_request``), so a committed shard never holds
part of a request and resume can treat "in a committed shard" as "done". Samples of unfinished requests
are simply lost when the job stops: resume redoes the whole request, and the per-sample seeds make the
redone samples identical.

The recorder also keeps the OpenAI-style request counts (earlier runs included) and the token totals,
and forwards them to ``StatusFile`` (which throttles its own writes). Tokens of finished samples are
counted as they finish; ``engine_step`` adds the live figures of every engine step (output tokens
generated and prompt tokens computed, requests still running included, and how much of the output
token budget is done), so .status.json and ``batchllm show`` advance while requests run, not only when
they finish. In a distributed run
(``batchllm.distributed``) the replicas build whole-request shards themselves; the driver commits them
and counts them here with ``add_committed``, plus their running units' counts as ``live``.
"""

from __future__ import annotations

from typing import Any

from batchllm.io.writer import ShardWriter, committed_totals
from batchllm.jobs.status import StatusFile


class ResultRecorder:
    def __init__(self, writer: ShardWriter, status: StatusFile):
        self.writer = writer
        self.status = status
        before = committed_totals(writer.manifest)
        self.done_before = before["completed"] + before["failed"]
        self.completed = before["completed"]
        self.failed = before["failed"]
        self.samples = before["samples"]
        self.tokens = {"prompt": before["prompt_tokens"], "completion": before["completion_tokens"], "cached": before["cached_tokens"]}
        self.generated = 0  # output tokens generated in this run, running requests included (engine_step)
        self.prompt_computed = 0  # prompt tokens the engine computed in this run (prefill)
        self.fraction: float | None = None  # share of this run's output token budget done
        self._completion_before = before["completion_tokens"]
        self._pending: dict[int, list[dict[str, Any]]] = {}  # request index -> finished samples so far
        status.set_counts(completed=self.completed, failed=self.failed)

    def error(self, row: dict[str, Any]) -> None:
        self.writer.add(row)
        self.failed += 1
        self.status.set_counts(failed=self.failed)

    def sample(self, request_index: int, n: int, row: dict[str, Any]) -> None:
        rows = self._pending.setdefault(request_index, [])
        rows.append(row)
        self.samples += 1
        self.tokens["prompt"] += row.get("prompt_tokens") or 0
        self.tokens["completion"] += row.get("completion_tokens") or 0
        self.tokens["cached"] += row.get("cached_tokens") or 0
        if len(rows) == n:
            del self._pending[request_index]
            rows.sort(key=lambda r: r["sample_index"])
            self.writer.add_request(rows)
            self.completed += 1
            self.status.set_counts(completed=self.completed)

    def engine_step(self, new_tokens: int, prompt_tokens: int, fraction: float | None = None) -> None:
        """One engine step's live figures: output tokens sampled, prompt tokens computed, and the share
        of the run's output token budget done (``pipeline.token_budget``)."""
        self.generated += new_tokens
        self.prompt_computed += prompt_tokens
        if fraction is not None:
            self.fraction = fraction

    def add_committed(self, entry: dict[str, Any]) -> None:
        """Count a shard another process wrote and the writer just committed (``commit_entries``):
        the distributed driver's replicas bypass ``sample`` / ``error``."""
        req = entry.get("requests") or {}
        tok = entry.get("tokens") or {}
        self.completed += req.get("completed", 0)
        self.failed += req.get("failed", 0)
        self.samples += entry.get("samples", 0)
        for k in self.tokens:
            self.tokens[k] += tok.get(k, 0)
        self.status.set_counts(completed=self.completed, failed=self.failed)

    def update_status(self, stage: str | None = None, force: bool = False, live: dict[str, int] | None = None) -> None:
        """Push the counts to .status.json; ``live`` adds work done but not yet committed elsewhere
        (replicas' running units: requests, samples, prompt / completion / cached tokens)."""
        m = self.writer.manifest
        live = live or {}
        if live:
            self.status.set_counts(completed=self.completed + live.get("requests", 0))
        tokens = {k: v + live.get(k, 0) for k, v in self.tokens.items()}
        self.status.update(
            stage=stage,
            samples=self.samples + live.get("samples", 0),
            tokens=tokens,
            committed={"shards": len(m["shards"]), "rows": sum(s["rows"] for s in m["shards"])},
            progress={"generated_tokens": max(tokens["completion"], self._completion_before + self.generated),
                      "prompt_tokens_computed": self.prompt_computed, "fraction": self.fraction},
            force=force,
        )

    @property
    def pending_requests(self) -> int:
        return len(self._pending)
