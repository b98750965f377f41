"""bench/gpu_check.sh, the one prepared GPU check, cannot rot between GPU runs: its dry run
(`--dry-run`: CPU tensors, Triton's interpreter, no build, no compute-sanitizer) runs every
stage's plumbing here and writes the same report; the fast tests check the script's syntax and
time budget and the report's bookkeeping."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check_report as report  # noqa: E402

STAGES = ["preflight", "build", "tests_kernels", "tests_more", "memcheck", "racecheck", "bench"]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


@needs_bash
def test_script_parses_and_its_real_run_fits_in_480_seconds_with_grace():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    real = re.search(r"else\n  declare -A BUDGET=\((.*?)\)\nfi\n", text, re.S)
    assert real, "the real run's BUDGET table moved: update this test"
    budget = {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", real.group(1))}
    assert list(budget) == STAGES
    grace = int(re.search(r"^GRACE=(\d+)", text, re.M).group(1))
    # every stage's deadline plus the grace of a stage that ignores its SIGINT, inside the
    # device call's 540 s with a minute to spare
    assert sum(budget.values()) + grace * len(STAGES) <= 480, (budget, grace)
    assert 'timeout -s INT -k "$GRACE"' in text and "+ 30" not in text  # no stage gets more than its budget
    assert 'run(command="bash bench/gpu_check.sh $OUT", timeout_s=540)' in text
    assert "-m pip install --no-build-isolation --no-deps -e ." in text
    assert "NM_OPTIM_LTO=0 NM_OPTIM_DEBUG=1" in text  # the CPU kernel's -O3 compile alone takes ~3 CPU-minutes
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in text


@needs_bash
def test_the_budget_line_adds_up_the_table():
    """`--budget` prints the line the real run prints first: each stage's budget, their sum and
    the sum with grace, from the table itself."""
    r = subprocess.run(["bash", str(SCRIPT), "--budget"], capture_output=True, text=True, timeout=30, check=True)
    line = r.stdout.strip()
    pairs = re.findall(r"(\w+) (\d+)(?= \+| =)", line)
    assert [name for name, _ in pairs] == STAGES, line
    total = sum(int(v) for _, v in pairs)
    assert f"= {total} s, + 7 x 5 s of grace = {total + 35} s (at most 480 s)" in line, line


def test_the_tests_stage_runs_the_gpu_only_checks_first_and_leaves_the_cpu_ones_out():
    text = SCRIPT.read_text()
    shards = [s.split() for s in re.findall(r'"\$\(shard ([a-z_ ]+)\)"', re.search(r"KERNEL_SHARDS=\((.*)\)", text).group(1))]
    assert shards[0] == ["amp", "stats", "graphs", "triton_binder"], shards
    names = [n for s in shards for n in s]
    assert "plan" not in names and "bitwise" not in names
    assert all((ROOT / "tests" / f"test_{f}.py").exists() for f in names)
    for name in re.findall(r"--deselect tests/test_triton.py::(\w+)", text):
        assert f"def {name}(" in (ROOT / "tests" / "test_triton.py").read_text(), name


def test_the_parity_and_error_modules_skip_without_expecttest():
    for name in ("test_parity.py", "test_errors.py"):
        lines = (ROOT / "tests" / name).read_text().splitlines()
        guard = next(i for i, ln in enumerate(lines) if ln.startswith('pytest.importorskip("expecttest"'))
        first = next(i for i, ln in enumerate(lines) if ln.startswith("from torch.testing._internal"))
        assert guard < first, name


def _junit(path: Path, cases: str) -> None:
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')


def test_pytest_digest_counts_failures_and_reads_an_interrupted_summary(tmp_path):
    _junit(tmp_path / "j.xml",
           '<testcase classname="tests.test_stats" name="a[cuda-cuda]"/>'
           '<testcase classname="tests.test_stats" name="b[cuda-cuda]"><failure message="boom"/></testcase>'
           '<testcase classname="tests.test_op" name="c"><skipped message="no"/></testcase>'
           '<testcase classname="tests.test_op" name="d"/>')
    (tmp_path / "log").write_text("..F\n!!!!! KeyboardInterrupt !!!!!\n"
                                  "===== 1 failed, 1 passed, 1 skipped, 9 deselected in 12.01s =====\n")
    d = report.pytest_digest(str(tmp_path / "j.xml"), str(tmp_path / "log"))
    assert d["interrupted"] and d["summary_line"] == "1 failed, 1 passed, 1 skipped, 9 deselected in 12.01s"
    assert (d["passed"], d["failed"], d["skipped"], d["tests"]) == (1, 1, 1, 4)  # pytest's counts win
    assert d["failures"] == ["tests.test_stats::b[cuda-cuda]: boom"]
    missing = report.pytest_digest(str(tmp_path / "none.xml"), str(tmp_path / "none.log"))
    assert "junit_error" in missing and "log_error" in missing


def test_the_digest_of_processes_side_by_side_adds_up_their_counts(tmp_path):
    _junit(tmp_path / "a.xml", '<testcase classname="t.a" name="x"/><testcase classname="t.a" name="y"/>')
    _junit(tmp_path / "b.xml", '<testcase classname="t.b" name="z"><failure message="bad"/></testcase>')
    (tmp_path / "a.log").write_text("== 2 passed, 3 deselected in 4.00s ==\n")
    (tmp_path / "b.log").write_text("!!! KeyboardInterrupt !!!\n== 1 failed in 9.00s ==\n")
    d = report.pytest_digests([str(tmp_path / n) for n in ("a.xml", "a.log", "b.xml", "b.log")])
    assert (d["passed"], d["failed"], d["tests"], d["interrupted"]) == (2, 1, 3, True)
    assert d["summary_line"] == "2 passed, 3 deselected in 4.00s | 1 failed in 9.00s"
    assert d["failures"] == ["t.b::z: bad"]


def test_sanitizer_digest_reads_the_tool_and_script_summaries(tmp_path):
    (tmp_path / "log").write_text("sanitize_step: FAIL cuda fp16 x: boom\nsanitize_step: 3 of 4 cases ok on cuda\n"
                                  "========= ERROR SUMMARY: 2 errors\n")
    d = report.sanitizer_digest(str(tmp_path / "log"))
    assert d["errors"] == 2 and d["script_summary"].startswith("sanitize_step: 3 of 4")
    assert d["failed_cases"] == ["sanitize_step: FAIL cuda fp16 x: boom"]
    assert (d["cases_run"], d["cases_not_run"], d["cases_total"]) == (4, 0, 4)


def test_sanitizer_digest_counts_the_cases_a_time_budget_left_out(tmp_path):
    (tmp_path / "log").write_text("racecheck_stats: ok   cuda float32\n"
                                  "racecheck_stats: 1 of 1 cases ok on cuda (cuda, triton) in 9.0 s; "
                                  "3 not run (time budget 10 s)\n========= RACECHECK SUMMARY: 0 hazards displayed\n")
    d = report.sanitizer_digest(str(tmp_path / "log"))
    assert (d["cases_run"], d["cases_not_run"], d["cases_total"]) == (1, 3, 4)


def test_report_stages_and_final_line(tmp_path, capsys):
    rep = str(tmp_path / "gpu_check.json")
    report.main(["init", rep, "--mode", "real"])
    (tmp_path / "t.json").write_text(json.dumps(dict(passed=212, failed=0, errors=0, interrupted=False)))
    (tmp_path / "b.json").write_text(json.dumps(dict(bitwise_vs_torch_fused={
        "cuda fp32": "yes", "cuda bf16": "no (3 elements, max 1 ulp)"})))
    report.main(["stage", rep, "build", "ok", "41"])
    report.main(["stage", rep, "tests_kernels", "ok", "80", "--measured", str(tmp_path / "t.json")])
    report.main(["stage", rep, "memcheck", "failed", "70", "--note", "cut at its limit"])
    report.main(["stage", rep, "bench", "ok", "50", "--measured", str(tmp_path / "b.json")])
    doc = json.loads(Path(rep).read_text())
    assert [s["name"] for s in doc["stages"]] == ["build", "tests_kernels", "memcheck", "bench"]
    assert report.main(["final", rep]) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == ("gpu_check: build ok, tests_kernels 212 passed, memcheck failed, bench ok (bitwise vs torch "
                    "fused: cuda: fp32 yes bf16 no (3 el, 1 ulp)) => FAILED: memcheck")
    assert json.loads(Path(rep).read_text())["final"] == line


def test_a_stage_that_did_not_run_every_case_is_partial_never_ok(tmp_path, capsys):
    rep = str(tmp_path / "gpu_check.json")
    report.main(["init", rep, "--mode", "real"])
    (tmp_path / "m.json").write_text(json.dumps(dict(cases_run=12, cases_not_run=28, cases_total=40)))
    (tmp_path / "t.json").write_text(json.dumps(dict(passed=40, failed=0, errors=0, interrupted=True)))
    report.main(["stage", rep, "tests_kernels", "partial", "120", "--measured", str(tmp_path / "t.json")])
    report.main(["stage", rep, "memcheck", "partial", "60", "--measured", str(tmp_path / "m.json")])
    report.main(["stage", rep, "racecheck", "ok", "20"])
    assert report.main(["final", rep]) == 0  # nothing failed
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == ("gpu_check: tests_kernels 40 passed, cut at its time limit (partial), memcheck partial "
                    "(12 of 40 cases), racecheck ok => no stage failed; partial (not every case ran): "
                    "tests_kernels, memcheck")
    doc = json.loads(Path(rep).read_text())
    assert doc["ok"] is True and doc["partial"] == ["tests_kernels", "memcheck"]


def test_a_difference_by_design_reads_as_one():
    """The dry run's bench line: the CPU backend claims torch's for-loop bits for fp32 / fp64 only,
    and Triton in the interpreter follows torch's fused CUDA expression; on a GPU every backend and
    dtype claims torch's fused bits. A difference nobody claims away reads "no", the others "by
    design"."""
    import gpu_bench

    assert gpu_bench.bitwise_claimed("cpu", "cpu", "fp32") and gpu_bench.bitwise_claimed("cpu", "cpu", "fp64")
    assert not gpu_bench.bitwise_claimed("cpu", "cpu", "bf16") and not gpu_bench.bitwise_claimed("cpu", "triton", "fp32")
    assert all(gpu_bench.bitwise_claimed("cuda", b, d) for b in ("cuda", "triton") for d in ("fp32", "bf16", "fp64"))
    words = report._bitwise_words({"cpu fp32": "yes", "cpu bf16": "differs by design (1848 elements, max 89 ulp)",
                                   "triton fp32": "no (2 elements, max 1 ulp)"})
    assert words == "cpu: fp32 yes bf16 by design (1848 el, 89 ulp); triton: fp32 no (2 el, 1 ulp)"


