"""`biopost demo`: the preset plans every comparison the demo promises with shared prefixes, and a shrunken
demo runs end to end (plan, runs, results, terminal table), deterministically, and resumes as a no-op."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import biopost.pipeline
from biopost.cli import main
from biopost.config import ConfigError, read_yaml, write_yaml
from biopost.demo import PRESET, demo_study, format_summary, run_demo
from biopost.study.plan import make_plan

TASKS = {"cell_type/pbmc68k", "tf_class/jaspar", "amp/modlamp"}


def arms_by_task(plan) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for run in plan.runs:
        out.setdefault(run.config.task.name, set()).add(run.pipeline)
    return out


def test_the_preset_plans_every_comparison_on_three_modalities_sharing_prefixes():
    plan = make_plan(demo_study(), load_data=False)
    arms = arms_by_task(plan)
    assert set(arms) == TASKS
    for task in TASKS:
        assert {"base-model", "baseline", "sft", "sft-rl"} <= arms[task]
    assert {t for t, a in arms.items() if "cpt-sft-rl" in a} == {"cell_type/pbmc68k"}
    assert {t for t, a in arms.items() if "fused-sft-rl" in a} == {"tf_class/jaspar"}
    for task in TASKS:  # several SFT lengths, and RL from a shorter one and the longest
        runs = [r for r in plan.runs if r.config.task.name == task]
        sft = sorted({r.axes["stages.sft.epochs"] for r in runs if r.pipeline == "sft"})
        rl_from = sorted({r.axes["stages.sft.epochs"] for r in runs if r.pipeline == "sft-rl"})
        assert len(sft) >= 3 and len(rl_from) == 2 and rl_from[0] < rl_from[1] == sft[-1]
        shorter = [r for r in runs if r.pipeline == "sft" and r.axes["stages.sft.epochs"] < sft[-1]]
        assert all(r.donor is not None for r in shorter)  # branched off the longest SFT, not trained again
    fused = [r for r in plan.runs if r.pipeline == "fused-sft-rl"]
    assert fused and all(r.config.model.encoders["dna"].name == "tiny-dna" for r in fused)
    assert plan.steps_executed < 0.7 * plan.steps_naive


def test_seeds_repeat_every_run_with_run_and_stage_seeds():
    one, two = make_plan(demo_study(1), load_data=False), make_plan(demo_study(2), load_data=False)
    assert len(two.runs) == 2 * len(one.runs)
    seeds = {(r.config.seed, tuple(s.seed for s in r.config.stages)) for r in two.runs if r.pipeline == "sft-rl"}
    assert seeds == {(0, (0, 0)), (1, (1, 1))}
    with pytest.raises(ConfigError, match="at least 1"):
        demo_study(0)
    for override in ("base.seed=7", "zip.1.seed=[7]", "base.stages.1.seed=7", "zip.1.stages.*.seed=[7]"):
        with pytest.raises(ConfigError, match="--seeds"):  # would be replaced by --seeds without a word
            demo_study(2, [override])
    split_seed = make_plan(demo_study(1, ["base.task.split.seed=3"]), load_data=False)
    assert {r.config.task.split.seed for r in split_seed.runs} == {3}  # other seeds are the user's to set


def shrunken_preset(tmp_path: Path, blocks: list[str], name: str = "demo.yaml", lengths=(0.1, 0.2)) -> Path:
    """The preset on the PBMC task only, with a few steps and 8 examples per split, keeping ``blocks``
    (SFT lengths in epochs: ``lengths``, the CPT arm's the first)."""
    raw = read_yaml(PRESET)
    base = raw["base"]
    base["eval"].update(max_examples=8, max_new_tokens=8, bootstrap=20)
    cpt, sft, rl = base["stages"]
    cpt.update(corpus={"source": "go", "take": 60, "heldout": 10, "seed": 0}, seq_length=32, eval_every_steps=2)
    sft.update(eval_every_epochs=None, eval_every_steps=2,
               schedule={"name": "warmup_stable_decay", "warmup_steps": 1, "decay_ratio": 0.2})
    rl.update(max_steps=2, prompts_per_step=2, num_generations=2, max_completion_length=8, eval_every_steps=2)
    pbmc = {"task.name": ["cell_type/pbmc68k"], "task.options": [{"top_k_genes": 16}]}
    raw["zip"][0] = pbmc
    raw["blocks"] = {k: v for k, v in raw["blocks"].items() if k in blocks}
    for block in raw["blocks"].values():
        if "grid" in block:
            block["grid"] = {"stages.sft.epochs": list(lengths[: len(block["grid"]["stages.sft.epochs"])])}
        if "zip" in block:
            block["zip"] = [pbmc]
    path = tmp_path / "configs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_yaml(raw, path)
    return path


def test_a_shrunken_demo_runs_end_to_end_deterministically_and_resumes(tmp_path, monkeypatch, one_thread):
    preset = shrunken_preset(tmp_path, ["reference", "sft-length", "rl-after-sft", "cpt"])
    first = run_demo(tmp_path / "a", preset=preset, executor="local")
    assert first["failed"] == [] and first["unfinished"] == []
    pbmc = first["summary"].set_index("arm")
    assert set(first["summary"]["task"]) == {"cell_type/pbmc68k"}
    assert {"base model", "baseline", "SFT 0.1 ep", "SFT 0.2 ep", "SFT 0.1 ep -> RL", "SFT 0.2 ep -> RL",
            "CPT -> SFT 0.1 ep", "CPT -> SFT 0.1 ep -> RL"} <= set(pbmc.index)
    assert pbmc[["ID mean", "OOD mean"]].notna().all().all()
    text = format_summary(first["summary"])
    assert "SFT 0.2 ep -> RL" in text and "CI half-width" in text
    assert (tmp_path / "a" / "summary.txt").read_text().strip() == text
    results = pd.read_parquet(tmp_path / "a" / "results.parquet")
    baseline = results[results["stage_kind"] == "baseline"]
    assert set(baseline["split"]) == {"val", "id_test", "ood_test"} and baseline["value"].between(0, 1).all()
    assert all((tmp_path / "a" / "logs" / f"{r}.cost.json").is_file() for r in results["run_id"].unique())
    assert first["runs_cpu_s"] > 0

    # the same run trained alone elsewhere (not branched off a longer SFT) gives the same numbers
    alone = run_demo(tmp_path / "b", preset=shrunken_preset(tmp_path, ["rl-after-sft"], "alone.yaml", (0.1,)), executor="local")
    rows = pd.read_parquet(tmp_path / "b" / "results.parquet")
    values = ["run_id", "stage", "step", "split", "metric", "value"]
    evals = lambda frame: frame[frame["split"] != "train"][values].sort_values(values[:5]).reset_index(drop=True)  # noqa: E731
    assert alone["failed"] == [] and rows["run_id"].nunique() == 1
    pd.testing.assert_frame_equal(evals(rows), evals(results[results["run_id"] == rows["run_id"].iloc[0]]))

    def no_run(*args, **kwargs):
        raise AssertionError("a finished demo must not train again")

    monkeypatch.setattr(biopost.pipeline, "run", no_run)
    assert run_demo(tmp_path / "a", preset=preset, executor="local")["failed"] == []


def test_demo_cli_refuses_bad_seeds_in_one_line(capsys):
    assert main(["demo", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("biopost demo: ") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_full_demo(tmp_path):
    """The README's first command: every arm of the preset on three tasks (about 10 minutes on 2 cores)."""
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0
    summary = (tmp_path / "demo" / "summary.txt").read_text()
    assert all(task in summary for task in TASKS) and "fused: SFT" in summary and "CPT -> SFT" in summary


def test_closing_line_says_what_the_cpu_time_covers(monkeypatch, capsys, tmp_path):
    import biopost.demo

    summary = pd.DataFrame({"task": ["t"], "arm": ["base model"], "ID mean": [0.5], "ID spread": [0.1],
                            "ID seeds": [1.0], "OOD mean": [0.4], "OOD spread": [0.1], "OOD seeds": [1.0]})
    monkeypatch.setattr(biopost.demo, "run_demo", lambda *a, **k: {
        "summary": summary, "report": None, "failed": [], "wall_s": 60.0, "runs_cpu_s": 600.0})
    assert main(["demo", "--output-dir", str(tmp_path), "--executor", "local"]) == 0
    out = capsys.readouterr().out
    # a resumed demo's runs include ones an earlier invocation ran: the two numbers are labelled apart
    assert "this invocation took 1.0 min" in out and "earlier invocations): 10.0 CPU-min" in out


def test_the_summary_says_n_a_where_an_arm_has_no_spread():
    """One seed scored on one example has no interval: ``± n/a``, never ``±nan``."""
    summary = pd.DataFrame({"task": ["t", "t"], "arm": ["base model", "SFT 1 ep"], "ID mean": [0.5, 1.0],
                            "ID spread": [0.125, float("nan")], "ID seeds": [1, 1], "OOD mean": [0.25, 0.0],
                            "OOD seeds": [1, 1]})  # no OOD spread at all: pivot_table drops an all-NaN column
    lines = format_summary(summary).splitlines()
    assert "nan" not in "\n".join(lines)
    assert lines[-2].endswith("0.50 ±0.12   0.25 ± n/a") and lines[-1].endswith("1.00 ± n/a   0.00 ± n/a")
