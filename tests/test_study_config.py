"""Study configs: arms x grid x zip x budgets expand into validated run configs; errors name axis and value."""

from __future__ import annotations

import pytest

from biopost.config import ConfigError
from biopost.study.config import expand, get_field, study_from_dict

BASE = {
    "task": {"name": "cell_type/pbmc68k"},
    "model": {"backbone": "tiny-s", "lora": {"rank": 8, "alpha": 16.0}},
    "stages": [
        {"kind": "sft", "max_steps": 40, "batch_size": 8, "lora": {"rank": 32, "alpha": 64.0}},
        {"kind": "rl", "init": "sft:best", "max_steps": 20, "prompts_per_step": 4, "lora": {"rank": 4, "alpha": 8.0}},
    ],
}


def study(**fields) -> dict:
    return {"name": "s", "base": BASE, **fields}


def configs(raw: dict):
    return [cell.config for cell in expand(study_from_dict(raw))]


def test_grid_and_zip_cross_and_zipped_fields_move_together():
    cells = configs(study(grid={"stages.sft.max_steps": [10, 20, 40]},
                          zip=[{"stages.sft.lora.rank": [64, 8], "stages.rl.lora.rank": [4, 32]}]))
    pairs = {(c.stages[0].max_steps, c.stages[0].lora.rank, c.stages[1].lora.rank) for c in cells}
    assert len(cells) == 6 and {(r1, r2) for _, r1, r2 in pairs} == {(64, 4), (8, 32)}
    assert {c.name for c in cells} == {"s"} and len({c.run_id() for c in cells}) == 6


def test_arms_select_stages_and_an_axis_applies_only_where_its_stage_is():
    raw = study(pipelines={"sft": ["sft"], "rl-cold": {"stages": ["rl"], "set": {"stages.rl.init": "base"}},
                           "base-only": [{"kind": "eval"}]},
                grid={"stages.sft.max_steps": [10, 20]})
    cells = expand(study_from_dict(raw))
    ids = {c.config.run_id() for c in cells}
    assert len(cells) == 6 and len(ids) == 4  # rl-cold and base-only do not vary with the SFT length
    cold = next(c.config for c in cells if c.pipeline == "rl-cold")
    assert [s.kind for s in cold.stages] == ["rl"] and cold.stages[0].init == "base"
    assert get_field(cold.model_dump(mode="json"), "stages.sft.max_steps") is None


def test_star_sets_a_field_on_every_stage_that_has_it():
    cells = configs(study(pipelines={"p": ["sft", "rl", {"kind": "eval", "name": "last"}]}, grid={"stages.*.seed": [3]}))
    assert [s.seed for s in cells[0].stages] == [3, 3, 3]


def test_invalid_value_names_block_axis_and_value():
    with pytest.raises(ConfigError, match=r"block main, pipeline base, stages\.sft\.lr=-1: .*greater than 0"):
        configs(study(grid={"stages.sft.lr": [1e-4, -1]}))


def test_axis_for_a_stage_no_arm_has_is_an_error():
    with pytest.raises(ConfigError, match=r"axis stages\.cpt\.lr names a stage"):
        configs(study(grid={"stages.cpt.lr": [1e-4]}))


def test_init_naming_a_missing_stage_is_an_error_before_anything_runs():
    with pytest.raises(ConfigError, match=r"pipeline rl-only.*init 'sft:best'.*stages\.rl\.init"):
        configs(study(pipelines={"rl-only": ["rl"]}))


def test_unknown_arm_and_unequal_zip_are_errors():
    with pytest.raises(ConfigError, match="unknown pipeline 'nope'"):
        study_from_dict(study(blocks={"b": {"pipeline": ["nope"]}}))
    with pytest.raises(ConfigError, match="equal lengths"):
        study_from_dict(study(zip=[{"seed": [0, 1], "stages.sft.lr": [1e-4]}]))
    with pytest.raises(ConfigError, match="unknown key 'blocks.b.gird'"):
        study_from_dict(study(blocks={"b": {"gird": {}}}))


def test_epoch_budget_splits_the_total_and_a_zero_share_drops_the_stage():
    raw = study(blocks={"b": {"budget": {"unit": "epochs", "total": 8, "stages": ["sft", "rl"],
                                         "shares": [[0, 8], [1, 7], [8, 0]]}}})
    cells = expand(study_from_dict(raw))
    by_label = {c.budget: c for c in cells}
    assert set(by_label) == {"0:8", "1:7", "8:0"}
    cold = by_label["0:8"].config
    assert [s.kind for s in cold.stages] == ["rl"] and cold.stages[0].init == "previous"  # RL from the backbone
    assert (cold.stages[0].epochs, cold.stages[0].max_steps) == (8, None)
    split = by_label["1:7"].config
    assert [s.epochs for s in split.stages] == [1, 7] and by_label["1:7"].budget_amounts == {"sft": 1, "rl": 7}
    assert [s.kind for s in by_label["8:0"].config.stages] == ["sft"]


def test_example_and_flop_budgets_resolve_to_steps():
    cells = expand(study_from_dict(study(blocks={"b": {"budget": {
        "unit": "examples", "total": 400, "stages": ["sft", "rl"], "shares": [[1, 1]]}}})))
    assert [s.max_steps for s in cells[0].config.stages] == [25, 50]  # 200 / batch 8, 200 / 4 prompts
    flops = {"unit": "flops", "total": 6e12, "stages": ["sft", "rl"], "shares": [[1, 0]], "params": 1e6,
             "tokens_per_example": {"sft": 100, "rl": 100}}
    cells = expand(study_from_dict(study(blocks={"b": {"budget": flops}})))
    assert cells[0].config.stages[0].max_steps == 6e12 / (6 * 1e6 * 100 * 8)
    del flops["tokens_per_example"]
    with pytest.raises(ConfigError, match="tokens_per_example.sft"):
        expand(study_from_dict(study(blocks={"b": {"budget": flops}})))


def test_budget_conflicts_with_a_length_axis_and_tiny_shares_are_errors():
    budget = {"unit": "steps", "total": 10, "stages": ["sft", "rl"], "shares": [[1, 99]]}
    with pytest.raises(ConfigError, match="less than one step"):
        expand(study_from_dict(study(blocks={"b": {"budget": budget}})))
    budget["shares"] = [[1, 1]]
    with pytest.raises(ConfigError, match="axis stages.sft.max_steps sets a length the budget divides"):
        expand(study_from_dict(study(blocks={"b": {"budget": budget, "grid": {"stages.sft.max_steps": [5]}}})))


def test_base_from_a_file_and_the_resolved_study_has_a_stable_digest(tmp_path):
    import yaml

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    from_file = study_from_dict({"name": "s", "base": "base.yaml"}, tmp_path)
    inline = study_from_dict(study())
    assert from_file.digest() == inline.digest()
    again = study_from_dict(from_file.resolved())
    assert again.digest() == from_file.digest()
    with pytest.raises(ConfigError, match="run config not found"):
        study_from_dict({"name": "s", "base": "missing.yaml"}, tmp_path)
