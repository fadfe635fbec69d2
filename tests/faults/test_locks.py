"""One runner per run or study directory; a second one gets one line naming the holder; a killed holder's
lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from faultkit import SRC, write_yaml

from biopost.cli import main
from biopost.locks import HOLDER_FILE, DirectoryBusy, DirectoryLock

HOLD = "import sys, time; from biopost.locks import DirectoryLock\n" \
       "with DirectoryLock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    {after}"


def hold(directory, what: str, after: str = "time.sleep(120)") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(after=after), str(directory), what],
                            env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_runner_is_refused_in_one_line_naming_the_holder(fast_config, tmp_path, capsys):
    config = write_yaml(fast_config(), tmp_path / "fast.yaml")
    holder = hold(tmp_path / "run", "run")
    try:
        assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"is in use by another run (pid {holder.pid} on " in err and "started 20" in err
        assert not (tmp_path / "run" / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


def test_baseline_is_refused_in_a_directory_a_run_holds(fast_config, tmp_path, capsys):
    config = write_yaml(fast_config(), tmp_path / "fast.yaml")
    holder = hold(tmp_path / "run", "run")
    try:
        assert main(["baseline", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is in use by another run (pid {holder.pid} on " in err, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", HOLDER_FILE]


def test_a_second_study_runner_is_refused(fast_config, tmp_path, capsys):
    spec = {"name": "locked", "base": fast_config(), "pipelines": {"sft": ["sft"]},
            "blocks": {"one": {"pipeline": ["sft"]}}}
    study = write_yaml(spec, tmp_path / "study.yaml")
    holder = hold(tmp_path / "study", "study")
    try:
        assert main(["study", "run", str(study), "--output-dir", str(tmp_path / "study")]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is in use by another study (pid {holder.pid} on " in err
    assert not (tmp_path / "study" / "plan.json").exists()


def test_the_lock_of_a_killed_runner_is_taken_over(tmp_path, capsys):
    holder = hold(tmp_path / "run", "run", after="import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert holder.wait() == -signal.SIGKILL
    assert (tmp_path / "run" / HOLDER_FILE).is_file()  # it never cleaned up
    with DirectoryLock(tmp_path / "run", "run"):
        assert f"taking over the lock of a run that stopped (pid {holder.pid} on " in capsys.readouterr().err
    assert not (tmp_path / "run" / HOLDER_FILE).exists()


def test_the_lock_is_exclusive_within_a_process_too_but_reentrant_for_its_holder(tmp_path):
    with DirectoryLock(tmp_path / "d"), DirectoryLock(tmp_path / "d"):  # the same holder nests
        pass
    proc = hold(tmp_path / "d", "run")
    try:
        start = time.time()
        with pytest.raises(DirectoryBusy, match=f"pid {proc.pid}"), DirectoryLock(tmp_path / "d"):
            pass
        assert time.time() - start < 5  # refused at once, not after waiting
    finally:
        proc.kill()
        proc.wait()
