"""docs/gpu_check.json for scripts/gpu_check.sh, in two roles.

As a pytest plugin (``-p gpu_check_report`` with scripts/ on PYTHONPATH and GPU_CHECK_OUTCOMES set to a file): it
appends one JSON line per collected set and per finished test to that file as the run goes, so a run stopped at its
time limit still says what was collected, what ran and what failed (with xdist, the controller writes).

As a script: ``python scripts/gpu_check_report.py OUTCOMES STAGES RESULTS`` reads those lines, the stage times
gpu_check.sh wrote (one "name<TAB>seconds<TAB>rc" line each) and the CUDA benchmark JSONs written under RESULTS
since GPU_CHECK_START (epoch seconds), and writes
RESULTS/gpu_check.json: commit, versions, GPU, test counts (passed, failed, skipped, errors, not run, per backend),
each failure's id and first error line, stage times, and the medians each benchmark file reports.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

_ROUTES = ("aten_conv", "gemm", "cudnn_fused")


def _backend(test_id: str) -> str:
    """The backend in a test's parameters (tests/helpers.py names them 'cpu', 'cuda-<route>', 'cuda_emu-<route>'),
    'cuda' for a test on the CUDA device without a route, 'none' for one that takes no backend."""
    params = test_id[test_id.index("[") + 1:-1].split("-") if test_id.endswith("]") and "[" in test_id else []
    for i, p in enumerate(params):
        if p in ("cuda", "cuda_emu") and i + 1 < len(params) and params[i + 1] in _ROUTES:
            return f"{p}-{params[i + 1]}"
    for p in params:
        if p in ("cpu", "cuda"):
            return p
    return "none"


# ------------------------------------------------------------------------------------------------ pytest plugin
def _outcomes_file(config) -> Optional[str]:
    if hasattr(config, "workerinput"):  # an xdist worker: its reports reach the controller, which writes
        return None
    return os.environ.get("GPU_CHECK_OUTCOMES")


def _append(config, record: dict) -> None:
    path = _outcomes_file(config)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_collection_finish(session) -> None:
    if session.items:  # without xdist the controller collects
        _append(session.config, {"collected": [item.nodeid for item in session.items]})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:  # with xdist: each worker's (identical) collection
    _append(node.config, {"collected": list(ids)})


def _error_line(report, last: bool = False) -> str:
    """The first (or last) 'E ' line of a failure's report: the assertion or exception that decided it."""
    text = str(report.longrepr) if report.longrepr is not None else ""
    lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")] or text.splitlines()[-1:]
    return (lines[-1] if last else lines[0])[:300] if lines else ""


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or report.outcome != "passed":  # a test's verdict, or its failed/skipped setup
        record = {"id": report.nodeid, "when": report.when, "outcome": report.outcome, "s": round(report.duration, 3)}
        if report.outcome == "failed":
            record["error"] = _error_line(report)
        _append(_CONFIG[0], record)


def pytest_collectreport(report) -> None:
    if report.outcome == "failed":  # a test file that could not be collected: its tests are in no count
        _append(_CONFIG[0], {"id": report.nodeid, "when": "collect", "outcome": "failed",
                             "error": _error_line(report, last=True)})


_CONFIG: List = []  # the run's config (reports do not carry it)


def pytest_configure(config) -> None:
    _CONFIG[:] = [config]
    path = _outcomes_file(config)
    if path:
        Path(path).write_text("")


