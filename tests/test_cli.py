"""`biopost tasks | eval | predict` on the shared short SFT run."""

from __future__ import annotations

import json

import pytest

from biopost.cli import main

PBMC = "cell_type/pbmc68k"


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_tasks_lists_pbmc_with_split_sizes(capsys, pbmc_splits):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith(PBMC))
    for split, size in pbmc_splits.sizes().items():
        assert f"{split}={size}" in line
    assert "cell_type/h5ad" in out and "path" in out  # listed with the options it needs
    assert "go/cafa" in out and "fasta, annotations" in out and "go/hf" in out
    assert next(line for line in out.splitlines() if line.startswith("amp/modlamp ")).count("ood_test=412")


def test_eval_prints_summary_rows(sft_run, capsys):
    assert main(["eval", str(sft_run.final), "--task", PBMC, "--max-examples", "4"]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert rows and all({"split", "metric", "value", "n"} <= row.keys() for row in rows)
    accuracy = {r["split"]: r for r in rows if r["metric"] == "accuracy"}
    assert set(accuracy) == {"val", "id_test", "ood_test"}
    assert all(r["n"] == 4 and 0.0 <= r["value"] <= 1.0 for r in accuracy.values())


def test_predict_writes_one_line_per_cell(sft_run, pbmc_splits, tmp_path, capsys):
    cells = [{"id": e.id, "genes": e.fields["genes"]} for e in pbmc_splits.id_test[:2]]
    cells.append({"id": "by-expression", "expression": {"MS4A1": 5.0, "CD79A": 3.0, "ACTB": 0.0}})
    source = tmp_path / "cells.jsonl"
    source.write_text("\n".join(json.dumps(c) for c in cells) + "\n")
    assert main(["predict", str(sft_run.final), "--task", PBMC, "--input", str(source), "--max-new-tokens", "8"]) == 0
    records = json_lines(capsys.readouterr().out)
    assert [r["id"] for r in records] == [c["id"] for c in cells]
    labels = json.loads((sft_run.final / "biopost_checkpoint.json").read_text())["task"]["labels"]
    for record in records:
        assert {"id", "answer", "reasoning", "completion"} <= record.keys()
        assert isinstance(record["completion"], str)
        assert record["answer"] is None or record["answer"] in labels


@pytest.mark.parametrize("command", [
    ["eval", "{ckpt}", "--task", "cell_type/h5ad"],
    ["predict", "{ckpt}", "--task", "no/such-task", "--input", "cells.jsonl"],
])
def test_wrong_task_name_exits_2_with_a_clear_message(sft_run, capsys, command):
    argv = [part.format(ckpt=sft_run.final) for part in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert PBMC in err and argv[3] in err


def test_eval_of_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--task", PBMC]) == 2
    assert "not a biopost checkpoint" in capsys.readouterr().err


def test_summary_prints_id_and_ood_and_writes_a_plot(sft_run, capsys):
    from biopost.cli import main

    assert main(["summary", str(sft_run.dir)]) == 0
    out = capsys.readouterr().out
    assert "id_test" in out and "ood_test" in out
    assert (sft_run.dir / "curves-accuracy.png").stat().st_size > 1000
    assert main(["summary", str(sft_run.dir), "--metric", "no_such_metric"]) == 2


@pytest.mark.parametrize("argv, fragment", [
    (["eval", "{ckpt}", "--task", PBMC, "--splits", "val", "test"], "invalid choice: 'test'"),
    (["eval", "{ckpt}", "--task", PBMC, "--device", "tpu"], "invalid choice: 'tpu'"),
    (["eval", "{ckpt}", "--task", PBMC, "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_exit_2_in_one_line_before_anything_loads(tmp_path, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        main([part.format(ckpt=tmp_path) for part in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("biopost") and fragment in err
    if "test" in fragment:
        assert all(f"'{split}'" in err for split in ("val", "id_test", "ood_val", "ood_test"))
