"""Executors: local (resumable, a rerun does nothing), Ray on a local instance, SLURM through submitit's
local executor; and the results table, which refuses runs scored on other splits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

import biopost.pipeline
from biopost.cli import main
from biopost.stages.context import StageContext
from biopost.study.config import study_from_dict
from biopost.study.execute import Resources, execute
from biopost.study.plan import prepare
from biopost.study.results import write_results

VALUES = ["run_id", "stage", "step", "split", "metric", "value", "n", "ci_low", "ci_high"]


def small_study(fast_config) -> dict:
    """Three runs: the backbone evaluated, and SFT for 2 and 4 steps (the 2-step one branches off)."""
    base = fast_config()
    base["eval"].update(splits=["val", "ood_test"], max_examples=4, max_new_tokens=8)
    base["stages"] = [{"kind": "sft", "max_steps": 4, "eval_every_steps": 2, "batch_size": 8, "lr": 1e-2,
                       "schedule": {"name": "constant", "warmup_steps": 0}}]
    return {"name": "small", "base": base, "pipelines": {"base-only": [{"kind": "eval"}], "sft": ["sft"]},
            "blocks": {"base": {"pipeline": ["base-only"]},
                       "length": {"pipeline": ["sft"], "grid": {"stages.sft.max_steps": [2, 4]}}}}


def table(study_dir: Path) -> pd.DataFrame:
    frame = write_results(study_dir)[2]
    return frame[VALUES].sort_values(VALUES[:5]).reset_index(drop=True)


class Killed(Exception):
    pass


def test_local_study_resumes_after_a_kill_reruns_as_a_no_op_and_collects(fast_config, tmp_path, monkeypatch, one_thread):
    study = study_from_dict(small_study(fast_config))
    plan = prepare(study, tmp_path / "whole")
    assert execute(plan, tmp_path / "whole") == []
    whole = table(tmp_path / "whole")

    original = StageContext.evaluate_and_save

    def killed_at_step_2(self, policy, step, epoch):
        if step == 2 and self.stage.kind == "sft":
            raise Killed
        return original(self, policy, step, epoch)

    monkeypatch.setattr(StageContext, "evaluate_and_save", killed_at_step_2)
    cut = tmp_path / "cut"
    failed = execute(prepare(study, cut), cut)
    trunk = next(r for r in plan.runs if r.snapshots)
    assert trunk.id in failed and len(failed) == 2  # the trunk died; its branch waits for it
    monkeypatch.setattr(StageContext, "evaluate_and_save", original)
    assert execute(prepare(study, cut), cut) == []
    pd.testing.assert_frame_equal(table(cut), whole)

    def no_run(*args, **kwargs):
        raise AssertionError("a finished study must not run anything")

    monkeypatch.setattr(biopost.pipeline, "run", no_run)
    assert main(["study", "run", str(cut)]) == 0  # a study directory resumes from its own study.yaml

    frame = pd.read_parquet(cut / "results.parquet")
    assert {"run_id", "stages.sft.max_steps", "pipeline", "blocks", "budget", "task", "stage", "stage_kind", "step",
            "split", "metric", "value", "ci_low", "ci_high", "n", "split_fingerprint", "eval_fingerprint",
            "shared_from"} <= set(frame.columns)
    evals = frame[frame.metric == "accuracy"]
    assert set(evals.split) == {"val", "ood_test"} and evals.split_fingerprint.notna().all()
    by_length = evals.groupby("stages.sft.max_steps", dropna=False).step.max().to_dict()
    assert by_length[2.0] == 2 and by_length[4.0] == 4
    assert set(frame[frame.stage_kind == "eval"].pipeline) == {"base-only"}
    assert set(evals[evals["stages.sft.max_steps"] == 2].shared_from) == {trunk.id}
    assert len(pd.read_csv(cut / "results.csv")) == len(frame)


def test_collect_refuses_a_run_scored_on_other_splits(fast_config, tmp_path, capsys, one_thread):
    raw = small_study(fast_config)
    raw["blocks"] = {"base": {"pipeline": ["base-only"]}}
    study_dir = tmp_path / "s"
    plan = prepare(study_from_dict(raw), study_dir)
    assert execute(plan, study_dir) == []
    splits = study_dir / "runs" / plan.runs[0].id / "splits.json"
    saved = json.loads(splits.read_text())
    saved["fingerprints"]["val"] = "0" * 16
    splits.write_text(json.dumps(saved))
    assert main(["study", "collect", str(study_dir)]) == 2
    err = capsys.readouterr().err
    assert f"run {plan.runs[0].id}: split fingerprints differ from the study's (val)" in err


def shrunk_mini() -> dict:
    """configs/studies/mini.yaml with tiny lengths and evaluations: the same plan shape, fast."""
    raw = yaml.safe_load((Path(__file__).parent.parent / "configs" / "studies" / "mini.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["base"]["eval"].update(splits=["val"], max_examples=4, max_new_tokens=8)
    sft, rl = raw["base"]["stages"]
    sft.update(max_steps=4, eval_every_steps=2, schedule={"name": "warmup_stable_decay", "warmup_steps": 1,
                                                          "decay_ratio": 0.5})
    rl.update(max_steps=2, eval_every_steps=1, prompts_per_step=2, num_generations=2, max_completion_length=8)
    raw["blocks"] = {"sft-length": {"pipeline": ["sft"], "grid": {"stages.sft.max_steps": [2, 4]}},
                     "rl-after-sft": {"pipeline": ["sft-rl"], "grid": {"stages.sft.max_steps": [4],
                                                                       "stages.rl.max_steps": [1, 2]}}}
    return raw


def test_ray_runs_the_mini_plan_on_a_local_instance(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    study_dir = tmp_path / "mini"
    plan = prepare(study_from_dict(shrunk_mini(), Path("configs/studies")), study_dir)
    assert any(r.donor for r in plan.runs)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert execute(plan, study_dir, "ray", Resources(cpus=1)) == []
        # a one-CPU run uses one thread in torch and in every native pool (idle pool threads spin otherwise)
        for r in plan.runs:
            threads = json.loads((study_dir / "runs" / r.id / "env.json").read_text())["threads"]
            assert set(threads.values()) == {1}, threads
    finally:
        ray.shutdown()
    assert all((study_dir / "runs" / r.id / "DONE").is_file() for r in plan.runs)
    assert all((study_dir / "runs" / r.id / "branched_from.json").is_file() for r in plan.runs if r.donor)
    assert execute(plan, study_dir, "ray") == []  # finished: nothing submitted


@pytest.mark.slow  # each job is a fresh Python process importing the training stack (~30 s on 2 cores)
def test_slurm_through_submitit_local_executor(fast_config, tmp_path):
    pytest.importorskip("submitit")
    raw = small_study(fast_config)
    raw["blocks"] = {"length": raw["blocks"]["length"]}
    study_dir = tmp_path / "s"
    plan = prepare(study_from_dict(raw), study_dir)
    assert sorted(r.wave for r in plan.runs) == [0, 1]  # two job arrays, the branch after its trunk
    assert execute(plan, study_dir, "slurm", Resources(cluster="local", time_min=10)) == []
    assert all((study_dir / "runs" / r.id / "DONE").is_file() for r in plan.runs)
    assert list((study_dir / "slurm").glob("*/*_submitted.pkl"))


def test_a_runs_thread_cap_reaches_pools_loaded_later_and_is_undone_after(monkeypatch):
    import os

    import torch
    from threadpoolctl import threadpool_info

    from biopost.study.execute import limited_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    before = {p["filepath"]: p["num_threads"] for p in threadpool_info()}
    with limited_threads(1):
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"  # read by pools that load now
        assert {p["num_threads"] for p in threadpool_info()} == {1}
    # the local executor runs in the caller's process: its own settings come back
    assert torch.get_num_threads() == 2 and "OMP_NUM_THREADS" not in os.environ
    after = {p["filepath"]: p["num_threads"] for p in threadpool_info()}
    assert all(after[path] == n for path, n in before.items())
