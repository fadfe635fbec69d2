"""The mini study end to end: plan, run every run with the local executor, rerun (a no-op), collect.

Prints one JSON line: wall and CPU seconds of the run and of the rerun, the machine's load average before
and after (the machine may be shared), runs, optimizer steps executed and without sharing, result rows.

    python benchmarks/study_mini.py [--study configs/studies/mini.yaml] [--output-dir DIR] [--cpus-per-run 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", type=Path, default=Path(__file__).parent.parent / "configs" / "studies" / "mini.yaml")
    p.add_argument("--output-dir", type=Path, default=None, help="default: a temporary directory")
    p.add_argument("--cpus-per-run", type=int, default=None, help="torch threads per run")
    args = p.parse_args()

    from biopost.study.config import load_study
    from biopost.study.execute import Resources, execute
    from biopost.study.plan import prepare
    from biopost.study.results import write_results

    out = args.output_dir or Path(tempfile.mkdtemp(prefix="study-mini-"))
    load_before = os.getloadavg()
    wall, cpu = time.perf_counter(), cpu_seconds()
    plan = prepare(load_study(args.study), out)
    failed = execute(plan, out, "local", Resources(cpus=args.cpus_per_run))
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    rerun_wall = time.perf_counter()
    execute(prepare(load_study(args.study), out), out, "local", Resources(cpus=args.cpus_per_run))
    rerun_wall = time.perf_counter() - rerun_wall
    _, _, table, unfinished = write_results(out)
    print(json.dumps({
        "benchmark": "study_mini", "study": str(args.study), "output_dir": str(out), "runs": len(plan.runs),
        "failed": failed, "steps_executed": plan.steps_executed, "steps_naive": plan.steps_naive,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rerun_wall_s": round(rerun_wall, 2),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "cores": os.cpu_count(), "result_rows": len(table), "unfinished": unfinished,
    }))


if __name__ == "__main__":
    main()
