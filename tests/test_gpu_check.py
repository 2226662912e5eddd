"""The prepared GPU run (benchmarks/gpu_check.py) still runs: its kernel-timing and decode sections on tiny shapes in
Triton's interpreter, in a fresh process, the way a GPU session will run them at full size. A GPU session has 15
minutes of device time in all, so a script that broke here would cost it a run. The timings mean nothing on a CPU;
the test checks that every row is there, in the keys benchmarks/results/gpu_check.json keeps, and that nothing failed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--smoke", "--sections", "kernels,decode"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (out / "gpu_check.md").read_text().startswith("GPU check on cpu")
    return json.loads((out / "gpu_check.json").read_text())


def test_no_section_failed(smoke_report):
    assert smoke_report["errors"] == []
    assert {"device", "date", "torch", "triton", "transformers"} <= smoke_report.keys()


def test_kernel_rows_cover_every_mode_and_sparsity(smoke_report):
    rows = smoke_report["kernels"]
    for row in rows:
        assert {"shape", "dtype", "mode", "sparsity", "dense_us", "sparse_us", "programs_per_sm"} <= row.keys()
        assert row["dense_us"] > 0 and row["sparse_us"] > 0
    one_program = {(row["mode"], row["sparsity"]) for row in rows if row["programs_per_sm"] == 1}
    assert one_program == {(mode, s) for mode in ("topk", "topk_two_launch", "threshold") for s in (0.5, 0.7, 0.8, 0.9)}
    assert {row["programs_per_sm"] for row in rows} == {1, 2, 4}
    assert all("selection_us" in row for row in rows if row["mode"] == "topk_two_launch")


def test_decode_rows_run_the_sparse_kernels(smoke_report):
    rows = [row for row in smoke_report["decode"] if row["how"] != "generate-static-cache"]
    for row in rows:
        assert {"mode", "sparsity", "compiled", "batch", "tokens_per_s", "dense_tokens_per_s"} <= row.keys()
        assert row["tokens_per_s"] > 0 and row["dense_tokens_per_s"] > 0
        assert row["sparse_paths"] == ["triton"], row
    assert {(row["mode"], row["sparsity"], row["batch"]) for row in rows} == {
        (mode, s, batch) for mode in ("topk", "threshold") for s in (0.5, 0.8) for batch in (1, 4)}


def test_generate_row_runs_the_users_call(smoke_report):
    rows = [row for row in smoke_report["decode"] if row["how"] == "generate-static-cache"]
    assert len(rows) == 1 and rows[0]["tokens_per_s"] > 0 and rows[0]["dense_tokens_per_s"] > 0
    assert rows[0]["compiled"] is False  # transformers compiles the step on CUDA only
