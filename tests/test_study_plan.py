"""The planner: exact prefix sharing only where learning rates provably agree; step accounting; presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from biopost.cli import main
from biopost.config import ConfigError
from biopost.registry import TASKS, task_names
from biopost.study.config import load_study, study_from_dict
from biopost.study.plan import make_plan

PRESETS = Path(__file__).parent.parent / "configs" / "studies"


def base(schedule: dict, rl_schedule: dict | None = None) -> dict:
    return {
        "task": {"name": "cell_type/pbmc68k"},
        "stages": [
            {"kind": "sft", "max_steps": 32, "eval_every_steps": 4, "schedule": schedule},
            {"kind": "rl", "init": "sft", "max_steps": 8, "eval_every_steps": 2, "mu": 2,
             "schedule": rl_schedule or {"name": "constant", "warmup_steps": 0}},
        ],
    }


def plan_of(schedule: dict, blocks: dict, rl_schedule: dict | None = None):
    raw = {"name": "s", "base": base(schedule, rl_schedule),
           "pipelines": {"sft": ["sft"], "sft-rl": ["sft", "rl"]}, "blocks": blocks}
    return make_plan(study_from_dict(raw), load_data=False)


def lengths(run) -> tuple:
    return tuple(s["steps"] for s in run.stages)


WSD = {"name": "warmup_stable_decay", "warmup_steps": 2, "decay_ratio": 0.25}
SFT_LENGTHS = {"b": {"pipeline": ["sft"], "grid": {"stages.sft.max_steps": [8, 16, 32]}}}


def test_wsd_lengths_branch_off_the_longest_where_their_decay_starts():
    plan = plan_of(WSD, SFT_LENGTHS)
    runs = {lengths(r): r for r in plan.runs}
    trunk = runs[(32,)]
    assert trunk.donor is None and trunk.snapshots == {0: [6, 12]}
    # 16 steps decay over round(.25 * 16) = 4: the branch copies the 12 stable steps and trains its decay
    assert (runs[(16,)].donor, runs[(16,)].branch, runs[(16,)].executed) == (trunk.id, (0, 12), 4)
    assert (runs[(8,)].donor, runs[(8,)].branch, runs[(8,)].executed) == (trunk.id, (0, 6), 2)
    assert (plan.steps_naive, plan.steps_executed) == (56, 38)


def test_cosine_shares_nothing_and_says_so():
    plan = plan_of({"name": "cosine", "warmup_steps": 2}, SFT_LENGTHS)
    assert all(r.donor is None for r in plan.runs) and plan.steps_executed == plan.steps_naive == 56
    assert any("cosine schedule: its lengths share nothing" in n for n in plan.notes)


def test_warmup_ratio_is_flagged_and_constant_with_warmup_steps_shares_the_whole_shorter_run():
    ratio = plan_of({"name": "constant", "warmup_ratio": 0.25}, SFT_LENGTHS)
    assert any("warmup_ratio" in n for n in ratio.notes)
    assert ratio.steps_executed > 32 + 8  # at most the first update of each warmup is common
    const = plan_of({"name": "constant", "warmup_steps": 3}, SFT_LENGTHS)
    runs = {lengths(r): r for r in const.runs}
    assert runs[(8,)].branch == (0, 8) and runs[(8,)].executed == 0  # trained by the trunk; only evaluated
    assert const.steps_executed == 32


def test_rl_branches_start_from_the_right_sft_point_of_the_trunk():
    plan = plan_of(WSD, {"b": {"pipeline": ["sft-rl"], "grid": {"stages.sft.max_steps": [8, 32],
                                                                 "stages.rl.max_steps": [4, 8]}}})
    runs = {lengths(r): r for r in plan.runs}
    trunk, short = runs[(32, 8)], runs[(8, 8)]
    assert trunk.donor is None and trunk.snapshots == {0: [6], 1: [4]}
    assert (runs[(32, 4)].donor, runs[(32, 4)].branch) == (trunk.id, (1, 4))  # RL prefix of the trunk's RL
    assert (short.donor, short.branch) == (trunk.id, (0, 6))  # its SFT decays on its own, then its own RL
    assert (runs[(8, 4)].donor, runs[(8, 4)].branch) == (short.id, (1, 4))
    assert short.snapshots == {1: [4]} and runs[(8, 4)].wave == 2
    assert plan.steps_naive == 40 + 36 + 16 + 12 and plan.steps_executed == 40 + 0 + (2 + 8) + 0


def test_identical_stages_are_shared_whole_and_a_prefix_run_trains_nothing():
    plan = plan_of({"name": "cosine"}, {"a": {"pipeline": ["sft", "sft-rl"]}})
    runs = {lengths(r): r for r in plan.runs}
    assert runs[(32,)].branch == (1, 0) and runs[(32,)].executed == 0
    assert plan.steps_executed == 40


def test_different_run_settings_share_nothing():
    plan = plan_of(WSD, {"b": {"pipeline": ["sft"], "grid": {"stages.sft.max_steps": [8, 32], "seed": [0, 1]}}})
    for run in plan.runs:
        if run.donor:
            assert plan.by_id()[run.donor].config.seed == run.config.seed


def test_dry_run_counts_epochs_only_on_declared_sizes():
    raw = {"name": "s", "base": {"task": {"name": "cell_type/pbmc68k"},
                                 "stages": [{"kind": "sft", "epochs": 2, "batch_size": 8}]}}
    with pytest.raises(ConfigError, match="train_examples: {cell_type/pbmc68k: N}"):
        make_plan(study_from_dict(raw), load_data=False)
    plan = make_plan(study_from_dict({**raw, "train_examples": {"cell_type/pbmc68k": 100}}), load_data=False)
    assert plan.runs[0].stages[0]["steps"] == 2 * 13 and plan.sizes == "declared"


def test_plan_cli_json_has_runs_and_step_totals(tmp_path, capsys):
    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": base(WSD), "pipelines": {"sft": ["sft"]}, "blocks": SFT_LENGTHS}))
    assert main(["study", "plan", str(path), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (len(out["runs"]), out["steps_executed"], out["steps_naive"]) == (3, 38, 56)
    assert main(["study", "plan", str(path), "--dry-run"]) == 0
    tree = capsys.readouterr().out
    assert "38 optimizer steps executed of 56" in tree and "└─" in tree
    assert main(["study", "plan", str(tmp_path / "none.yaml")]) == 2
    assert "study file not found" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["paper-genomics", "paper-proteins", "paper-transcriptomics", "mini"])
def test_presets_plan_without_loading_anything(preset):
    plan = make_plan(load_study(PRESETS / f"{preset}.yaml"), load_data=False)
    assert len(plan.runs) >= (100 if preset.startswith("paper") else 10)
    for task in {json.dumps(r.config.task.model_dump(mode="json"), sort_keys=True) for r in plan.runs}:
        task = json.loads(task)
        if task["name"] in task_names():  # tasks not registered yet are checked when they land
            TASKS[task["name"]].Options.model_validate(task["options"])
    assert plan.steps_executed < plan.steps_naive
    if preset == "paper-genomics":
        assert plan.steps_executed <= 0.6 * plan.steps_naive


def test_fraction_size_counts_what_the_stages_sample():
    from biopost.stages.sft import sample_fraction
    from biopost.study.plan import fraction_size

    for n in (1, 7, 351, 1000):
        for fraction in (0.01, 0.2, 0.25, 0.5, 0.999, 1.0):
            assert fraction_size(n, fraction) == len(sample_fraction(list(range(n)), fraction, seed=3))
