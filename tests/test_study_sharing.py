"""Sharing is exact: every run of a study that copied a prefix ends bit-identical to the same run trained alone.

Covers an SFT that branches mid-stage into its own decay (WSD), an SFT shorter than the trunk that is
complete at the branch point (constant), RL branches with and without steps left, whole stages copied
before a stage of their own, and the trunk itself (its extra snapshots change nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from biopost.pipeline import run
from biopost.runlog import read_metrics
from biopost.study.config import study_from_dict
from biopost.study.execute import execute
from biopost.study.plan import make_plan


def study_raw(fast_config, sft_schedule: dict, rl_schedule: dict, arms: list[str]) -> dict:
    base = fast_config()
    base["eval"].update(splits=["val"], max_examples=4, max_new_tokens=8)
    base["stages"] = [
        {"kind": "sft", "max_steps": 8, "eval_every_steps": 2, "batch_size": 8, "lr": 1e-2, "schedule": sft_schedule,
         "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1}},  # dropout: the restored RNG must be the right one
        {"kind": "rl", "init": "sft", "max_steps": 4, "eval_every_steps": 2, "prompts_per_step": 2,
         "num_generations": 2, "max_completion_length": 8, "lr": 1e-2, "mu": 2, "schedule": rl_schedule},
    ]
    return {"name": "share", "base": base, "pipelines": {"sft": ["sft"], "sft-rl": ["sft", "rl"]},
            "blocks": {"b": {"pipeline": arms, "grid": {"stages.sft.max_steps": [4, 8], "stages.rl.max_steps": [2, 4]}}}}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(run_dir.glob("stages/*/final/*.safetensors")):
        out.update({f"{file.parent.parent.name}/{k}": v for k, v in load_file(file).items()})
    return out


def assert_same_run(shared: Path, alone: Path) -> None:
    a, b = weights(shared), weights(alone)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert read_metrics(shared) == read_metrics(alone)
    for selection in alone.glob("stages/*/selection.json"):
        mine = json.loads((shared / selection.relative_to(alone)).read_text())
        assert mine["best_step"] == json.loads(selection.read_text())["best_step"]
        assert Path(mine["checkpoint"]).is_relative_to(shared) or not Path(mine["checkpoint"]).is_absolute()
    assert sorted(p.name for p in (shared / "predictions").iterdir()) == sorted(p.name for p in (alone / "predictions").iterdir())


WSD = {"name": "warmup_stable_decay", "warmup_steps": 1, "decay_ratio": 0.5}
CONSTANT = {"name": "constant", "warmup_steps": 1}


@pytest.mark.parametrize("schedule, arms, expect, check", [
    # WSD SFT 4 decays over its last 2 steps: branches at 2; RL 2 of 4 (mu 2) branches at step 1
    (WSD, ["sft-rl"], {(4, 4): ("sft", 2), (8, 2): ("rl", 1), (4, 2): ("rl", 1)}, [(8, 4), (4, 4), (8, 2)]),
    # constant: the shorter SFT and RL are complete at the branch point; the SFT-only runs copy whole stages
    (CONSTANT, ["sft-rl", "sft"], {(4, 4): ("sft", 4), (8, 2): ("rl", 2), (4, 2): ("rl", 2), (8,): ("sft", "whole"),
                                    (4,): ("sft", "whole")}, [(4, 4), (4, 2), (4,)]),
], ids=["wsd", "constant"])
def test_shared_runs_equal_runs_trained_alone(schedule, arms, expect, check, fast_config, tmp_path, one_thread):
    plan = make_plan(study_from_dict(study_raw(fast_config, schedule, schedule, arms)), load_data=True)
    lengths = {tuple(s["steps"] for s in r.stages): r for r in plan.runs}
    for key, (stage, step) in expect.items():
        branch = lengths[key].branch
        assert lengths[key].stages[branch[0] - (step == "whole")]["name"] == stage
        assert branch[1] == (0 if step == "whole" else step), (key, branch)
    assert execute(plan, tmp_path / "study") == []
    trunk = lengths[(8, 4)]
    assert trunk.donor is None and trunk.snapshots
    for planned in (lengths[k] for k in check):  # the trunk (its snapshots change nothing) and its branches
        alone = run(planned.config, tmp_path / "alone" / planned.id)
        assert_same_run(tmp_path / "study" / "runs" / planned.id, alone)
