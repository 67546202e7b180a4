"""scripts/gpu_check.py: stage deadlines, a report rewritten after every stage, partial results kept.

The real dry run (every stage at toy sizes, in an environment shaped like the GPU image) runs in CI
through ``.ci/gpu_dry_run.sh``; these tests check the orchestrator's contract with fake stages.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their annotations through it
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        del sys.modules[spec.name]


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _writer(path: Path, payload: dict, then: str = "") -> list[str]:
    return _py(f"import json; open({str(path)!r}, 'w').write(json.dumps({payload!r})); {then}")


def test_stages_run_in_order_and_the_report_keeps_each(gc, tmp_path, monkeypatch):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    seen = []

    def fake(dry, w):
        return [
            gc.Stage("a_env", 20, [("env", _writer(work / "a.json", {"x": 1}), work / "a.json")]),
            gc.Stage("b_slow", 1.5, [("sleepy", _writer(work / "b.json", {"partial": True}, "import time; time.sleep(60)"),
                                      work / "b.json"),
                                     ("quick", _py("print('hi')"), None)]),
            gc.Stage("c_fail", 20, [("bad", _py("import sys; print('boom'); sys.exit(3)"), None)]),
        ]

    monkeypatch.setattr(gc, "build_stages", fake)
    real_write = gc.Report.write

    def spy(self):
        real_write(self)
        seen.append(json.loads(self.path.read_text()))

    monkeypatch.setattr(gc.Report, "write", spy)
    rc = gc.main([str(out), "--dry-run"])
    assert rc == 1
    rep = json.loads((out / "gpu_check.json").read_text())
    st = rep["stages"]
    assert rep["complete"] and rep["dry_run"]
    assert st["a_env"]["status"] == "ok" and st["a_env"]["results"]["env"] == {"x": 1}
    # cut at its deadline: the child's partial JSON is kept, the other command's success too
    assert st["b_slow"]["status"] == "timeout" and st["b_slow"]["results"]["sleepy"] == {"partial": True}
    assert st["b_slow"]["commands"]["sleepy"]["timed_out"] and st["b_slow"]["commands"]["quick"]["rc"] == 0
    assert st["b_slow"]["wall_s"] < 15
    assert st["c_fail"]["status"] == "failed" and "boom" in st["c_fail"]["log_tail"]["c_fail.log"]
    # parallel commands log to their own files
    assert sorted(p.name for p in out.iterdir()) == ["a_env.log", "b_slow.quick.log", "b_slow.sleepy.log",
                                                      "c_fail.log", "gpu_check.json"]
    # the report was on disk before any stage ran, and after each one
    assert [s["status"] for s in seen[0]["stages"].values()] == ["pending"] * 3
    assert any(r["stages"]["a_env"]["status"] == "ok" and r["stages"]["b_slow"]["status"] == "running" for r in seen)


def test_stages_past_the_whole_deadline_are_skipped(gc, tmp_path, monkeypatch):
    def fake(dry, w):
        return [gc.Stage("a", 30, [("slow", _py("import time; time.sleep(60)"), None)]),
                gc.Stage("b", 30, [("never", _py("print(1)"), None)])]

    monkeypatch.setattr(gc, "build_stages", fake)
    assert gc.main([str(tmp_path), "--total-s", str(gc.MARGIN_S + 12)]) == 1
    st = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert st["a"]["status"] == "timeout" and st["b"]["status"] == "skipped"


def test_the_real_stages_cover_the_issue(gc, tmp_path):
    for dry in (True, False):
        stages = gc.build_stages(dry, tmp_path)
        assert [s.name for s in stages] == ["a_env", "b_tests", "c_kernels", "d_graphs", "e_bench"]
        fixed = sum(s.budget_s for s in stages[:-1])
        assert stages[-1].budget_s is gc.REST
        assert dry or fixed + gc.MARGIN_S + 200 <= gc.TOTAL_S  # at least 200 s are left for the bench
        argv = {name: a for s in stages for name, a, _ in s.commands}
        assert all(Path(ROOT, f).is_file() for f in argv["kernels"] if f.startswith("tests/"))
        assert "tests/test_cuda_graphs.py" in argv["graphs"]
        bench = " ".join(argv["shared_prefix"])
        assert "--workload shared-prefix" in bench and "--peers transformers" in bench
        assert ("dummy:llama-3-8b" in bench and "bfloat16" in bench) != dry


def test_a_pytest_cut_at_its_deadline_still_reports_its_counts(gc, tmp_path, monkeypatch):
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_x.py").write_text("import time\n\ndef test_fast():\n    pass\n\n"
                                     "def test_slow():\n    time.sleep(60)\n")
    xml = tmp_path / "w" / "r.xml"
    xml.parent.mkdir()

    def fake(dry, w):
        st = gc.Stage("b", 6, [("t", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      f"--junitxml={xml}", str(tests)], None)])
        st.junit["t"] = xml
        return [st]

    monkeypatch.setattr(gc, "build_stages", fake)
    gc.main([str(tmp_path / "out")])
    b = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]["b"]
    assert b["status"] == "timeout"
    assert b["results"]["t"]["tests"] >= 1  # SIGINT first: pytest wrote its xml on the way out


def test_junit_summary_counts_failures(gc, tmp_path):
    xml, log = tmp_path / "r.xml", tmp_path / "r.log"
    log.write_text("$ python -m pytest -q\n")
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
                   '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    assert gc.junit_summary(xml, log) == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "failing": ["t::b"]}
    log.write_text("$ python -m pytest --collect-only\n12 tests collected in 1.0s\n")
    assert gc.junit_summary(xml, log) == {"collected": 12}
