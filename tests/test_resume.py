"""Rule 5: an interrupted run resumes from its last checkpoint and ends where an uninterrupted one does."""

from __future__ import annotations

import pytest

from biopost.config import validate_config
from biopost.models.policy import load_policy
from biopost.pipeline import run
from biopost.runlog import read_metrics
from conftest import Interrupt, interrupt_at


pytestmark = pytest.mark.usefixtures("one_thread")


def config_for(stage: dict, fast_config):
    raw = fast_config()
    raw["stages"] = [stage]
    raw["eval"]["splits"] = ["val"]
    return validate_config(raw)


STAGES = {
    "sft": {"kind": "sft", "max_steps": 6, "eval_every_steps": 2, "batch_size": 8, "lr": 1e-2},
    "rl": {"kind": "rl", "init": "base", "max_steps": 4, "eval_every_steps": 2, "prompts_per_step": 2,
           "num_generations": 2, "max_completion_length": 8, "lr": 1e-2, "mu": 2},
}


@pytest.mark.parametrize("kind", ["sft", "rl"])
def test_interrupted_stage_resumes_to_the_same_weights(kind, fast_config, tmp_path, monkeypatch):
    config = config_for(STAGES[kind], fast_config)
    name = f"0-{kind}"
    reference = run(config, tmp_path / "whole")

    resume = interrupt_at(monkeypatch, 4)
    with pytest.raises(Interrupt):
        run(config, tmp_path / "cut")
    assert not (tmp_path / "cut" / "stages" / name / "DONE").exists()
    resume()
    resumed = run(config, tmp_path / "cut")

    steps = lambda d: sorted({r["step"] for r in read_metrics(d) if r["split"] == "val" and r["metric"] == "accuracy"})  # noqa: E731
    assert steps(resumed) == steps(reference)
    a = load_policy(reference / "stages" / name / "final").model.state_dict()
    b = load_policy(resumed / "stages" / name / "final").model.state_dict()
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


def test_rl_resumes_from_a_save_point_between_eval_points(fast_config, tmp_path, monkeypatch, capsys):
    """save_every_steps 2, evaluation only at step 4: a crash in step 3 resumes at step 2, not from scratch."""
    from biopost.stages import rl

    stage = {**STAGES["rl"], "eval_every_steps": 4, "save_every_steps": 2, "eval_at_start": False}
    config = config_for(stage, fast_config)
    reference = run(config, tmp_path / "whole")

    real, calls = rl.optimise, []

    def crash_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "optimise", crash_in_step_3)
    with pytest.raises(Interrupt):
        run(config, tmp_path / "cut")
    monkeypatch.setattr(rl, "optimise", lambda *a, **k: calls.append(1) or real(*a, **k))
    calls.clear()
    capsys.readouterr()
    resumed = run(config, tmp_path / "cut")
    assert "resuming at step 2" in capsys.readouterr().out
    assert len(calls) == 2  # steps 3 and 4 only
    a = load_policy(reference / "stages" / "0-rl" / "final").model.state_dict()
    b = load_policy(resumed / "stages" / "0-rl" / "final").model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


# ---------------------------------------------------------------- resuming over changed data is refused
def cut_after_splits(monkeypatch):
    """Interrupt every run right after it wrote splits.json (before any model is built)."""
    import biopost.pipeline

    def interrupt(*args, **kwargs):
        raise Interrupt
    monkeypatch.setattr(biopost.pipeline, "resolve_backbone", interrupt)


def resume_error(config, run_dir) -> str:
    """Start a run, then resume it after ``edit`` changed its data: the one-line error (or '' when it resumed)."""
    from biopost.config import ConfigError

    try:
        run(config, run_dir)
    except Interrupt:
        return ""
    except ConfigError as err:
        return str(err)
    raise AssertionError("the run was expected to stop")


def test_resume_refuses_an_edited_table(tmp_path, monkeypatch):
    import csv

    cut_after_splits(monkeypatch)
    rows = [{"cell_id": f"c{i:02d}", "genes": f"G{i} M{i % 3}", "cell_type": "ABC"[i % 3], "phase": "G1 S".split()[i % 2]}
            for i in range(40)]

    def write(rows):
        with (tmp_path / "cells.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader(), writer.writerows(rows)

    write(rows)
    config = validate_config({"task": {"name": "table", "options": {
        "source": str(tmp_path / "cells.csv"), "columns": {"id": "cell_id", "answer": "cell_type", "group": "phase"},
        "prompt": "Genes: {{ genes }}"}, "split": {"ood_test_groups": ["S"]}}, "stages": [{"kind": "sft"}]})
    run_dir = tmp_path / "run"
    assert resume_error(config, run_dir) == ""  # started, then cut
    assert resume_error(config, run_dir) == ""  # the same data resumes
    rows[1]["cell_type"] = "A"  # a corrected label, same ids (c01 is in ood_test: phase S)
    write(rows)
    assert resume_error(config, run_dir) == (
        f"{run_dir}: the ood_test split's examples differ from those this run started on (splits.json): the task's "
        "data changed; rerun into a new --output-dir")
    write(rows[:-2])  # rows dropped: other ids
    assert "split's example ids differ" in resume_error(config, run_dir)


def test_resume_refuses_an_edited_h5ad(tmp_path, monkeypatch):
    import anndata
    import numpy as np
    import pandas as pd

    cut_after_splits(monkeypatch)
    counts = np.random.default_rng(0).poisson(2.0, size=(36, 12)).astype(np.float32) + np.eye(36, 12, dtype=np.float32)
    obs = pd.DataFrame({"cell_type": list("TBN" * 12), "donor": [f"d{i % 3}" for i in range(36)]},
                       index=[f"cell{i}" for i in range(36)])
    var = pd.DataFrame(index=[f"GENE{j}" for j in range(12)])
    path = tmp_path / "cells.h5ad"
    anndata.AnnData(counts, obs=obs, var=var).write_h5ad(path)
    config = validate_config({"task": {"name": "cell_type/h5ad", "options": {
        "path": str(path), "label_key": "cell_type", "group_key": "donor"}, "split": {"ood_test_groups": ["d2"]}},
        "stages": [{"kind": "sft"}]})
    run_dir = tmp_path / "run"
    assert resume_error(config, run_dir) == resume_error(config, run_dir) == ""
    counts[0, :] = counts[0, ::-1]  # one cell's expression re-measured (cell0: donor d0, in-domain)
    anndata.AnnData(counts, obs=obs, var=var).write_h5ad(path)
    message = resume_error(config, run_dir)
    assert message.startswith(f"{run_dir}: the ") and "split's examples differ" in message
    assert message.split()[2] in ("train", "val", "id_test") and "new --output-dir" in message