# ------------------------------------------------------------------------------------------------ summary
def _tests(outcomes: Path) -> dict:
    collected: List[str] = []
    verdict: Dict[str, dict] = {}
    collection_errors: List[dict] = []
    if outcomes.exists():
        for line in outcomes.read_text().splitlines():
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut off when the run was killed
                continue
            if "collected" in r:
                collected = collected or r["collected"]
                continue
            if r["when"] == "collect":
                collection_errors.append({"id": r["id"], "when": "collect", "error": r.get("error", "")})
                continue
            prev = verdict.get(r["id"])
            # a test's verdict: failed wins over passed (a teardown error after a pass), then the latest
            if prev is None or prev["outcome"] != "failed":
                verdict[r["id"]] = r
    counts = {"collected": len(collected), "passed": 0, "failed": 0, "skipped": 0,
              "collection_errors": len(collection_errors)}
    per_backend: Dict[str, Dict[str, int]] = {}
    failures = list(collection_errors)
    for tid, r in verdict.items():
        outcome = r["outcome"]
        counts[outcome] = counts.get(outcome, 0) + 1
        b = per_backend.setdefault(_backend(tid), {"passed": 0, "failed": 0, "skipped": 0})
        b[outcome] = b.get(outcome, 0) + 1
        if outcome == "failed":
            failures.append({"id": tid, "when": r["when"], "error": r.get("error", "")})
    # not run: collected but never reached a verdict (the stage's time limit stopped the run first)
    counts["not_run"] = max(len(collected) - len(verdict), 0)
    counts["run_fraction"] = round(len(verdict) / len(collected), 4) if collected else 0.0
    return {"counts": counts, "per_backend": per_backend, "failures": failures}


def _ratios(rows: List[dict]) -> Dict[str, float]:
    """Median of every '*_over_*' ratio and speed-up over a benchmark's rows, grouped by the rows' route/device,
    mode, pass, mask and batch where they have them."""
    groups: Dict[str, Dict[str, List[float]]] = {}
    for row in rows:
        tag = " ".join(str(row[k]) for k in ("device", "mode", "pass", "mask", "batch") if k in row)
        g = groups.setdefault(tag, {})
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and ("_over_" in k or k == "speedup"):
                g.setdefault(k, []).append(float(v))
    return {f"{tag}: {k}": round(statistics.median(v), 4) for tag, g in groups.items() for k, v in g.items()}


def _benchmarks(results: Path, since: float) -> Dict[str, dict]:
    """The CUDA benchmark files written since `since` (epoch seconds: the check's start), so that a file left from
    an earlier run is never reported as this run's."""
    out = {}
    for f in sorted(results.glob("*.json")):
        if not f.name.startswith(("bench_cuda", "bench_model_cuda", "overhead_cuda")) or f.stat().st_mtime < since:
            continue
        try:
            d = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(d, dict) or not isinstance(d.get("rows"), list):
            continue
        entry = {"medians": _ratios(d["rows"])}
        for key in ("summary", "peer_summary"):
            if key in d:
                entry[key] = d[key]
        out[f.name] = entry
    return out


def _stages(path: Path) -> List[dict]:
    stages = []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                stages.append({"stage": parts[0], "s": int(parts[1]), "rc": int(parts[2])})
    return stages


def _env() -> dict:
    env = {"python": sys.version.split()[0], "commit": os.environ.get("PCONV_COMMIT", "unknown")}
    try:
        import torch

        env.update(torch=torch.__version__, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                       capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count)
        try:  # the report is written whatever the build left
            from pconv_cuda import routes

            env["cudnn_fused"] = routes.cudnn_fused_status() or "built"
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
            from bench import commit  # the checkout's commit, '+changes' when the tree differs (imports pconv_cuda)

            env["commit"] = commit() or env["commit"]
        except Exception as e:  # noqa: BLE001
            env.setdefault("cudnn_fused", f"pconv_cuda not importable: {e}")
    except ImportError:
        env["torch"] = None
    return env


def main(argv: List[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    outcomes, stages, results = Path(argv[0]), Path(argv[1]), Path(argv[2])
    report = {"env": _env(), "tests": _tests(outcomes), "stages": _stages(stages),
              "benchmarks": _benchmarks(results, float(os.environ.get("GPU_CHECK_START", "0")))}
    (results / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    c = report["tests"]["counts"]
    print(f"gpu_check.json: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped, {c['not_run']} not "
          f"run of {c['collected']} collected ({100 * c['run_fraction']:.1f}% run), {c['collection_errors']} files not "
          "collected")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
