"""Run the biopost CLI and SIGKILL it at a chosen point: ``python killer.py POINT biopost-args...``.

POINT is ``-`` (no kill), ``STAGE:STEP:NTH`` (kill right after the NTH train row of stage STAGE at STEP has
been written, i.e. inside the stage, past its save points before STEP) or ``run:NTH`` (kill as the study
executor starts its NTH run of this process, i.e. between runs). The kill is a real SIGKILL of this
process: no exception handler, ``finally`` or atexit runs, exactly as when a scheduler pre-empts a job.
"""

from __future__ import annotations

import os
import signal
import sys


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    parts = point.split(":")
    if parts[0] == "run":
        from biopost.study import execute

        original, calls = execute.execute_run, []

        def execute_run(*args, **kwargs):
            calls.append(1)
            if len(calls) == int(parts[1]):
                kill()
            return original(*args, **kwargs)

        execute.execute_run = execute_run
        return
    from biopost.runlog import RunLog

    stage, step, nth = parts[0], int(parts[1]), int(parts[2])
    original, seen = RunLog.write, []

    def write(self, rows, **kwargs):
        original(self, rows, **kwargs)
        if any(r.get("stage") == stage and r.get("step") == step and r.get("split") == "train" for r in rows):
            seen.append(1)
            if len(seen) == nth:
                kill()

    RunLog.write = write


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # the same arithmetic in every process: results compare bit for bit
    if sys.argv[1] != "-":
        arm(sys.argv[1])
    from biopost.cli import main

    raise SystemExit(main(sys.argv[2:]))
