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
        harness.run_bench("nested", peers=["vllm"], model="dummy:tiny")
