"""Rule 5: an interrupted run resumes from its last checkpoint and ends where an uninterrupted one does."""

from __future__ import annotations

import pytest

from biopost.config import validate_config
from biopost.models.policy import load_policy
from biopost.pipeline import run
from biopost.runlog import read_metrics
from biopost.stages.context import StageContext


pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


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

    original = StageContext.evaluate_and_save

    def crash_at_step_4(self, policy, step, epoch):
        if step == 4:
            raise Interrupt
        return original(self, policy, step, epoch)

    monkeypatch.setattr(StageContext, "evaluate_and_save", crash_at_step_4)
    with pytest.raises(Interrupt):
        run(config, tmp_path / "cut")
    assert not (tmp_path / "cut" / "stages" / name / "DONE").exists()
    monkeypatch.setattr(StageContext, "evaluate_and_save", original)
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