def test_ulp_distance_counts_representable_steps():
    import gpu_bench

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        a = torch.tensor([1.0, -1.0, 0.0, 1e-3, -2.0, 0.0], dtype=dtype)
        up = torch.nextafter(a, torch.full_like(a, 10.0))
        assert gpu_bench.ulp_distance(a, a).tolist() == [0.0] * 6
        assert gpu_bench.ulp_distance(a, up).tolist() == [1.0] * 6
        assert gpu_bench.ulp_distance(a, torch.nextafter(up, torch.full_like(a, 10.0))).tolist() == [2.0] * 6
        assert gpu_bench.ulp_distance(torch.tensor([0.0], dtype=dtype), torch.tensor([-0.0], dtype=dtype)).item() == 1


@needs_bash
@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_the_report(tmp_path):
    """The whole script on this machine (about 2 minutes on 2 cores)."""
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable}
    env.pop("GPU_CHECK_ONLY", None)
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check (dry run): preflight ok") and "FAILED" not in last, last
    assert r.stdout.startswith("gpu_check: budgets preflight "), r.stdout[:300]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["mode"] == "dry-run" and doc["ok"] is True and doc["final"] == last
    assert [s["name"] for s in doc["stages"]] == STAGES
    for s in doc["stages"]:
        assert s["status"] in ("ok", "partial", "skipped"), s
        assert isinstance(s["seconds"], (int, float)) and isinstance(s["measured"], dict), s
    by = {s["name"]: s for s in doc["stages"]}
    assert by["build"]["status"] == "skipped" and "version" in by["build"]["measured"]
    assert by["preflight"]["measured"]["torch"] == torch.__version__
    for name in ("tests_kernels", "tests_more"):
        m = by[name]["measured"]
        assert m["summary_line"] and m["failed"] == 0 and m["errors"] == 0, m
    assert by["tests_kernels"]["measured"]["passed"] > 0
    assert by["memcheck"]["measured"]["script_summary"].startswith("sanitize_step:")
    assert by["racecheck"]["measured"]["script_summary"].startswith("racecheck_stats:")
    bench = by["bench"]["measured"]
    assert [s["status"] for s in bench["sections"]] == ["ok"] * len(bench["sections"])
    assert {"copy_bandwidth", "bitwise", "tiny"} <= {s["name"] for s in bench["sections"]}
    assert set(bench["bitwise_vs_torch_fused"]) >= {"cpu fp32", "cpu bf16"}
    # on the CPU the reference is torch's for-loop step, which the CPU backend equals for fp32
    assert bench["bitwise_reference"] == "torch for-loop" and bench["bitwise_vs_torch_fused"]["cpu fp32"] == "yes"
    assert "bitwise vs torch for-loop: cpu: fp32 yes" in last
    # the device tool returns at most 8 files with plain names, no more than 2 folders down
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files


