"""Failure paths of the Ray driver (batchllm.distributed), on a local Ray with 2 CPU replicas of
dummy:tiny, faults injected through the replicas' hooks (``Faults``, a ``ReplicaHooks``): engine
errors retried on the other replica and a replica retired after failing unit after unit, a poison group
that becomes ``engine_error`` rows after its attempts (replicas kept in service), a replica that cannot
start followed by every replica lost (committed results kept, resumable), and prompts longer than a
replica's KV pool."""

from __future__ import annotations

import collections
import json
import os
import sys

import pytest

from batchllm.config import JobConfig
from batchllm.distributed import driver
from batchllm.errors import BatchLLMError
from batchllm.io.writer import read_results
from batchllm.jobs.manifest import read_manifest
from batchllm.jobs.show import job_state
from batchllm.jobs.status import read_status
from batchllm.pipeline import run_job
from tests.test_distributed import (
    BASE,
    assert_exactly_once_and_same,
    dist_cfg,
    job_plan,
    keyed,
    reference_job,
    replica_of_rows,
    rows_spec,
)


class InjectedFault(RuntimeError):
    """Raised by ``Faults``, standing for any engine error."""


class Faults:
    """``ReplicaHooks`` that inject faults; ``spec`` is comma-separated items:
      start@R     replica R raises while starting (before its model loads)
      raise@R#K   replica R's engine raises during the K-th unit it runs (1-based), after one engine step
      exit@R#K    replica R's process exits (os._exit) during the K-th unit it runs, after one engine step
      poison=ID   every replica's engine raises, after one step, in any unit holding custom_id ID
    Each replica holds its own copy (Ray pickles it to every actor), so the unit count is per replica."""

    def __init__(self, spec: str):
        self.start: set[int] = set()
        self.fail: dict[str, set[tuple[int, int]]] = {"raise": set(), "exit": set()}
        self.poison: set[str] = set()
        for item in filter(None, (x.strip() for x in spec.split(","))):
            if item.startswith("poison="):
                self.poison.add(item.removeprefix("poison="))
                continue
            kind, _, where = item.partition("@")
            replica, _, unit = where.partition("#")
            if kind == "start":
                self.start.add(int(replica))
            else:
                self.fail[kind].add((int(replica), int(unit)))
        self.unit_id: int | None = None
        self.units_run = 0

    def started(self, replica_id: int) -> None:
        if replica_id in self.start:
            raise InjectedFault(f"injected start failure of replica {replica_id}")

    def engine_step(self, replica_id: int, unit_id: int, requests) -> None:
        if unit_id != self.unit_id:
            self.unit_id, self.units_run = unit_id, self.units_run + 1
        if (replica_id, self.units_run) in self.fail["exit"]:
            os._exit(1)
        poisoned = any(r.custom_id in self.poison for r in requests.values())
        if (replica_id, self.units_run) in self.fail["raise"] or poisoned:
            raise InjectedFault(f"injected engine error in unit {self.units_run} of replica {replica_id}")

    def shard_written(self, replica_id: int, shard_name: str) -> None:
        pass


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny):
    return reference_job(tmp_path_factory.mktemp("faults"), tiny)


def run_with_faults(faults: str, cfg: JobConfig):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas need not import the tests package
    events: collections.Counter = collections.Counter()
    return run_job(cfg, progress=lambda e, i: events.update([e]), replica_hooks=Faults(faults)), events


def replicas_of(out) -> dict[int, dict]:
    return {r["replica"]: r for r in read_status(str(out))["batchllm"]["replicas"]}


def no_orphans(out) -> None:
    listed = {s["file"] for s in read_manifest(str(out))["shards"]}
    files = set(os.listdir(out))
    assert {f for f in files if f.startswith("shard-")} == listed and not [f for f in files if f.endswith(".tmp")]


def test_replica_failing_unit_after_unit_is_retired(ray_local, job, tmp_path):
    inp, ref = job
    out = tmp_path / "out"
    summary, events = run_with_faults("raise@1#1,raise@1#2,raise@1#3", dist_cfg(inp, out))
    assert_exactly_once_and_same(out, ref)
    assert events["unit_failed"] == driver.RETIRE_AFTER and summary.replica_failures == 1
    reps = replicas_of(out)
    assert reps[1]["state"] == "failed" and "retired after 3 failed units in a row" in reps[1]["error"]
    assert reps[1]["units_done"] == 0 and reps[0]["requests_done"] == 48
    assert {v for v in replica_of_rows(out).values()} == {0, None}


