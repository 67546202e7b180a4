"""The benchmark harness: workload shapes, job files, and one small end-to-end bench on dummy:tiny."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import typer
from typer.testing import CliRunner

from batchllm.bench import harness, workloads
from batchllm.bench.command import bench, load_bench_job
from batchllm.config import load_job_file
from batchllm.errors import BatchLLMError

JOBS = os.path.join(os.path.dirname(__file__), "..", "jobs")


def _lcp(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _groups(rows):
    out = {}
    for r in rows:
        out.setdefault(r["custom_id"].split("-")[0], []).append(r["prompt_token_ids"])
    return out


def test_shared_prefix_shape_exact_and_deterministic():
    shape = dict(groups=3, per_group=5, prefix_len=20, suffix_len=7, output_len=4)
    wl = workloads.make_workload("shared-prefix", shape)
    (cell,) = wl.cells
    assert len(cell.rows) == 15
    assert all(len(r["prompt_token_ids"]) == 27 and r["max_tokens"] == 4 and r["ignore_eos"] for r in cell.rows)
    groups = _groups(cell.rows)
    assert len(groups) == 3
    for members in groups.values():  # the shared prefix is exactly prefix_len, never a token longer
        assert {_lcp(a, b) for i, a in enumerate(members) for b in members[i + 1:]} == {20}
    heads = [m[0][0] for m in groups.values()]
    assert len(set(heads)) == 3  # groups share nothing
    assert all(workloads.TOKEN_LOW <= t < workloads.TOKEN_HIGH for r in cell.rows for t in r["prompt_token_ids"])
    again = workloads.make_workload("shared-prefix", shape).cells[0].rows
    assert again == cell.rows
    assert workloads.make_workload("shared-prefix", {**shape, "seed": 1}).cells[0].rows != cell.rows


def test_shuffle_reorders_the_same_rows():
    shape = dict(groups=4, per_group=8, prefix_len=4, suffix_len=2, output_len=1)
    shuffled = workloads.make_workload("shared-prefix", shape).cells[0].rows
    ordered = workloads.make_workload("shared-prefix", {**shape, "shuffle": False}).cells[0].rows
    assert [r["custom_id"] for r in ordered] == [f"g{g}-r{m}" for g in range(4) for m in range(8)]
    assert [r["custom_id"] for r in shuffled] != [r["custom_id"] for r in ordered]
    key = lambda r: r["custom_id"]  # noqa: E731
    assert sorted(shuffled, key=key) == sorted(ordered, key=key)


def test_other_workloads_shapes():
    ns = workloads.make_workload("no-sharing", dict(requests=10, suffix_len=6, output_len=3)).cells[0].rows
    assert len(ns) == 10 and len({r["prompt_token_ids"][0] for r in ns}) == 10
    mix = workloads.make_workload("decode-heavy-mix", dict(groups=4, per_group=2, prefix_len=5, suffix_len=2, output_len=9, short_output_len=2), ).cells[0].rows
    assert sorted(r["max_tokens"] for r in mix) == [2] * 4 + [9] * 4
    nested = workloads.make_workload("nested", dict(prefix_len=10, groups=3, sub_prefix_len=4, per_group=2, suffix_len=3, output_len=1)).cells[0].rows
    assert len(nested) == 6 and all(len(r["prompt_token_ids"]) == 17 for r in nested)
    assert len({tuple(r["prompt_token_ids"][:10]) for r in nested}) == 1  # one system prompt
    sub = _groups(nested)
    assert all(_lcp(*m) == 14 for m in sub.values()) and len({m[0][10] for m in sub.values()}) == 3


def test_prefix_grid_cells_and_overrides():
    wl = workloads.make_workload("prefix-grid", dict(prefix_lens=[8, 16], share_degrees=[2, 4], output_lens=[1, 3], requests=8, suffix_len=2))
    assert len(wl.cells) == 8
    for c in wl.cells:
        p = c.params
        assert len(c.rows) == p["groups"] * p["per_group"] == 8
        assert all(len(r["prompt_token_ids"]) == p["prefix_len"] + 2 and r["max_tokens"] == p["output_len"] for r in c.rows)
    one = workloads.resolve_params("prefix-grid", dict(prefix_len=64, output_len=5))  # scalar flags pin an axis
    assert one["prefix_lens"] == [64] and one["output_lens"] == [5] and one["share_degrees"] == [4, 16, 64]
    with pytest.raises(BatchLLMError, match="groups"):
        workloads.resolve_params("prefix-grid", dict(groups=2))
    with pytest.raises(BatchLLMError, match="requests"):
        workloads.resolve_params("shared-prefix", dict(requests=3))
    with pytest.raises(BatchLLMError, match="unknown workload"):
        workloads.resolve_params("nope")
    with pytest.raises(BatchLLMError, match="per-group"):
        workloads.resolve_params("shared-prefix", dict(per_group=0))


def test_bench_job_files_load_and_are_not_run_jobs(tmp_path):
    files = sorted(glob.glob(os.path.join(JOBS, "bench-*.toml")))
    names = {load_bench_job(f)["workload"] for f in files}
    assert names == set(workloads.WORKLOADS)
    for f in files:
        v = load_bench_job(f)
        workloads.resolve_params(v["workload"], v.get("shape"))
        with pytest.raises(BatchLLMError):  # `batchllm run --job` refuses a bench file
            load_job_file(f)
    bad = tmp_path / "b.toml"
    bad.write_text('[bench]\nworkload = "nested"\npolices = ["batchllm"]\n')
    with pytest.raises(BatchLLMError, match="polices"):
        load_bench_job(str(bad))
    bad.write_text('inputs = ["a.jsonl"]\n')
    with pytest.raises(BatchLLMError, match=r"\[bench\]"):
        load_bench_job(str(bad))
    rel = tmp_path / "r.toml"
    rel.write_text('[bench]\nworkload = "nested"\nmodel = "models/x.gguf"\njson = "out/r.json"\npolicies = "fcfs-lru, batchllm"\n')
    v = load_bench_job(str(rel))
    assert v["model"] == str(tmp_path / "models" / "x.gguf") and v["json"] == str(tmp_path / "out" / "r.json")
    assert v["policies"] == ["fcfs-lru", "batchllm"]


def test_peak_flops_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert harness.peak_flops(torch.device("cuda"), torch.bfloat16) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert harness.peak_flops(torch.device("cuda"), torch.bfloat16) == 756e12
    assert harness.peak_flops(torch.device("cuda"), torch.float32) is None
    assert harness.peak_flops(torch.device("cpu"), torch.bfloat16) is None


RESULT_FIELDS = {"policy", "wall_s", "load_s", "total_tok_s", "output_tok_s", "prefill_saving", "effective_mfu",
                 "peak_kv_gb", "decode_batch", "wall_vs_first", "same_tokens_as_first"}


def test_bench_command_end_to_end_on_dummy_tiny(tmp_path):
    """Both policies and both transformers peers on one small shared-prefix set, through the typer
    command: JSON schema, ratios, greedy agreement, plot, profile."""
    app = typer.Typer()
    app.command()(bench)
    app.command("noop")(lambda: None)  # two commands, so typer keeps `bench` as a subcommand, as in cli.py
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    r = CliRunner().invoke(app, [
        "bench", "--workload", "shared-prefix", "--model", "dummy:tiny", "--device", "cpu", "--groups", "2",
        "--per-group", "4", "--prefix-len", "40", "--suffix-len", "8", "--output-len", "5",
        "--kv-cache-tokens", "4096", "--peers", "transformers,transformers-cb", "--json", str(out_json), "--plot", str(out_png), "--profile",
    ])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "fcfs-lru" in r.output and "speed-up" in r.output and "forward" in r.output
    rep = json.loads(out_json.read_text())
    assert {"workload", "model", "machine", "versions", "results"} <= set(rep)
    assert rep["workload"]["params"]["groups"] == 2 and rep["workload"]["requests"] == 8
    assert rep["machine"]["cpu_count"] and rep["versions"]["torch"]
    res = {e["policy"]: e for e in rep["results"]}
    assert list(res) == ["batchllm", "fcfs-lru", "transformers", "transformers-cb"]
    for name in ("batchllm", "fcfs-lru", "transformers"):
        e = res[name]
        assert RESULT_FIELDS <= set(e), name
        assert e["wall_s"] > 0 and e["output_tokens"] == 40 and e["effective_mfu"] is None
        assert e["wall_vs_first"] == pytest.approx(e["wall_s"] / res["batchllm"]["wall_s"])
        assert e["decode_batch"]["max"] <= 8 and e["peak_kv_gb"] > 0
    b, f = res["batchllm"], res["fcfs-lru"]
    assert b["wall_vs_first"] == 1.0 and b["same_tokens_as_first"] == 1.0
    # pages of 8 KiB: the plan holds 2 x 3 prefix pages (the partial third too) + 8 x 2 own pages; fcfs-lru
    # admits all 8 at once and, like vLLM, the later requests of a step hit the full prefix pages the
    # first one registered: 2 x 2 shared + 8 x 2 own
    assert (b["peak_kv_gb"], f["peak_kv_gb"]) == (pytest.approx(22 * 8192 / 1e9), pytest.approx(20 * 8192 / 1e9))
    assert f["prefill_saving"] == pytest.approx(1 - (2 * 48 + 6 * 16) / (8 * 48))  # 32 of each 40 shared
    assert f["same_tokens_as_first"] == 1.0  # both policies give the same greedy tokens
    # the plan computes each 40-token prefix once: 2 x 40 + 8 x 8 of 8 x 48 prompt tokens
    assert b["prefill_saving"] == pytest.approx(1 - (2 * 40 + 8 * 8) / (8 * 48))
    assert res["transformers"]["prefill_saving"] == 0.0
    assert res["transformers"]["same_tokens_as_first"] >= 0.75  # fp32 reference; padding may flip a near-tie
    cb = res["transformers-cb"]
    assert cb.get("unavailable") or cb["output_tokens"] == 40
    assert set(b["profile"]) == set(harness.PROFILE_KINDS) and b["profile"]["forward"] > 0
    assert out_png.stat().st_size > 1000


def test_grid_aggregates_cells_with_geometric_mean():
    rep = harness.run_bench("prefix-grid", dict(prefix_lens=[16, 32], share_degrees=[4], output_lens=[2], requests=4, suffix_len=4),
                            model="dummy:tiny", device="cpu", warmup=False, kv_cache_tokens=4096)
    assert len(rep["cells"]) == 2 and rep["workload"]["requests"] == 8
    b, f = rep["results"]
    cell_ratios = [c["results"][1]["wall_vs_first"] for c in rep["cells"]]
    assert f["wall_vs_first"] == pytest.approx((cell_ratios[0] * cell_ratios[1]) ** 0.5)
    assert b["wall_s"] == pytest.approx(sum(c["results"][0]["wall_s"] for c in rep["cells"]))
    assert f["same_tokens_as_first"] == 1.0


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(BatchLLMError, match="policy"):
        harness.run_bench("nested", policies=["lifo"], model="dummy:tiny")
    with pytest.raises(BatchLLMError, match="peer"):
        harness.run_bench("nested", peers=["tgi"], model="dummy:tiny")


# -- engine reuse across runs (issue 12, item 7) -------------------------------------------------------

def test_reachable_graph_batch_keeps_every_reachable_bucket():
    from batchllm.engine.cuda_graphs import bucket_for, capture_sizes, reachable_graph_batch

    full = capture_sizes(512)
    assert len(full) == 67
    for reach in (1, 3, 5, 8, 60, 64, 65, 300, 512, 4000):
        b = reachable_graph_batch(512, reach)
        sizes = capture_sizes(b)
        assert sizes == full[: len(sizes)]  # a prefix of the full list: no new bucket
        for n in range(1, min(reach, 512) + 1):  # every reachable step keeps its bucket
            assert bucket_for(sizes, n) == bucket_for(full, n)
    assert reachable_graph_batch(512, 60) == 64 and reachable_graph_batch(300, 299) == 300
    assert reachable_graph_batch(0, 5) == 0 and reachable_graph_batch(8, 0) == 0


def _rows(out_dir):
    from batchllm.io.writer import read_results

    return sorted(((r["custom_id"], r["token_ids"], r["cached_tokens"], r["finish_reason"]) for r in read_results(out_dir).to_pylist()))


STAT_FIELDS = ("samples", "prompt_tokens", "cached_tokens", "output_tokens", "prompt_tokens_computed", "num_steps",
               "num_preemptions", "batch_seqs", "batch_tokens", "errors")


@pytest.mark.parametrize("kv_tokens", [4096, 160])  # 160: memory pressure (preemption, prefix cache eviction)
def test_reused_engine_runs_equal_fresh_engine_runs(tiny, tmp_path, kv_tokens):
    """A run on the bench's shared engine gives exactly the tokens, cached tokens and statistics of a
    run on a fresh engine, for both policies, in any order and repeated (clean pool and prefix cache)."""
    from batchllm.bench.engines import BenchEngines
    from batchllm.build import make_engine, model_max_len
    from batchllm.config import JobConfig
    from batchllm.pipeline import run_job

    rows = workloads.make_workload("shared-prefix", dict(groups=2, per_group=4, prefix_len=40, suffix_len=8, output_len=5)).cells[0].rows
    path = tmp_path / "in.jsonl"
    workloads.write_jsonl(rows, str(path))
    base = JobConfig(model="dummy:tiny", device="cpu", dtype="float32", temperature=0.0, preview=0, kv_cache_tokens=kv_tokens)
    n = [0]

    def job(policy):
        n[0] += 1
        return JobConfig(**{**base.to_dict(), "inputs": [str(path)], "output": str(tmp_path / f"o{n[0]}"), "policy": policy})

    fresh = {}
    for policy in harness.POLICIES:
        cfg = job(policy)
        s = run_job(cfg, loaded=tiny)
        fresh[policy] = (_rows(cfg.output), {f: getattr(s, f) for f in STAT_FIELDS})
    if kv_tokens == 160:
        assert fresh["fcfs-lru"][1]["num_preemptions"] > 0  # the pressure case does exercise preemption

    engines = BenchEngines(base, tiny, harness.POLICIES, max_seqs=len(rows))
    for policy in harness.POLICIES:  # the engine the shared parts give is configured as make_engine's
        mine, _ = engines(job(policy), tiny, model_max_len(base, tiny.config))
        ref, _ = make_engine(job(policy), tiny, model_max_len(base, tiny.config))
        assert (mine.cfg, mine.prefix_caching, mine.kv.num_pages) == (ref.cfg, ref.prefix_caching, ref.kv.num_pages)
    for policy in ("fcfs-lru", "batchllm", "fcfs-lru", "batchllm"):
        cfg = job(policy)
        s = run_job(cfg, loaded=tiny, engine_factory=engines)
        engines.release()
        assert (_rows(cfg.output), {f: getattr(s, f) for f in STAT_FIELDS}) == fresh[policy], policy
    assert engines.engines_built == 6 and engines.fresh_engines == 0

    # the graph path (static mode: what a CUDA graph runs, eagerly) only up to the workload's 8 sequences
    static = BenchEngines(base, tiny, harness.POLICIES, max_seqs=len(rows), graphs="static")
    assert static.graph_sizes == [1, 2, 4, 8]
    for policy in harness.POLICIES:
        cfg = job(policy)
        run_job(cfg, loaded=tiny, engine_factory=static)
        static.release()
        assert [r[1] for r in _rows(cfg.output)] == [r[1] for r in fresh[policy][0]], policy
    assert static.runner.graphs.replays > 0


def test_engine_sizes_graphs_by_workload_and_pool(tiny):
    from batchllm.bench.engines import BenchEngines
    from batchllm.config import JobConfig

    base = JobConfig(model="dummy:tiny", device="cpu", dtype="float32", kv_cache_tokens=4096)
    assert BenchEngines(base, tiny, ["batchllm"], max_seqs=100, graphs="static").graph_sizes[-1] == 104
    # fcfs-lru alone: at most 256 sequences (its max_num_seqs) whatever the workload
    assert BenchEngines(base, tiny, ["fcfs-lru"], max_seqs=1000, graphs="static").graph_sizes[-1] == 256
    # 40 pages: at most 40 sequences hold a page each
    small = JobConfig(**{**base.to_dict(), "kv_cache_tokens": 40 * 16})
    assert BenchEngines(small, tiny, ["batchllm"], max_seqs=1000, graphs="static").graph_sizes[-1] == 40
    assert BenchEngines(base, tiny, ["batchllm"], max_seqs=100).graph_sizes == []  # CPU "auto": no graphs


# -- partial reports (issue 12, item 8) ----------------------------------------------------------------

def test_partial_reports_after_every_run_and_a_failing_peer(tmp_path, monkeypatch):
    """The report is handed out after every policy run (and each peer's cell), ``complete`` false; a
    peer that fails (as a timeout would cut it) leaves the file with every figure measured before."""
    from batchllm.bench import peers as peers_mod
    from batchllm.bench import report as rep

    def boom(*a, **k):
        raise RuntimeError("peer cut off")

    monkeypatch.setattr(peers_mod, "run_static", boom)
    out = tmp_path / "r.json"
    seen = []

    def on_report(r):
        seen.append(json.loads(json.dumps(r)))
        rep.write_json(r, str(out))

    with pytest.raises(RuntimeError, match="cut off"):
        harness.run_bench("prefix-grid", dict(prefix_lens=[16, 32], share_degrees=[4], output_lens=[2], requests=4, suffix_len=4),
                          model="dummy:tiny", device="cpu", warmup=False, kv_cache_tokens=4096, repeat=2,
                          peers=["transformers-cb", "transformers"], on_report=on_report)
    cb_reason = peers_mod.unavailable_reason("transformers-cb")
    # 2 cells x 2 repeats x 2 policies, then transformers-cb's cells (or its one 'unavailable' report)
    assert len(seen) == 8 + (1 if cb_reason else 2)
    assert all(r["complete"] is False for r in seen)
    first = seen[0]
    assert [e["policy"] for e in first["cells"][0]["results"]] == ["batchllm"] and first["cells"][1]["results"] == []
    assert first["cells"][0]["results"][0]["runs_done"] == 1 and first["results"][0]["cells_measured"] == 1
    fourth = seen[3]  # cell 0 done: both policies, both repeats, ratios and agreement
    c0 = {e["policy"]: e for e in fourth["cells"][0]["results"]}
    assert len(c0["fcfs-lru"]["wall_s_runs"]) == 2 and "runs_done" not in c0["fcfs-lru"]
    assert c0["fcfs-lru"]["same_tokens_as_first"] == 1.0 and c0["fcfs-lru"]["wall_vs_first"] > 0
    final = json.loads(out.read_text())  # the file as the failure left it: the last partial report
    assert final == seen[-1] and final["complete"] is False
    assert [e["policy"] for e in final["results"]] == ["batchllm", "fcfs-lru", "transformers-cb"]
    assert all("cells_measured" not in e for e in final["results"][:2])
    assert final["model"]["engine_setup_s"] >= 0 and not list(tmp_path.glob(".r.json.*"))  # no temp file left


def test_final_report_is_complete(tmp_path):
    rep = harness.run_bench("shared-prefix", dict(groups=1, per_group=2, prefix_len=16, suffix_len=4, output_len=2),
                            model="dummy:tiny", device="cpu", warmup=False, kv_cache_tokens=1024)
    assert rep["complete"] is True and [e["policy"] for e in rep["results"]] == ["batchllm", "fcfs-lru"]


def test_vllm_peer_unavailable_is_one_line(monkeypatch):
    import importlib.util

    from batchllm.bench import vllm_peer

    if importlib.util.find_spec("vllm") is not None:  # in vLLM's venv: pretend it is absent
        real = importlib.util.find_spec
        monkeypatch.setattr(vllm_peer.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.setattr(vllm_peer, "_REASON", None)  # asked afresh
    rep = harness.run_bench("shared-prefix", dict(groups=1, per_group=2, prefix_len=16, suffix_len=4, output_len=2),
                            model="dummy:tiny", device="cpu", warmup=False, kv_cache_tokens=1024, policies=["batchllm"], peers=["vllm"])
    e = rep["results"][1]
    assert e["policy"] == "vllm" and "not installed" in e["unavailable"] and "\n" not in e["unavailable"]
