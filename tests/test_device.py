"""Rule 11: one device, chosen once (``model.device``, ``--device``), for every stage, the evaluator and predict."""

from __future__ import annotations

import json

import pytest
import torch

import biopost.inference
import biopost.stages.context
import biopost.stages.rl
from biopost.cli import main
from biopost.config import validate_config
from biopost.inference import evaluate_checkpoint, predict_file
from biopost.models.device import resolve_device
from biopost.pipeline import run

pytestmark = pytest.mark.usefixtures("one_thread")
PBMC = "cell_type/pbmc68k"
NO_CUDA = not torch.cuda.is_available()
RL_STEP = {"kind": "rl", "max_steps": 1, "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 8,
           "eval_at_start": False, "eval_every_steps": 1}


@pytest.fixture
def placements(monkeypatch):
    """Record the device every load asks for and the device each loaded model ends up on."""
    seen = []
    for module in (biopost.stages.context, biopost.inference):  # every stage loads through its context
        real = module.load_policy

        def recording(*args, _real=real, _where=module.__name__.rsplit(".", 1)[1], **kwargs):
            policy = _real(*args, **kwargs)
            seen.append((_where, kwargs.get("device"), policy.device.type))
            return policy

        monkeypatch.setattr(module, "load_policy", recording)
    return seen


def sft_then_rl(fast_config, device: str):
    raw = fast_config()
    raw["model"]["device"] = device
    raw["eval"].update(splits=["val"], max_examples=2, max_new_tokens=4)
    raw["stages"] = [{**raw["stages"][0], "max_steps": 1, "eval_every_steps": 1, "eval_at_start": False}, RL_STEP]
    return validate_config(raw)


def cells_file(tmp_path, splits):
    path = tmp_path / "cells.jsonl"
    path.write_text("\n".join(json.dumps({"id": e.id, "genes": e.fields["genes"]}) for e in splits.val[:2]) + "\n")
    return path


def test_every_stage_eval_and_predict_load_on_the_resolved_device(fast_config, pbmc_splits, tmp_path, placements):
    expected = resolve_device("auto")  # the default model.device: here the CPU, on a GPU machine CUDA
    run_dir = run(sft_then_rl(fast_config, "auto"), tmp_path / "run")
    final = run_dir / "stages" / "1-rl" / "final"
    evaluate_checkpoint(final, PBMC, ["val"], 2, device="auto")
    predict_file(final, PBMC, cells_file(tmp_path, pbmc_splits), 4, device="auto")
    assert [where for where, _, _ in placements] == ["context", "context", "inference", "inference"]
    assert all(asked == expected and placed == expected for _, asked, placed in placements), placements


@pytest.mark.skipif(not NO_CUDA, reason="checks the error raised without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error_before_anything_runs(fast_config, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(fast_config()))
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run"), "model.device=cuda"]) == 2
    assert main(["eval", str(tmp_path), "--task", PBMC, "--device", "cuda"]) == 2
    assert main(["predict", str(tmp_path), "--task", PBMC, "--input", "cells.jsonl", "--device", "cuda"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all("sees no CUDA device; use auto or cpu" in line for line in errors)
    assert not (tmp_path / "run" / "stages").exists()


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_on_a_gpu_training_rl_eval_and_predict_run_on_cuda(fast_config, pbmc_splits, tmp_path, placements, monkeypatch):
    on_device = []
    real_optimise = biopost.stages.rl.optimise
    monkeypatch.setattr(biopost.stages.rl, "optimise",
                        lambda policy, *a, **k: on_device.append(policy.device.type) or real_optimise(policy, *a, **k))
    run_dir = run(sft_then_rl(fast_config, "auto"), tmp_path / "run")
    final = run_dir / "stages" / "1-rl" / "final"
    rows = evaluate_checkpoint(final, PBMC, ["val"], 2)
    records = predict_file(final, PBMC, cells_file(tmp_path, pbmc_splits), 4)
    assert on_device == ["cuda"]
    assert [placed for _, _, placed in placements] == ["cuda"] * 4
    assert rows and len(records) == 2
    evaluate_checkpoint(final, PBMC, ["val"], 2, device="cpu")  # an explicit choice wins over auto
    assert placements[-1][1:] == ("cpu", "cpu")
