"""Bookkeeping for bench/gpu_check.sh: the report OUT/gpu_check.json, rewritten (atomically) as each
stage ends, what each stage measured (parsed from its junit XML, log or JSON), and the final line.
Standard library only: it runs even where torch does not import.

    gpu_check_report.py init    REPORT --mode real|dry-run
    gpu_check_report.py stage   REPORT NAME STATUS SECONDS [--note TEXT] [--measured FILE.json]
    gpu_check_report.py pytest  JUNIT LOG [JUNIT LOG ...]  -> JSON of counts, failures, the summary
                                                       line (summed over pytest processes)
    gpu_check_report.py sanitizer LOG                -> JSON of the sanitizer's and the script's summaries
    gpu_check_report.py bench   BENCH_JSON           -> JSON digest of bench/gpu_bench.py's output
    gpu_check_report.py final   REPORT               -> prints the final line; exit 1 if a stage failed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET

# partial: no failure, but the stage stopped (its time limit, a case budget) before its last case
STATUSES = ("ok", "partial", "failed", "skipped")


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)


def _read_json(path: str | None):
    if not path:
        return None
    try:
        return _load(path)
    except (OSError, ValueError) as e:
        return {"unreadable": f"{path}: {e}"}


def cmd_init(a) -> None:
    _write(a.report, dict(format="nm_optim.gpu_check", version=1, mode=a.mode,
                          started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), stages=[], final=None))


def cmd_stage(a) -> None:
    doc = _load(a.report)
    rec = dict(name=a.name, status=a.status, seconds=round(float(a.seconds), 1))
    if a.limit is not None:
        rec["limit_s"] = int(a.limit)
    if a.note:
        rec["note"] = a.note
    measured = _read_json(a.measured)
    rec["measured"] = measured if measured is not None else {}
    doc["stages"] = [s for s in doc["stages"] if s["name"] != a.name] + [rec]
    _write(a.report, doc)
    print(f"gpu_check: stage {a.name}: {a.status} ({rec['seconds']} s)" + (f" - {a.note}" if a.note else ""),
          flush=True)


def pytest_digest(junit: str, log: str) -> dict:
    out: dict = dict(tests=0, passed=0, failed=0, errors=0, skipped=0, failures=[], summary_line=None,
                     interrupted=False)
    try:
        root = ET.parse(junit).getroot()
        for case in root.iter("testcase"):
            out["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            kinds = {child.tag for child in case}
            if "failure" in kinds or "error" in kinds:
                key = "failed" if "failure" in kinds else "errors"
                out[key] += 1
                child = case.find("failure") if "failure" in kinds else case.find("error")
                if len(out["failures"]) < 40:
                    msg = (child.get("message") or "").strip().splitlines()
                    out["failures"].append(f"{name}: {msg[0][:300] if msg else ''}")
            elif "skipped" in kinds:
                out["skipped"] += 1
            else:
                out["passed"] += 1
    except (OSError, ET.ParseError) as e:
        out["junit_error"] = f"{type(e).__name__}: {e}"
    try:
        with open(log, errors="replace") as f:
            text = f.read()
        lines = [ln.strip("= ").strip() for ln in text.splitlines()
                 if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b.* in [\d.]+s", ln)]
        out["summary_line"] = lines[-1] if lines else None
        out["interrupted"] = "KeyboardInterrupt" in text
        # pytest's own counts (the XML may list the test cut by the interrupt as passed)
        for key, word in (("passed", "passed"), ("failed", "failed"), ("skipped", "skipped")):
            m = re.search(rf"(\d+) {word}", out["summary_line"] or "")
            if out["summary_line"]:
                out[key] = int(m.group(1)) if m else 0
        # collection errors have no testcase in the XML when pytest stops at collection
        if "error" in (out["summary_line"] or "") and out["errors"] == 0:
            m = re.search(r"(\d+) errors?", out["summary_line"])
            out["errors"] = int(m.group(1)) if m else 1
    except OSError as e:
        out["log_error"] = str(e)
    return out


def sanitizer_digest(log: str) -> dict:
    out: dict = dict(tool_summary=None, script_summary=None, errors=None, cases_run=None, cases_total=None,
                     cases_not_run=None)
    try:
        with open(log, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        return dict(log_error=str(e))
    for ln in lines:
        m = re.search(r"(ERROR|RACECHECK|SYNCCHECK|INITCHECK|LEAK) SUMMARY: .*", ln)
        if m:
            out["tool_summary"] = m.group(0)
            n = re.search(r"SUMMARY: (\d+) (errors|hazards)", ln)
            if n:
                out["errors"] = int(n.group(1))
        m = re.match(r"(sanitize_step|racecheck_stats): \d+ of (\d+) cases ok", ln)
        if m:
            out["script_summary"] = ln
            # "...; K not run (time budget B s)": the cases the script's budget left out
            n = re.search(r"; (\d+) not run", ln)
            out["cases_run"] = int(m.group(2))
            out["cases_not_run"] = int(n.group(1)) if n else 0
            out["cases_total"] = out["cases_run"] + out["cases_not_run"]
    out["failed_cases"] = [ln for ln in lines if re.match(r"(sanitize_step|racecheck_stats): FAIL", ln)][:20]
    return out


def pytest_digests(pairs: list[str]) -> dict:
    """pytest_digest of each (junit, log) pair of the processes one stage ran side by side,
    counts added up; the summary line is theirs joined by " | "."""
    if len(pairs) % 2:
        raise SystemExit("gpu_check_report.py pytest: JUNIT LOG pairs expected")
    parts = [pytest_digest(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
    if len(parts) == 1:
        return parts[0]
    out: dict = {k: sum(p[k] for p in parts) for k in ("tests", "passed", "failed", "errors", "skipped")}
    out["failures"] = [f for p in parts for f in p["failures"]][:40]
    out["interrupted"] = any(p["interrupted"] for p in parts)
    lines = [p["summary_line"] or "no summary" for p in parts]
    out["summary_line"] = " | ".join(lines) if any(p["summary_line"] for p in parts) else None
    for key in ("junit_error", "log_error"):
        errs = [p[key] for p in parts if key in p]
        if errs:
            out[key] = "; ".join(errs)
    return out


def bench_digest(path: str) -> dict:
    doc = _read_json(path)
    if not isinstance(doc, dict) or "sections" not in doc:
        return dict(missing=f"{path} not written (the benchmark stopped before its first section)",
                    detail=doc)
    bitwise = doc.get("bitwise") or {}
    times = {}
    for res in doc.get("results", []):
        times[res["shape_set"]] = {r["provider"]: dict(ms=round(r["ms"], 4), gbps=round(r["gbps"], 1),
                                                       vs_torch_fused=round(r["ratio_to_torch_fused"], 3))
                                   for r in res["rows"]}
    return dict(device=doc["meta"].get("device"), backends=doc["meta"].get("backends"),
                sections=doc["sections"], copy_bandwidth_gbps=doc.get("copy_bandwidth_gbps"),
                bitwise_vs_torch_fused=bitwise.get("summary"),
                bitwise_reference=bitwise.get("reference", "torch fused"),
                bitwise_cases_differing=[r for r in bitwise.get("rows", [])
                                         if r.get("error") or r.get("diff_params") or r.get("diff_buffers")][:60],
                times=times)


def _bitwise_words(summary: dict | None) -> str:
    """{"cuda fp32": "yes", "cuda bf16": "no (12 elements, max 1 ulp)"} -> "cuda: fp32 yes bf16 no (12 el, 1 ulp)";
    a difference the README does not claim away ("differs by design (...)") reads "by design (...)"."""
    if not summary:
        return ""
    by_backend: dict[str, list[str]] = {}
    for key, verdict in summary.items():
        backend, dtype = key.split(" ", 1)
        m = re.match(r"(no|differs by design) \((\d+) elements, max (\S+) ulp\)", verdict)
        kind = m and ("no" if m.group(1) == "no" else "by design")
        word = f"{kind} ({m.group(2)} el, {m.group(3)} ulp)" if m else verdict.split(" (")[0]
        by_backend.setdefault(backend, []).append(f"{dtype} {word}")
    return "; ".join(f"{b}: {' '.join(v)}" for b, v in by_backend.items())


def final_line(doc: dict) -> str:
    parts = []
    for s in doc["stages"]:
        m = s.get("measured") or {}
        name, status = s["name"], s["status"]
        if name.startswith("tests") and status != "skipped" and "passed" in m:
            word = f"{name} {m['passed']} passed"
            if m.get("failed") or m.get("errors"):
                word += f", {m.get('failed', 0)} failed, {m.get('errors', 0)} errors"
            if m.get("interrupted"):
                word += ", cut at its time limit"
            parts.append(word + ("" if status == "ok" else f" ({status})"))
        elif name == "bench" and status != "skipped":
            words = _bitwise_words(m.get("bitwise_vs_torch_fused"))
            ref = m.get("bitwise_reference", "torch fused")
            parts.append(f"bench {status}" + (f" (bitwise vs {ref}: {words})" if words else ""))
        elif name in ("memcheck", "racecheck") and status == "partial" and m.get("cases_total"):
            parts.append(f"{name} partial ({m['cases_run']} of {m['cases_total']} cases)")
        elif name == "preflight" and m.get("missing"):
            parts.append(f"preflight {status} (missing: {', '.join(m['missing'])})")
        else:
            parts.append(f"{name} {status}")
    failed = [s["name"] for s in doc["stages"] if s["status"] == "failed"]
    partial = [s["name"] for s in doc["stages"] if s["status"] == "partial"]
    head = "gpu_check" + (" (dry run)" if doc.get("mode") == "dry-run" else "")
    if failed:
        tail = f" => FAILED: {', '.join(failed)}"
    elif partial:
        tail = f" => no stage failed; partial (not every case ran): {', '.join(partial)}"
    else:
        tail = " => all stages ok or skipped"
    return f"{head}: {', '.join(parts)}{tail}"


def cmd_final(a) -> int:
    doc = _load(a.report)
    line = final_line(doc)
    doc["final"] = line
    doc["ok"] = all(s["status"] != "failed" for s in doc["stages"])
    doc["partial"] = [s["name"] for s in doc["stages"] if s["status"] == "partial"]
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write(a.report, doc)
    print(line, flush=True)
    return 0 if doc["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init")
    p.add_argument("report")
    p.add_argument("--mode", choices=["real", "dry-run"], required=True)
    p = sub.add_parser("stage")
    p.add_argument("report")
    p.add_argument("name")
    p.add_argument("status", choices=STATUSES)
    p.add_argument("seconds")
    p.add_argument("--limit")
    p.add_argument("--note", default="")
    p.add_argument("--measured")
    p = sub.add_parser("pytest")
    p.add_argument("pairs", nargs="+", metavar="JUNIT LOG")
    p = sub.add_parser("sanitizer")
    p.add_argument("log")
    p = sub.add_parser("bench")
    p.add_argument("bench_json")
    p = sub.add_parser("final")
    p.add_argument("report")
    a = ap.parse_args(argv)
    if a.cmd == "init":
        cmd_init(a)
    elif a.cmd == "stage":
        cmd_stage(a)
    elif a.cmd == "pytest":
        print(json.dumps(pytest_digests(a.pairs), indent=1))
    elif a.cmd == "sanitizer":
        print(json.dumps(sanitizer_digest(a.log), indent=1))
    elif a.cmd == "bench":
        print(json.dumps(bench_digest(a.bench_json), indent=1))
    elif a.cmd == "final":
        return cmd_final(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
