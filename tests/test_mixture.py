"""Multi-task stages: SFT and RL on the run's task mixed with another task by weight, each task rendered,
rewarded and scored on its own splits; the draw is seeded, resumes exactly, and a study can vary it."""

from __future__ import annotations

import copy
import json

import pytest

from biopost.config import ConfigError, validate_config
from biopost.data import LeakageError
from biopost.mixture import draw, item_counts, mixed_train
from biopost.models.policy import CHECKPOINT_FILE, load_policy
from biopost.pipeline import load_task_and_splits, run
from biopost.runlog import read_metrics
from biopost.study.config import study_from_dict
from biopost.study.plan import make_plan
from conftest import Interrupt, interrupt_at, same_cells_h5ad_options

pytestmark = pytest.mark.usefixtures("one_thread")

PBMC, AMP = "cell_type/pbmc68k", "amp/modlamp"
AMP_TASK = {"name": AMP, "options": {"max_peptides": 120}}
STAGES = {
    "sft": {"kind": "sft", "max_steps": 6, "eval_every_steps": 2, "batch_size": 8, "lr": 1e-2,
            "mixture": [{"task": AMP_TASK, "weight": 0.5}]},
    "rl": {"kind": "rl", "init": "base", "max_steps": 4, "eval_every_steps": 2, "prompts_per_step": 2,
           "num_generations": 2, "max_completion_length": 8, "lr": 1e-2, "mu": 2, "task_weight": 2.0,
           "mixture": [{"task": AMP_TASK, "weight": 2.0}]},
}


def mixed_config(fast_config, stage: dict):
    raw = fast_config()
    raw["stages"] = [copy.deepcopy(stage)]
    raw["eval"].update(splits=["val", "ood_test"], max_examples=4)
    return validate_config(raw)


@pytest.fixture(scope="module")
def amp():
    return load_task_and_splits(validate_config({"task": AMP_TASK, "stages": [{"kind": "sft"}]}))


@pytest.mark.parametrize("kind", ["sft", "rl"])
def test_two_task_stage_scores_both_tasks_and_resumes_to_the_same_result(kind, fast_config, tmp_path, monkeypatch):
    config = mixed_config(fast_config, STAGES[kind])
    whole = run(config, tmp_path / "whole")

    rows = [r for r in read_metrics(whole) if r["split"] != "train" and r["metric"] == "accuracy"]
    last = 6 if kind == "sft" else 4
    for task in (PBMC, AMP):  # every split of both tasks at every evaluation point, each under its own name
        assert {(r["split"], r["step"]) for r in rows if r["task"] == task} == {
            (split, step) for split in ("val", "ood_test") for step in range(0, last + 1, 2)}
    amp_rows = [r for r in rows if r["task"] == AMP]
    assert amp_rows[0]["split_fingerprints"] != json.loads((whole / "splits.json").read_text())["fingerprints"]
    # selection stays on the run's own task's val
    selection = json.loads((whole / "stages" / f"0-{kind}" / "selection.json").read_text())
    own_val = {r["step"]: r["value"] for r in rows if r["task"] == PBMC and r["split"] == "val"}
    assert selection["best_value"] == max(own_val.values()) == own_val[selection["best_step"]]
    # the share of training items follows the weights (sft 1 : 0.5, rl 2 : 2)
    items = json.loads((whole / "stages" / f"0-{kind}" / "final" / CHECKPOINT_FILE).read_text())["task"]["train_items"]
    share = items[AMP] / (items[AMP] + items[PBMC])
    assert share == pytest.approx(1 / 3 if kind == "sft" else 1 / 2, abs=1 / items[PBMC])

    resume = interrupt_at(monkeypatch, 4)
    with pytest.raises(Interrupt):
        run(config, tmp_path / "cut")
    resume()
    resumed = run(config, tmp_path / "cut")
    a = load_policy(whole / "stages" / f"0-{kind}" / "final").model.state_dict()
    b = load_policy(resumed / "stages" / f"0-{kind}" / "final").model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    final = lambda d: sorted((r["task"], r["split"], r["value"]) for r in read_metrics(d)  # noqa: E731
                             if r["step"] == last and r["split"] != "train" and r["metric"] == "accuracy")
    assert final(resumed) == final(whole)


