"""Real SIGKILLs during CPT, SFT and RL, and of a study between and during runs: rerunning the same command
resumes from the last checkpoint and ends with the same metrics and the same final weights, bit for bit
(CPU, one thread: the arithmetic is deterministic, so no tolerance is needed)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from faultkit import assert_killed, assert_ok, biopost, final_weights, results, write_yaml

from biopost.runlog import DONE


def pipeline(fast_config) -> dict:
    """CPT, SFT and RL, each saving a resumable state every 2 steps."""
    raw = fast_config()
    raw["name"] = "kills"
    raw["eval"].update(splits=["val"], max_examples=8, max_new_tokens=8)
    raw["stages"] = [
        {"kind": "cpt", "max_steps": 4, "eval_every_steps": 2, "batch_size": 4, "seq_length": 64, "lr": 1e-3,
         "corpus": {"source": "cell_sentences", "take": 40, "heldout": 8}},
        {"kind": "sft", "max_steps": 6, "eval_every_steps": 2, "batch_size": 8, "lr": 1e-2},
        {"kind": "rl", "max_steps": 4, "eval_every_steps": 2, "prompts_per_step": 2, "num_generations": 2,
         "max_completion_length": 8, "lr": 1e-2, "mu": 2},
    ]
    return raw


@pytest.fixture(scope="module")
def reference(fast_config, tmp_path_factory):
    """The uninterrupted run: (config path, run directory)."""
    tmp = tmp_path_factory.mktemp("kills")
    config = write_yaml(pipeline(fast_config), tmp / "kills.yaml")
    assert_ok(biopost("train", config, "--output-dir", tmp / "whole"))
    return config, tmp / "whole"


def test_sigkill_in_each_stage_then_rerun_ends_as_the_uninterrupted_run(reference, tmp_path):
    config, whole = reference
    cut = tmp_path / "cut"
    for point in ("cpt:3:1", "sft:5:1", "rl:3:1"):  # each past a save point (step 2 or 4) of its stage
        assert_killed(biopost("train", config, "--output-dir", cut, kill=point))
        assert not (cut / DONE).exists()
    resumed = biopost("train", config, "--output-dir", cut)
    assert_ok(resumed)
    assert "taking over the lock" in resumed.stderr  # the killed runner never released it
    assert results(cut) == results(whole)
    assert final_weights(cut) == final_weights(whole) and len(final_weights(whole)) == 3


def test_external_sigkill_after_the_first_checkpoint(reference, tmp_path):
    """Killed from outside as soon as the first resumable checkpoint exists, wherever the run then is."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from faultkit import KILLER, SRC

    config, whole = reference
    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(KILLER), "-", "train", str(config), "--output-dir", str(cut)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = cut / "stages" / "0-cpt" / "trainer" / "checkpoint-2" / "manifest.json"
    deadline = time.time() + 300
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert_ok(biopost("train", config, "--output-dir", cut))
    assert results(cut) == results(whole)
    assert final_weights(cut) == final_weights(whole)


def study(fast_config) -> dict:
    """Two runs sharing no prefix (two learning rates), so the second trains from its first step."""
    base = fast_config()
    base["eval"].update(splits=["val"], max_examples=4, max_new_tokens=8)
    base["stages"] = [{"kind": "sft", "max_steps": 4, "eval_every_steps": 2, "batch_size": 8, "lr": 1e-2,
                       "schedule": {"name": "constant", "warmup_steps": 0}}]
    return {"name": "killed", "base": base, "pipelines": {"sft": ["sft"]},
            "blocks": {"lr": {"pipeline": ["sft"], "grid": {"stages.sft.lr": [1e-2, 5e-3]}}}}


def table(study_dir):
    import pandas as pd

    frame = pd.read_csv(study_dir / "results.csv")
    cols = ["run_id", "stage", "step", "split", "metric", "value", "n"]
    return frame[cols].sort_values(cols[:5]).reset_index(drop=True)


def test_study_killed_between_and_during_runs_resumes_to_the_same_table(fast_config, tmp_path):
    spec = write_yaml(study(fast_config), tmp_path / "study.yaml")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert_ok(biopost("study", "run", spec, "--output-dir", whole))
    assert_ok(biopost("study", "collect", whole))

    assert_killed(biopost("study", "run", spec, "--output-dir", cut, kill="run:2"))  # between run 1 and run 2
    plan = json.loads((cut / "plan.json").read_text())
    done = [r["id"] for r in plan["runs"] if (cut / "runs" / r["id"] / DONE).is_file()]
    assert len(done) == 1
    assert_killed(biopost("study", "run", spec, "--output-dir", cut, kill="sft:3:1"))  # inside the second run
    assert_ok(biopost("study", "run", spec, "--output-dir", cut))
    assert_ok(biopost("study", "collect", cut))
    assert table(cut).equals(table(whole))


@pytest.mark.slow  # about a minute; test_trackers covers the same logic in-process (an exception, a log left open)
@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_sigkill_then_resume_leaves_mlflow_with_each_point_once(fast_config, tmp_path, monkeypatch):
    """MLflow cannot delete points: killed past the save point at step 2, the run sent it nothing of steps 3 and
    4, so after the resume redoes them the same MLflow run holds each point once, equal to metrics.jsonl."""
    from mlflow.tracking import MlflowClient

    from biopost.runlog import read_metrics

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = fast_config()
    raw["report_to"] = ["mlflow"]
    raw["eval"].update(splits=["val"], max_examples=4, max_new_tokens=8)
    raw["stages"][0].update(max_steps=4, eval_every_steps=2)
    config, run_dir = write_yaml(raw, tmp_path / "run.yaml"), tmp_path / "run"
    assert_killed(biopost("train", config, "--output-dir", run_dir, kill="sft:3:1"))
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert_ok(biopost("train", config, "--output-dir", run_dir))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name != "Default"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"
    for metric in ("loss", "accuracy"):
        rows = [r for r in read_metrics(run_dir) if r["metric"] == metric]
        history = client.get_metric_history(run_id, f"sft/{rows[0]['split']}/{metric}")
        assert [(m.step, m.value) for m in history] == [(r["step"], r["value"]) for r in rows]
    assert [r["step"] for r in read_metrics(run_dir) if r["metric"] == "loss"] == [1, 2, 3, 4]
