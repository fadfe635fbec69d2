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
from biopost.stages.context import StageContext

PBMC = "cell_type/pbmc68k"
pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


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
    original = StageContext.evaluate_and_save

    def crash_in_rl(self, policy, step, epoch):
        if self.name == "rl" and step == 4:
            raise Interrupt
        return original(self, policy, step, epoch)

    monkeypatch.setattr(StageContext, "evaluate_and_save", crash_in_rl)
    with pytest.raises(Interrupt):
        run(config, tmp_path / "a")
    monkeypatch.setattr(StageContext, "evaluate_and_save", original)
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
