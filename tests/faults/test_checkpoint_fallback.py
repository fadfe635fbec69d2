"""A damaged newest checkpoint is reported and the one before it is used; the run still ends as an
uninterrupted one does."""

from __future__ import annotations

import pytest

from biopost.config import validate_config
from biopost.pipeline import run
from biopost.runlog import read_metrics
from biopost.stages.context import StageContext

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


STAGES = {
    "sft": {"kind": "sft", "max_steps": 6, "eval_every_steps": 6, "save_every_steps": 2, "batch_size": 8,
            "lr": 1e-2, "eval_at_start": False},
    "rl": {"kind": "rl", "init": "base", "max_steps": 6, "eval_every_steps": 6, "save_every_steps": 2,
           "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 8, "lr": 1e-2, "mu": 2,
           "eval_at_start": False},
}


def weights(run_dir, name):
    from safetensors.torch import load_file

    return load_file(next((run_dir / "stages" / name / "final").glob("*.safetensors")))


@pytest.mark.parametrize("kind", ["sft", "rl"])
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(kind, fast_config, tmp_path, monkeypatch, capsys):
    raw = fast_config()
    raw["stages"] = [STAGES[kind]]
    raw["eval"]["splits"] = ["val"]
    config = validate_config(raw)
    name = f"0-{kind}"
    whole = run(config, tmp_path / "whole")

    original = StageContext.evaluate_and_save

    def interrupted(self, policy, step, epoch, **kwargs):  # the step-6 evaluation never happens
        raise Interrupt

    monkeypatch.setattr(StageContext, "evaluate_and_save", interrupted)
    with pytest.raises(Interrupt):
        run(config, tmp_path / "cut")
    monkeypatch.setattr(StageContext, "evaluate_and_save", original)
    stage_dir = tmp_path / "cut" / "stages" / name
    if kind == "sft":  # the Trainer keeps its two newest checkpoints, 2 and 4
        newest, previous = stage_dir / "trainer" / "checkpoint-4", stage_dir / "trainer" / "checkpoint-2"
        file = newest / "adapter_model.safetensors"
    else:  # RL keeps its save point before the newest
        newest, previous = stage_dir / "resume", stage_dir / "resume.prev"
        file = newest / "policy" / "adapter_model.safetensors"
    assert previous.is_dir()
    file.write_bytes(file.read_bytes()[:-100])
    capsys.readouterr()
    run(config, tmp_path / "cut")
    out = capsys.readouterr()
    assert f"{newest}: {file.relative_to(newest)} is truncated" in out.err
    if kind == "rl":
        assert "resuming at step 2" in out.out
    a, b = weights(whole, name), weights(tmp_path / "cut", name)
    assert all(a[k].equal(b[k]) for k in a)
    rows = lambda d: sorted((r["step"], r["split"], r["metric"], r["value"]) for r in read_metrics(d) if r["split"] != "train")  # noqa: E731
    assert rows(tmp_path / "cut") == rows(whole)


def test_a_damaged_checkpoint_of_a_finished_stage_is_refused_in_one_line(sft_run, tmp_path, capsys):
    """A finished stage's checkpoint is never silently replaced: the rerun names the file and the remedy."""
    import shutil

    from biopost.cli import main
    from biopost.config import dump_config

    run_dir = tmp_path / "run"
    shutil.copytree(sft_run.dir, run_dir)
    (run_dir / "DONE").unlink()  # as if a later stage were still to run
    weights = next((run_dir / "stages" / "0-sft" / "final").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one bit pattern changed, same size
    dump_config(sft_run.config, tmp_path / "config.yaml")
    assert main(["train", str(tmp_path / "config.yaml"), "--output-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights.name} does not match its checksum" in err and "delete " in err
