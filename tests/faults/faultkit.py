"""Helpers for fault tests: the CLI in a subprocess, killed with SIGKILL at chosen points."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

KILLER = Path(__file__).with_name("killer.py")
SRC = Path(__file__).resolve().parents[2] / "src"


def biopost(*args, kill: str = "-", timeout: float = 600) -> subprocess.CompletedProcess:
    """``biopost ARGS`` in a fresh process (one torch thread), SIGKILLed at ``kill`` (see killer.py)."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(KILLER), kill, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def assert_killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def write_yaml(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def results(run_dir: Path) -> list[tuple]:
    """Every metrics row of a run as comparable tuples (identity columns, then the value)."""
    from biopost.runlog import read_metrics

    keys = ("stage", "step", "split", "metric", "value", "n", "ci_low", "ci_high")
    return sorted(tuple(r.get(k) for k in keys) for r in read_metrics(run_dir))


def final_weights(run_dir: Path) -> dict[str, str]:
    """sha256 of each stage's final weight files: equal digests mean bit-identical models."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(run_dir).glob("stages/*/final/*.safetensors"))}