def test_kernel_resources_reads_ptxas_and_computes_the_occupancy():
    """tools/kernel_resources.py (the registers / spills / occupancy table of every GPU kernel):
    its ptxas parser and sm_90 occupancy arithmetic, without compiling anything."""
    sys.path.insert(0, str(ROOT / "tools"))
    import kernel_resources as kr

    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    8 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 128 registers, used 1 barriers, 19008 bytes smem, 400 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function 'bar' for 'sm_90a'\n"
           "ptxas info    : Function properties for bar\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 0 barriers\n")
    usage = kr.parse_ptxas(log)
    foo, bar = usage["_Z3fooPf"], usage["bar"]
    assert (foo.regs, foo.stack, foo.spill_st, foo.spill_ld, foo.smem) == (128, 8, 16, 12, 19008)
    assert (bar.regs, bar.smem) == (40, 0)
    foo.threads = bar.threads = 256
    assert foo.occupancy(90) == (2, 16, "regs")   # 128 x 32 registers per warp: 16 warps
    assert bar.occupancy(90) == (6, 48, "regs")   # 40 -> 1280 per warp: 51 warps, 6 blocks of 8
    bar.regs, bar.smem = 32, 100 * 1024
    assert bar.occupancy(90) == (2, 16, "smem")   # 228 KB / (100 KB + 1 KB reserved)
    bar.smem = 0
    assert bar.occupancy(90) == (8, 64, "warps")
