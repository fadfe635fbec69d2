"""Rule 10: a run directory is portable. After `mv`, every checkpoint evaluates and predicts, and an
interrupted pipeline resumes (RL from `sft:best` with a new adapter on the merged SFT model)."""

from __future__ import annotations

import json
import shutil

import pytest

from biopost.cli import main
from biopost.config import validate_config
from biopost.models.policy import CHECKPOINT_FILE
from biopost.pipeline import run
from conftest import Interrupt, interrupt_at

PBMC = "cell_type/pbmc68k"
pytestmark = pytest.mark.usefixtures("one_thread")


def moved_run_config(fast_config):
    raw = fast_config()
    raw["model"]["backbone"] = "tiny-s"  # a built-in backbone: it lives inside the run directory
    raw["eval"].update(splits=["val"], max_examples=4)
    raw["stages"] = [
        {"kind": "sft", "max_steps": 2, "eval_every_steps": 2, "eval_at_start": False, "batch_size": 8, "lr": 1e-2},
        {"kind": "rl", "init": "sft:best", "adapter": "new", "lora": {"rank": 2, "alpha": 4.0, "dropout": 0.0},
         "max_steps": 4, "eval_every_steps": 2, "eval_at_start": False, "prompts_per_step": 2, "num_generations": 2,
         "max_completion_length": 8},
    ]
    return validate_config(raw)


def test_moved_run_resumes_evaluates_and_predicts_from_every_checkpoint(fast_config, tmp_path, monkeypatch, capsys,
                                                                       pbmc_splits):
    config = moved_run_config(fast_config)
    resume = interrupt_at(monkeypatch, 4, "rl")
    with pytest.raises(Interrupt):
        run(config, tmp_path / "a")
    resume()
    shutil.move(tmp_path / "a", tmp_path / "b")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # nothing may depend on the working directory either
    run(config, tmp_path / "b")  # resumes RL at step 2, from sft:best, after the move
    shutil.move(tmp_path / "b", tmp_path / "c")
    run_dir = tmp_path / "c"

    recorded = [p for p in run_dir.rglob("*.json") if p.name in (CHECKPOINT_FILE, "selection.json")]
    assert recorded and not any(str(tmp_path) in p.read_text() for p in recorded)  # no absolute path inside
    checkpoints = sorted(run_dir.glob("stages/*/final")) + sorted(run_dir.glob("stages/*/checkpoints/step-*"))
    assert len(checkpoints) == 5  # sft: step 2, final; rl: steps 2 and 4, final
    cells = elsewhere / "cells.jsonl"
    cells.write_text("\n".join(json.dumps({"id": e.id, "genes": e.fields["genes"]}) for e in pbmc_splits.id_test[:2]))
    for checkpoint in checkpoints:
        assert main(["eval", str(checkpoint), "--task", PBMC, "--splits", "val", "--max-examples", "2"]) == 0, checkpoint
        assert main(["predict", str(checkpoint), "--task", PBMC, "--input", str(cells), "--max-new-tokens", "4"]) == 0
        out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert {r["split"] for r in out if "split" in r} == {"val"}
        assert [r["id"] for r in out if "completion" in r] == [e.id for e in pbmc_splits.id_test[:2]]


