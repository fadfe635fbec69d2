"""benchmarks/run_all.py and benchmarks/gpu_check.py print every line they promise, with numbers in them.

Speed itself is measured by the benchmarks, not asserted here: these tests check the lines are complete and
the ratios are real numbers computed from both arms.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str, env: dict | None = None) -> list[dict]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          env=environment, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_plan_line_counts_the_paper_study():
    (row,) = run("run_all.py", "--only", "plan")
    assert row["name"] == "plan" and "error" not in row
    assert row["steps_naive"] > row["steps_executed"] > 0  # the planner shares prefixes: fewer steps run
    assert row["ratio"] == pytest.approx(row["steps_naive"] / row["steps_executed"], rel=1e-3)
    assert {"cpu", "cores", "torch", "device"} <= set(row["machine"])


def test_a_failing_benchmark_prints_an_error_line_and_the_rest_run():
    rows = run("run_all.py", "--only", "sft,plan", "--sizes", "no-such-size")
    assert [r["name"] for r in rows] == ["sft_no-such-size", "plan"]
    assert "unknown benchmark size" in rows[0]["error"] and "ratio" in rows[1]


@pytest.mark.slow
def test_run_all_quick_prints_every_named_line_with_a_numeric_ratio():
    rows = run("run_all.py", "--quick", "--device", "cpu", "--sizes", "tiny-s", "--threads", "1")
    assert [r["name"] for r in rows] == ["sft_tiny-s", "rl_tiny-s", "eval_tiny-s", "encoder_cache", "plan"]
    for row in rows:
        assert "error" not in row, row
        assert isinstance(row["ratio"], float) and math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["compares"] and row["machine"]["torch"]
    sft, rl, ev = rows[:3]
    assert sft["ratio"] == pytest.approx(sft["ours_tokens_per_s"] / sft["bare_tokens_per_s"], rel=0.01)
    assert sft["tokens_per_step"] > 0 and sft["bare_tokens_per_step"] > 0
    assert rl["ours_tokens_per_s"] > 0 and rl["trl_tokens_per_s"] > 0
    assert ev["batched_examples"] > ev["single_examples"] > 0


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part_on_cpu(tmp_path):
    rows = run("gpu_check.py", "--smoke", "--device", "cpu", "--dtype", "float32", env={"OUT": str(tmp_path)})
    written = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert written == rows
    parts = [r["part"] for r in rows]
    assert parts[:5] == ["machine", "sft_lora", "sft_full", "rl_lora", "rl_full"]
    assert {"run_all/sft_tiny-s", "run_all/rl_tiny-s", "run_all/eval_tiny-s", "run_all/encoder_cache",
            "run_all/plan"} <= set(parts)
    for row in rows[1:]:
        assert "error" not in row and "skipped" not in row, row
    for row in rows[1:3]:
        assert row["mfu"] > 0 and row["params"] > 0