def test_the_draw_is_seeded_and_an_epoch_holds_each_task_by_weight(fast_config, pbmc, amp):
    from biopost.stages.rl import prompts_for_step

    task, splits = pbmc
    stage = mixed_config(fast_config, STAGES["sft"]).stages[0]
    mixed = {AMP: amp}
    items = mixed_train(task, list(splits.train), stage, mixed)
    n = len(splits.train)
    assert item_counts(n, stage) == {AMP: round(n / 2)}
    assert [i.example.id for i in items] == [i.example.id for i in mixed_train(task, list(splits.train), stage, mixed)]
    reseeded = stage.model_copy(update={"seed": 1})
    assert [i.example.id for i in mixed_train(task, list(splits.train), reseeded, mixed)] != \
        [i.example.id for i in items]
    assert all(i.example in amp[1].train for i in items if i.task is amp[0])  # drawn from its own train split
    # RL walks one seeded permutation of the items per epoch: a whole epoch has exactly each task's share
    epoch = [p for step in range(len(items) // 3) for p in prompts_for_step(items, step, 3, seed=0)]
    assert sum(p.task is amp[0] for p in epoch) / len(epoch) == pytest.approx(1 / 3, abs=3 / len(epoch))
    # a task weighted above its size repeats each of its examples evenly
    counts = [draw(5, 12, [0, 1]).count(i) for i in range(5)]
    assert sum(counts) == 12 and max(counts) - min(counts) <= 1


def test_correctness_scores_each_completion_with_its_own_task(pbmc, amp):
    from biopost.rewards import correctness_reward

    cell, peptide = pbmc[1].train[0], amp[1].train[0]
    reward = correctness_reward(pbmc[0], amp[0])
    completions = [f"Answer: {cell.answer}", f"Answer: {peptide.answer}", f"Answer: {peptide.answer}"]
    values = reward(None, completions, [cell, peptide, cell], task_name=[PBMC, AMP, PBMC])
    assert values[:2] == [1.0, 1.0] and values[2] == 0.0


def test_mixture_errors_name_the_field(fast_config, tmp_path):
    def error(change) -> str:
        raw = fast_config()
        raw["stages"] = [copy.deepcopy(STAGES["sft"])]
        change(raw)
        with pytest.raises(ConfigError) as err:
            run(validate_config(raw), tmp_path / "never")
        assert not (tmp_path / "never" / "config.yaml").exists()
        return str(err.value)

    mixture = lambda raw: raw["stages"][0]["mixture"]  # noqa: E731
    assert "'stages.0.mixture.0.weight': Input should be greater than 0" in error(
        lambda r: mixture(r)[0].update(weight=0))
    assert "'stages.0.task_weight'" in error(lambda r: r["stages"][0].update(task_weight=-1.0))
    assert "stages.0.mixture.0.task.name: cell_type/pbmc68k is the run's own task" in error(
        lambda r: mixture(r)[0].update(task={"name": PBMC}))
    assert "stages.0.mixture.0.task: unknown task 'no/such'" in error(
        lambda r: mixture(r)[0].update(task={"name": "no/such"}))
    assert "'stages.0.mixture': each task is mixed in once" in error(lambda r: mixture(r).append(mixture(r)[0]))
    assert "stages.0.mixture.0.task.name: amp/modlamp is also in eval.forgetting.tasks" in error(
        lambda r: r["eval"].update(forgetting={"tasks": [AMP_TASK]}))
    assert "'stages.0.mixture.0.task.options.max_peptides': a number is expected" in error(
        lambda r: mixture(r)[0]["task"].update(options={"max_peptides": "x"}))
    assert "stages.0.task_weight: only meaningful with a mixture" in error(
        lambda r: r["stages"][0].update(mixture=[], task_weight=3.0))
    second = {**STAGES["rl"], "mixture": [{"task": {"name": AMP}, "weight": 1.0}]}
    assert "stages.1.mixture.0.task: amp/modlamp is mixed with other settings than in stages.0.mixture.0.task" in error(
        lambda r: r["stages"].append(second))


def test_a_mixed_task_with_the_runs_training_inputs_is_refused(fast_config, tmp_path):
    """The same cells through cell_type/h5ad: its test cells are cells the run trains on as its own task."""
    raw = fast_config()
    options = same_cells_h5ad_options(tmp_path)
    raw["stages"][0]["mixture"] = [{"task": {"name": "cell_type/h5ad", "options": options}, "weight": 1.0}]
    with pytest.raises(LeakageError, match="have the inputs of training examples") as err:
        run(validate_config(raw), tmp_path / "run")
    assert "mixed task cell_type/h5ad" in str(err.value) and "the run's task cell_type/pbmc68k" in str(err.value)


@pytest.mark.parametrize("forgetting", [False, True])
def test_a_cpt_corpus_with_another_scored_tasks_inputs_is_refused(forgetting, fast_config, tmp_path):
    """A mixed task (or a forgetting task) is scored at every evaluation point: its scored examples may not be
    in the CPT corpus any more than the run's own held-out ones (modlamp's peptides corpus holds amp's)."""
    raw = fast_config()
    amp = {"name": AMP, "options": {"max_peptides": 200}}
    cpt = {"kind": "cpt", "max_steps": 1, "corpus": {"source": "peptides", "take": 3000, "heldout": 10}}
    raw["stages"] = [cpt, {**raw["stages"][0], "mixture": [] if forgetting else [{"task": amp, "weight": 1.0}]}]
    if forgetting:
        raw["eval"]["forgetting"] = {"tasks": [{**amp, "splits": ["id_test"]}]}
    with pytest.raises(ConfigError, match=r"stage cpt: corpus: \d+ examples of task amp/modlamp scored at every "
                       r"evaluation point \(split (val, )?id_test.*\) appear in the CPT corpus"):
        run(validate_config(raw), tmp_path / "never")
    assert not (tmp_path / "never" / "config.yaml").exists()


def test_a_mixture_in_a_later_stage_shares_no_prefix_with_a_run_without_it():
    """The mixed task is scored from the first evaluation on, so even the earlier stages' rows differ."""
    constant = {"name": "constant", "warmup_steps": 0}
    sft = {"kind": "sft", "max_steps": 4, "eval_every_steps": 2, "schedule": constant}
    rl = {"kind": "rl", "max_steps": 2, "eval_every_steps": 2, "schedule": constant}
    mixtures = [[], [{"task": AMP_TASK, "weight": 1.0}], [{"task": AMP_TASK, "weight": 2.0}]]
    raw = {"name": "rlmix", "base": {"task": {"name": PBMC}, "stages": [sft, rl]},
           "grid": {"stages.rl.mixture": mixtures}}
    plan = make_plan(study_from_dict(raw), load_data=False)
    by_id = plan.by_id()
    mixes = {r.id: [m.weight for m in r.config.stages[1].mixture] for r in plan.runs}
    assert sorted(mixes.values()) == [[], [1.0], [2.0]]
    alone = next(r for r in plan.runs if not mixes[r.id])
    assert alone.donor is None and not any(r.donor == alone.id for r in plan.runs)
    mixed = [r for r in plan.runs if mixes[r.id]]  # the same mixed task: they share the SFT stage
    assert sum(r.donor is not None for r in mixed) == 1
    for r in mixed:
        if r.donor:
            assert by_id[r.donor] in mixed and r.branch == (1, 0)


def test_a_mixture_weight_is_a_study_axis_and_different_mixtures_share_nothing():
    stage = {"kind": "sft", "max_steps": 8, "eval_every_steps": 2, "schedule": {"name": "constant", "warmup_steps": 0},
             "mixture": [{"task": AMP_TASK, "weight": 0.5}]}
    raw = {"name": "mix", "base": {"task": {"name": PBMC}, "stages": [stage]},
           "grid": {"stages.sft.mixture.0.weight": [0.5, 1.0], "stages.sft.max_steps": [4, 8]}}
    plan = make_plan(study_from_dict(raw), load_data=False)
    by_id = plan.by_id()
    weight = "stages.sft.mixture.0.weight"
    assert sorted((r.axes[weight], r.steps) for r in plan.runs) == [(0.5, 4), (0.5, 8), (1.0, 4), (1.0, 8)]
    assert len(by_id) == 4
    for r in plan.runs:
        assert r.config.stages[0].mixture[0].weight == r.axes[weight]
        if r.steps == 8:
            assert r.donor is None
        else:  # the shorter run is a prefix of the longer one with the same mixture, never of another mixture
            assert by_id[r.donor].axes[weight] == r.axes[weight] and r.executed == 0
    assert (plan.steps_naive, plan.steps_executed) == (24, 16)

    # epochs count the items mixed in: 100 + 50 items in batches of 10
    epochs = {**stage, "max_steps": None, "epochs": 1.0, "batch_size": 10}
    plan = make_plan(study_from_dict({"name": "mix", "base": {"task": {"name": PBMC}, "stages": [epochs]},
                                      "train_examples": {PBMC: 100}}), load_data=False)
    assert plan.runs[0].steps == 15
