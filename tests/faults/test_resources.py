"""Out of GPU memory and out of disk: one line saying what to change (exceptions injected where they arise)."""

from __future__ import annotations

import errno

import pytest
import torch
from faultkit import write_yaml

from biopost.cli import main


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB")


@pytest.mark.parametrize("kind, advice", [
    ("sft", ["stages.0.batch_size below 8 with stages.0.grad_accum raised to keep 8 examples per step",
             "stages.0.max_length below 512", "model.gradient_checkpointing=true", "eval.batch_size below 8"]),
    ("rl", ["stages.0.micro_batch_size below 8", "stages.0.max_completion_length below 8",
            "model.gradient_checkpointing=true"]),
])
def test_out_of_gpu_memory_in_a_stage_names_the_settings_to_lower(kind, advice, fast_config, tmp_path, capsys, monkeypatch):
    from biopost import pipeline

    raw = fast_config()
    raw["stages"] = [{"kind": kind, "max_steps": 2, **({"init": "base", "prompts_per_step": 4, "num_generations": 2,
                                                        "max_completion_length": 8} if kind == "rl" else {})}]
    monkeypatch.setattr(pipeline, "stage_runners", lambda: {kind: oom})
    assert main(["train", str(write_yaml(raw, tmp_path / "c.yaml")), "--output-dir", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert f"out of GPU memory in stage {kind} ({kind}) (CUDA out of memory" in err
    for hint in advice:
        assert hint in err


@pytest.mark.parametrize("command, advice", [
    ("eval", ["--batch-size below 8", "--dtype bfloat16"]),
    ("predict", ["--batch-size below 3", "--max-new-tokens below 16", "--dtype bfloat16"]),
], ids=["eval", "predict"])
def test_out_of_gpu_memory_in_eval_and_predict_names_the_options_to_lower(command, advice, sft_run, tmp_path, capsys,
                                                                         monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.GenerationMixin, "generate", oom)  # every batch runs out, as on a too-large one
    source = tmp_path / "cells.jsonl"
    source.write_text('{"genes": ["CD3E", "CD3D", "IL7R"]}\n')
    argv = {"eval": ["eval", str(sft_run.final), "--task", "cell_type/pbmc68k", "--splits", "val", "--max-examples", "2"],
            "predict": ["predict", str(sft_run.final), "--task", "cell_type/pbmc68k", "--input", str(source),
                        "--batch-size", "3", "--max-new-tokens", "16", "--output", str(tmp_path / "out.jsonl")]}
    assert main(argv[command]) == 2
    err = one_line_error(capsys)
    assert f"biopost {command}: out of GPU memory in biopost {command} (CUDA out of memory" in err
    for hint in advice:
        assert hint in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_full_disk_says_where_the_space_went(fast_config, tmp_path, capsys, monkeypatch):
    from biopost import pipeline

    def fill_then_fail(ctx):
        checkpoints = ctx.stage_dir / "checkpoints" / "step-000001"
        checkpoints.mkdir(parents=True)
        (checkpoints / "model.safetensors").write_bytes(b"\0" * 3 * 1024 * 1024)
        raise OSError(errno.ENOSPC, "No space left on device", str(checkpoints / "optimizer.pt"))

    monkeypatch.setattr(pipeline, "stage_runners", lambda: {"sft": fill_then_fail})
    config = write_yaml(fast_config(), tmp_path / "c.yaml")
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert "disk full writing " in err and "optimizer.pt" in err and " free)" in err
    assert "run holds stages/*/checkpoints 3.0 MiB, " in err and "--output-dir" in err, err


def test_other_os_errors_are_not_disguised(fast_config, tmp_path, monkeypatch):
    from biopost import pipeline

    def denied(ctx):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(pipeline, "stage_runners", lambda: {"sft": denied})
    with pytest.raises(PermissionError):
        main(["train", str(write_yaml(fast_config(), tmp_path / "c.yaml")), "--output-dir", str(tmp_path / "run")])


def test_an_os_error_on_a_named_file_is_one_line_naming_it(fast_config, tmp_path, capsys, monkeypatch):
    from biopost import pipeline

    def unreadable(ctx):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "cells.h5ad"))

    monkeypatch.setattr(pipeline, "stage_runners", lambda: {"sft": unreadable})
    assert main(["train", str(write_yaml(fast_config(), tmp_path / "c.yaml")), "--output-dir", str(tmp_path / "run")]) == 2
    assert one_line_error(capsys) == f"biopost train: {tmp_path / 'cells.h5ad'}: Permission denied\n"
