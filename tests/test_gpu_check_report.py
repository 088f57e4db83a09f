"""scripts/gpu_check_report.py: the counts gpu_check.json gives are the ones pytest saw, including a run stopped at
its time limit (tests never reached are 'not run', not passed), a failure keeps its id and first error line, and a
file that cannot be collected is reported, not lost."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

SUITE = textwrap.dedent("""
    import time
    import pytest

    @pytest.mark.parametrize("backend", ["cpu", "cuda-gemm", "cuda_emu-aten_conv"])
    def test_op(backend):
        assert backend != "cuda-gemm", "gemm is off by 2 ulp"

    def test_skipped():
        pytest.skip("needs a GPU")

    def test_z_never_finishes():
        time.sleep(60)

    def test_zz_not_reached():
        pass
""")


def test_a_stopped_run_counts_what_ran_and_names_the_failure(tmp_path):
    (tmp_path / "test_fake.py").write_text(SUITE)
    (tmp_path / "test_broken.py").write_text("import a_module_that_is_not_built\n")
    outcomes, results = tmp_path / "outcomes.jsonl", tmp_path / "results"
    results.mkdir()
    env = dict(os.environ, GPU_CHECK_OUTCOMES=str(outcomes), PYTHONPATH=str(SCRIPTS))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check_report",
           "--continue-on-collection-errors", "test_broken.py", "test_fake.py"]
    # Stopped the way gpu_check.sh's stage limit stops it: killed while test_z_never_finishes runs.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if outcomes.exists() and outcomes.read_text().count('"outcome"') >= 4:
                break
            try:
                proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
    finally:
        proc.kill()
        proc.wait()
    stages = tmp_path / "stages.tsv"
    stages.write_text("build\t42\t0\ntests\t7\t124\n")
    (results / "bench_cuda_graph_bfloat16_cl.json").write_text(json.dumps({"rows": [
        {"device": "cuda/cudnn_fused", "pass": "fwd", "fused_over_plain": 1.1},
        {"device": "cuda/cudnn_fused", "pass": "fwd", "fused_over_plain": 1.3},
        {"device": "cuda/cudnn_fused", "pass": "fwd", "fused_over_plain": 1.2}]}))
    (results / "bench_cpu.json").write_text(json.dumps({"rows": [{"fused_over_plain": 9.0}]}))  # not a CUDA file
    subprocess.run([sys.executable, str(SCRIPTS / "gpu_check_report.py"), str(outcomes), str(stages), str(results)],
                   check=True, env=dict(os.environ, GPU_CHECK_START="0"), capture_output=True)
    report = json.loads((results / "gpu_check.json").read_text())
    tests = report["tests"]
    assert tests["counts"] == {"collected": 6, "passed": 2, "failed": 1, "skipped": 1, "collection_errors": 1,
                               "not_run": 2, "run_fraction": round(4 / 6, 4)}
    assert tests["failures"] == [
        {"id": "test_broken.py", "when": "collect",
         "error": "ModuleNotFoundError: No module named 'a_module_that_is_not_built'"},
        {"id": "test_fake.py::test_op[cuda-gemm]", "when": "call", "error": "AssertionError: gemm is off by 2 ulp"}]
    assert tests["per_backend"]["cuda-gemm"] == {"passed": 0, "failed": 1, "skipped": 0}
    assert tests["per_backend"]["cuda_emu-aten_conv"] == {"passed": 1, "failed": 0, "skipped": 0}
    assert report["stages"] == [{"stage": "build", "s": 42, "rc": 0}, {"stage": "tests", "s": 7, "rc": 124}]
    assert list(report["benchmarks"]) == ["bench_cuda_graph_bfloat16_cl.json"]
    medians = report["benchmarks"]["bench_cuda_graph_bfloat16_cl.json"]["medians"]
    assert medians == {"cuda/cudnn_fused fwd: fused_over_plain": 1.2}
    for key in ("commit", "torch", "python"):
        assert key in report["env"]