def test_missing_base_names_the_recorded_path_and_the_option(sft_run, tmp_path, capsys):
    lonely = tmp_path / "lonely"
    shutil.copytree(sft_run.final, lonely)
    info = json.loads((lonely / CHECKPOINT_FILE).read_text())
    info["base"] = str(tmp_path / "moved-away")
    (lonely / CHECKPOINT_FILE).write_text(json.dumps(info))
    assert main(["eval", str(lonely), "--task", PBMC, "--splits", "val", "--max-examples", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "moved-away") in err and "--base" in err
    assert main(["eval", str(lonely), "--task", PBMC, "--splits", "val", "--max-examples", "2",
                 "--base", str(sft_run.backbone)]) == 0


def test_a_copied_checkpoint_names_the_same_base_from_its_new_depth(tmp_path):
    """Interpolation's final/ is a copy of a checkpoint one level deeper: its relative paths are re-recorded."""
    from biopost.models.policy import copy_checkpoint, resolved_path

    run_dir = tmp_path / "run"
    source = run_dir / "stages" / "1-x" / "checkpoints" / "step-000001"
    source.mkdir(parents=True)
    (run_dir / "merged" / "m").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: x\n")
    (source / CHECKPOINT_FILE).write_text(json.dumps({"kind": "adapter", "base": "../../../../merged/m"}))
    final = copy_checkpoint(source, run_dir / "stages" / "1-x" / "final")
    base = json.loads((final / CHECKPOINT_FILE).read_text())["base"]
    assert base == "../../../merged/m" and resolved_path(base, final) == str((run_dir / "merged" / "m").resolve())


def moved_study(fast_config) -> dict:
    """Two runs: LoRA SFT, then RL with a new adapter on the merged SFT model for 2 or 4 steps (constant
    schedule, so the 2-step run branches off the 4-step one at RL step 2 and shares its merged base)."""
    base = moved_run_config(fast_config).model_dump(mode="json")
    base["stages"][1].update(max_steps=4, schedule={"name": "constant", "warmup_steps": 0})
    return {"name": "moved", "base": base, "pipelines": {"sft-rl": ["sft", "rl"]},
            "blocks": {"rl": {"pipeline": ["sft-rl"], "grid": {"stages.rl.max_steps": [2, 4]}}}}


def test_moved_study_resumes_shares_merged_bases_and_every_checkpoint_loads(fast_config, tmp_path, monkeypatch):
    from biopost.models.policy import load_policy
    from biopost.study.config import study_from_dict
    from biopost.study.execute import execute
    from biopost.study.plan import prepare

    study = study_from_dict(moved_study(fast_config))
    resume = interrupt_at(monkeypatch, 4, "rl")
    plan = prepare(study, tmp_path / "a")
    assert len(execute(plan, tmp_path / "a")) == 2  # the trunk died in RL; its branch waited
    resume()
    shutil.move(tmp_path / "a", tmp_path / "b")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["study", "run", str(tmp_path / "b")]) == 0  # the trunk resumes, then its branch is copied
    shutil.move(tmp_path / "b", tmp_path / "c")

    trunk = next(r for r in plan.runs if r.snapshots)
    branch = next(r for r in plan.runs if r.donor == trunk.id)
    runs = {r.id: tmp_path / "c" / "runs" / r.id for r in plan.runs}
    recorded = [p for p in (tmp_path / "c").rglob("*.json") if p.name in (CHECKPOINT_FILE, "selection.json")]
    assert recorded and not any(str(tmp_path) in p.read_text() for p in recorded)
    merged = {rid: sorted(p for p in (d / "merged").rglob("*") if p.is_file()) for rid, d in runs.items()}
    assert merged[trunk.id] and [p.relative_to(runs[trunk.id]) for p in merged[trunk.id]] == [
        p.relative_to(runs[branch.id]) for p in merged[branch.id]]
    for mine, donors in zip(merged[branch.id], merged[trunk.id]):  # one copy on disk: hard links
        assert mine.stat().st_ino == donors.stat().st_ino and mine.stat().st_nlink >= 2
    assert not list((tmp_path / "c").rglob("stages/*/base")) and not list((tmp_path / "c").rglob("stages/*/resume"))
    checkpoints = [p for d in runs.values() for p in [*d.glob("stages/*/final"), *d.glob("stages/*/checkpoints/*")]]
    assert len(checkpoints) == 2 * 2 + 3 + 2  # sft: step 2, final in each run; rl: 2, 4, final and 2, final
    for checkpoint in checkpoints:
        assert load_policy(checkpoint).is_adapter, checkpoint
    final = runs[branch.id] / "stages" / "1-rl" / "final"
    assert main(["eval", str(final), "--task", PBMC, "--splits", "val", "--max-examples", "2"]) == 0