def test_poison_group_becomes_engine_error_rows_after_its_attempts(ray_local, job, tmp_path):
    inp, ref = job
    out = tmp_path / "out"
    summary, _ = run_with_faults("poison=q12", dist_cfg(inp, out))
    # the plan's group holding q12 (the driver plans the same requests the same way)
    specs, plan = job_plan()
    group = next(g for g in plan.groups if 12 in g.members.tolist())
    poisoned = {specs[i]["custom_id"] for i in group.members.tolist()}
    got = read_results(str(out), verify=True).to_pylist()
    keys = [(r["custom_id"], r["sample_index"]) for r in got]
    assert len(keys) == len(set(keys))
    bad = [r for r in got if r["custom_id"] in poisoned]
    assert {r["custom_id"] for r in bad} == poisoned and len(bad) == len(poisoned)  # one error row per request
    assert all(r["error_code"] == driver.ENGINE_ERROR and "failed on 3 attempts" in r["error_message"]
               and "injected engine error" in r["error_message"] for r in bad)
    # every other row: completed once, as in the single-process run
    assert keyed([r for r in got if r["custom_id"] not in poisoned]) == keyed([r for r in ref if r["custom_id"] not in poisoned])
    assert summary.errors_by_code.get(driver.ENGINE_ERROR) == len(poisoned)
    # both replicas met the poison and stayed in service: failures of work that failed elsewhere too
    # point at the work, and count towards no replica's retirement
    assert all(r["state"] == "idle" and r["units_done"] >= 1 for r in replicas_of(out).values())
    st = read_status(str(out))
    assert st["status"] == "completed" and st["request_counts"]["failed"] == 1 + len(poisoned)
    no_orphans(out)


def test_replica_failing_to_start_then_every_replica_lost_keeps_committed_results(ray_local, job, tiny, tmp_path):
    """Replica 1 cannot start: the job runs on replica 0 alone, which commits a unit, then dies in its
    second: no replica is left. The job fails with one line; what was committed stays and resumes."""
    inp, ref = job
    out = tmp_path / "out"
    with pytest.raises(BatchLLMError, match=r"every replica was lost .*shards committed so far are kept: batchllm resume"):
        run_with_faults("start@1,exit@0#2", dist_cfg(inp, out))
    partial = read_results(str(out), verify=True).to_pylist()
    keys = [(r["custom_id"], r["sample_index"]) for r in partial]
    assert len(keys) == len(set(keys)) and 1 < len(partial) < len(ref)
    assert keyed(partial).items() <= keyed(ref).items()
    st = read_status(str(out))
    assert st["status"] == "failed" and "every replica was lost" in st["errors"]["data"][0]["message"]
    reps = {r["replica"]: r for r in st["batchllm"]["replicas"]}
    assert reps[0]["state"] == reps[1]["state"] == "failed" and reps[0]["units_done"] == 1
    assert "injected start failure" in reps[1]["error"] and reps[1]["units_done"] == 0
    assert {v for v in replica_of_rows(out).values()} == {0, None}  # replica 0's unit, the driver's error row
    assert job_state(str(out))["status"] == "failed"
    no_orphans(out)
    s = run_job(JobConfig(inputs=[inp], output=str(out), **BASE), loaded=tiny)  # resume, in one process
    assert s.done_before > 0
    assert_exactly_once_and_same(out, ref)


def test_prompt_longer_than_a_replicas_kv_pool_is_an_error_row(ray_local, tiny, tmp_path):
    """The replicas' pool (96 tokens: 5 usable pages of 16) is smaller than the context (8192): prompts
    of 100 tokens cannot run there and become prompt_too_long rows, as in one process, and the rest of
    their group still runs."""
    rows = [r for r in rows_spec() if not isinstance(r, str)]
    long_ids = list(range(1000, 1094))
    rows += [{"custom_id": "long-in-group", "prompt_token_ids": [1, 10, 20, 30, 40, 50] + long_ids},  # family 0's prefix
             {"custom_id": "long-alone", "prompt_token_ids": [3] + long_ids + [7, 8, 9, 10, 11]},
             {"custom_id": "long-n2", "prompt_token_ids": [4] + long_ids + [5, 6, 7, 8, 9], "n": 2}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kw = {"kv_cache_tokens": 96}
    run_job(JobConfig(inputs=[str(inp)], output=str(tmp_path / "ref"), **BASE, **kw), loaded=tiny)
    ref = read_results(str(tmp_path / "ref"), verify=True).to_pylist()
    assert sorted(r["custom_id"] for r in ref if r["error_code"] == "prompt_too_long") == ["long-alone", "long-in-group", "long-n2"]
    out = tmp_path / "out"
    summary = run_job(dist_cfg(str(inp), out, **kw))
    got = assert_exactly_once_and_same(out, ref)
    too_long = [r for r in got if r["error_code"] == "prompt_too_long"]
    assert len(too_long) == 3 and all("the KV cache holds at most 80 tokens" in r["error_message"] for r in too_long)
    owner = replica_of_rows(out)
    assert {owner[r["custom_id"]] for r in too_long} <= {0, 1}  # found by the replicas, not the driver
    assert summary.errors_by_code == {"prompt_too_long": 3}
    assert read_status(str(out))["request_counts"] == {"total": len(rows), "completed": len(rows) - 3, "failed": 3}
