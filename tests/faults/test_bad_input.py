"""Bad input, case by case, through the CLI: each exits 2 with exactly one line on stderr that names the file
(or config key), the record and the fix, prints no traceback, and leaves no output that looks complete.

Each case writes its inputs into ``tmp_path`` and returns the command line, the fragments the error line must
contain, and the paths that must not exist afterwards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from biopost.cli import main
from biopost.models.tiny import build_tiny_backbone

PBMC = "cell_type/pbmc68k"
PROTEINS = {"P1": "MKVLAAGIVLLLA", "P2": "MSTNPKPQRKTKR", "P3": "MAHHHHHHVGTGS"}


# ---------------------------------------------------------------- inputs
def write_config(tmp_path: Path, task: dict, stages: list | None = None, **extra) -> Path:
    config = {"name": "bad", "task": task, "model": {"backbone": "tiny-s"},
              "stages": stages or [{"kind": "sft", "max_steps": 1}], **extra}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def train(tmp_path: Path, task: dict, stages: list | None = None, **extra):
    """``biopost train`` argv; the run directory must hold no stage output afterwards."""
    out = tmp_path / "run"
    return ["train", str(write_config(tmp_path, task, stages, **extra)), "--output-dir", str(out)], [out / "stages", out / "DONE"]


def table_task(tmp_path: Path, rows: list[dict], name: str = "rows.csv", **options) -> dict:
    path = tmp_path / name
    columns = list(rows[0])
    path.write_text(",".join(columns) + "\n" + "".join(",".join(str(r.get(c, "")) for c in columns) + "\n" for r in rows))
    columns_map = {"id": "id", "answer": "label", "group": "group", **options.pop("columns", {})}
    split = options.pop("split", {"ood_test_groups": ["C"]})
    return {"name": "table", "options": {"source": str(path), "columns": columns_map,
                                         "prompt": "Which label fits {{ text }}?", **options}, "split": split}


def rows(n: int = 30, **override) -> list[dict]:
    bases = lambda i: "".join("ACGT"[(i >> (2 * k)) & 3] for k in range(4))  # noqa: E731 (unique, valid DNA)
    out = [{"id": f"r{i}", "text": bases(i), "label": "ab"[i % 2], "group": "ABC"[i % 3]} for i in range(n)]
    for index, fields in override.items():
        out[int(index.removeprefix("r"))].update(fields)
    return out


def cafa_task(tmp_path: Path, fasta: str, **options) -> dict:
    (tmp_path / "proteins.fasta").write_text(fasta)
    (tmp_path / "terms.tsv").write_text("protein\tterm\tevidence\n" + "".join(
        f"{p}\tGO:0005739\tIDA\n" for p in PROTEINS))
    return {"name": "go/cafa", "options": {"fasta": str(tmp_path / "proteins.fasta"),
                                           "annotations": str(tmp_path / "terms.tsv"), **options}}


def fasta(records: dict[str, str]) -> str:
    return "".join(f">{p} 9606\n{s}\n" for p, s in records.items())


def h5ad_task(tmp_path: Path, labels: list, label_key: str = "cell_type") -> dict:
    import anndata
    import pandas as pd

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"cell_type": labels, "tissue": ["lung", "gut", "skin"] * (len(labels) // 3)},
                       index=[f"cell{i}" for i in range(len(labels))])
    adata = anndata.AnnData(rng.poisson(2.0, (len(labels), 12)).astype(np.float32), obs=obs)
    adata.var_names = [f"G{j}" for j in range(12)]
    adata.write_h5ad(tmp_path / "cells.h5ad")
    return {"name": "cell_type/h5ad", "options": {"path": str(tmp_path / "cells.h5ad"), "label_key": label_key,
                                                  "group_key": "tissue"}}


def damaged_h5ad_task(tmp_path: Path, damage: str) -> dict:
    """A valid h5ad cut to half its size (a copy that stopped early), or a text file given the name."""
    task = h5ad_task(tmp_path, ["B", "T", "NK"] * 10)
    path = Path(task["options"]["path"])
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("cell,cell_type\ncell0,B\n")
    return task


def file_as_output_dir(tmp_path: Path, command: str):
    """``train`` / ``baseline`` with ``--output-dir`` naming an existing file."""
    out = tmp_path / "run"
    out.write_text("notes\n")
    config = write_config(tmp_path, {"name": PBMC})
    return [command, str(config), "--output-dir", str(out)], []


def predict(tmp_path: Path, ckpt: Path, lines: list[str]):
    source = tmp_path / "cells.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    return ["predict", str(ckpt), "--task", PBMC, "--input", str(source), "--output", str(out)], [out]


def adapter_on_another_backbone(tmp_path: Path, sft_run) -> Path:
    """The SFT run's LoRA checkpoint, its recorded base replaced by a backbone of another size."""
    ckpt = shutil.copytree(sft_run.final, tmp_path / "ckpt")
    other = build_tiny_backbone("tiny-m", ["cells and genes"] * 20, tmp_path / "tiny-m")
    info = json.loads((ckpt / "biopost_checkpoint.json").read_text())
    (ckpt / "biopost_checkpoint.json").write_text(json.dumps({**info, "base": str(other)}))
    return ckpt


def study(tmp_path: Path, shares: list) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps({"name": "s", "base": json.loads(write_config(
        tmp_path, {"name": PBMC}, [{"kind": "sft"}, {"kind": "rl"}]).read_text()),
        "blocks": {"b": {"budget": {"unit": "steps", "total": 10, "stages": ["sft", "rl"], "shares": shares}}}}))
    return path


# ---------------------------------------------------------------- cases: (argv, outputs) and what the line names
CASES = {
    "fasta without a header": (
        lambda t, r: train(t, cafa_task(t, "MKVLAAGIVLLLA\n" + fasta(PROTEINS))),
        ["proteins.fasta", "not a FASTA file", "'>ID' header"]),
    "fasta record without a sequence": (
        lambda t, r: train(t, cafa_task(t, ">P1 9606\n\n" + fasta({"P2": PROTEINS["P2"]}))),
        ["proteins.fasta", "record 1 ('P1')", "empty protein sequence", "fix or drop"]),
    "fasta with a repeated id": (
        lambda t, r: train(t, cafa_task(t, fasta(PROTEINS) + ">P2\nMKV\n")),
        ["proteins.fasta", "record 4 ('P2')", "id repeated", "its own id"]),
    "invalid residues": (
        lambda t, r: train(t, cafa_task(t, fasta({**PROTEINS, "P2": "MKV1LAA"}))),
        ["proteins.fasta", "record 2 ('P2')", "'1' at position 4", "amino acids", "fix or drop"]),
    "invalid bases in a csv": (
        lambda t, r: train(t, table_task(t, rows(r7={"text": "ACGTUX"}), columns={"dna": "text"})),
        ["rows.csv", "example 'r7'", "column 'text'", "'U', 'X' at position 5", "DNA bases", "fix or drop"]),
    "sequence longer than max_residues (truncation: error)": (
        lambda t, r: train(t, cafa_task(t, fasta(PROTEINS), max_residues=10, truncation="error")),
        ["proteins.fasta", "protein 'P1'", "13 exceeds task.options.max_residues (10)", "truncation: truncate"]),
    "missing label column in a csv": (
        lambda t, r: train(t, table_task(t, rows(), columns={"answer": "cell_type"})),
        ["rows.csv", "no column 'cell_type'", "task.options.columns.answer", "columns: id, text, label, group"]),
    "empty label in a csv": (
        lambda t, r: train(t, table_task(t, rows(r4={"label": " "}))),
        ["rows.csv", "example 'r4'", "no answer in column 'label'"]),
    "missing label column in an h5ad": (
        lambda t, r: train(t, h5ad_task(t, ["B", "T", "NK"] * 10, label_key="celltype")),
        ["cells.h5ad", "no obs column 'celltype'", "task.options.label_key", "columns: ['cell_type', 'tissue']"]),
    "empty labels in an h5ad": (
        lambda t, r: train(t, h5ad_task(t, ["B", "T", None] * 10)),
        ["cells.h5ad", "cell 'cell2' and 9 more", "obs column 'cell_type'", "fill them or drop those cells"]),
    "a truncated h5ad": (
        lambda t, r: train(t, damaged_h5ad_task(t, "truncated")),
        ["cells.h5ad: not a readable AnnData .h5ad file", "truncated file", "point task.options.path at it"]),
    "a text file named .h5ad": (
        lambda t, r: train(t, damaged_h5ad_task(t, "text")),
        ["cells.h5ad: not a readable AnnData .h5ad file", "write it with adata.write_h5ad"]),
    "train: --output-dir names a file": (
        lambda t, r: file_as_output_dir(t, "train"),
        ["run is a file, not a run directory", "choose another --output-dir"]),
    "baseline: --output-dir names a file": (
        lambda t, r: file_as_output_dir(t, "baseline"),
        ["run is a file, not a run directory", "choose another --output-dir"]),
    "baseline: features the task has no payloads for": (  # the error's own "baseline:" is not said twice
        lambda t, r: (file_as_output_dir(t, "baseline")[0][:2] + ["--output-dir", str(t / "b"), "--features", "kmer"], []),
        ["kmer features need dna or protein payloads", "task cell_type/pbmc68k"]),
    "an empty split": (
        lambda t, r: train(t, table_task(t, rows(6), split={"ood_test_groups": ["B", "C"]})),
        ["task.split", "empty split: ", "change val_fraction / id_test_fraction or the OOD groups"]),
    "a held-out group that does not exist": (
        lambda t, r: train(t, table_task(t, rows(), split={"ood_test_groups": ["Z"]})),
        ["task.split", "ood_test_groups: ['Z'] are not groups of 'group'", "groups present: ['A', 'B', 'C']"]),
    "zero generations": (
        lambda t, r: train(t, {"name": PBMC}, [{"kind": "sft"}, {"kind": "rl", "num_generations": 0}]),
        ["'stages.1.num_generations'", "greater than or equal to 2", "got 0"]),
    "a stage init naming a later stage": (
        lambda t, r: train(t, {"name": PBMC}, [{"kind": "sft", "init": "rl:best"}, {"kind": "rl"}]),
        ["stage sft: init 'rl:best' names a later stage", "previous, base or an earlier stage"]),
    "budget shares that do not fit the stages": (
        lambda t, r: (["study", "plan", str(study(t, [[1, 3], [1]])), "--dry-run"], []),
        ["'blocks.b.budget'", "share [1.0] has 1 weights for 2 stages (sft, rl)", "one weight per stage"]),
    "budget shares all zero": (
        lambda t, r: (["study", "plan", str(study(t, [[0, 0]])), "--dry-run"], []),
        ["'blocks.b.budget'", "share [0.0, 0.0]", "not all zero"]),
    "a checkpoint of another task": (
        lambda t, r: (["eval", str(r.final), "--task", "amp/modlamp"], []),
        ["0-sft/final: checkpoint trained on task 'cell_type/pbmc68k', not 'amp/modlamp'",
         "--task cell_type/pbmc68k"]),
    "an adapter for another backbone": (
        lambda t, r: (["eval", str(adapter_on_another_backbone(t, r)), "--task", PBMC, "--max-examples", "2"], []),
        ["ckpt", "adapter trained on another backbone", "hidden_size 64 vs 128", "put the backbone it was trained on"]),
    "predict: a line that is not JSON": (
        lambda t, r: predict(t, r.final, ['{"id": "c1", "genes": ["LYZ"]}', '{"id": "c2", "genes": [']),
        ["cells.jsonl:2", "not valid JSON", "one JSON object per line"]),
    "predict: a line that is not an object": (
        lambda t, r: predict(t, r.final, ['["LYZ", "CD74"]']),
        ["cells.jsonl:1", "a list, not a JSON object", "task's input format"]),
    "predict: a record without its field": (
        lambda t, r: predict(t, r.final, ['{"id": "c1", "genes": ["LYZ"]}', '{"id": "c2", "expr": {"LYZ": 1}}']),
        ["cells.jsonl:2", "a cell needs 'genes'", "or 'expression'"]),
    "predict: a field of the wrong type": (
        lambda t, r: predict(t, r.final, ['{"id": "c1", "genes": "LYZ CD74"}']),
        ["cells.jsonl:1", "'genes' must be a list of gene symbols"]),
}
NEEDS_CHECKPOINT = {name for name in CASES if name.startswith(("predict", "a checkpoint", "an adapter"))}


@pytest.fixture
def checkpoint_run(request):
    """The shared short SFT run, built only for the cases that read a checkpoint."""
    return request.getfixturevalue("sft_run") if request.node.callspec.id in NEEDS_CHECKPOINT else None


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_line_naming_file_record_and_fix(case, checkpoint_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make, fragments = CASES[case]
    argv, outputs = make(tmp_path, checkpoint_run)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"biopost {argv[0]}: ") and "Traceback" not in err
    assert not lines[0].startswith(f"biopost {argv[0]}: {argv[0]}: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    for path in outputs:
        assert not path.exists(), f"{path} written by a run that failed"


# ---------------------------------------------------------------- predict records of the sequence tasks
@pytest.mark.parametrize("task, record, fragment", [
    ("amp/modlamp", {"sequence": "GLFD1VKK"}, "in.jsonl:3: '1' at position 5 is not among the amino acids"),
    ("amp/modlamp", {"sequence": 42}, "in.jsonl:3: '4', '2' at position 1 is not among the amino acids"),
    ("tf_class/jaspar", {"sequence": "ACGU"}, "in.jsonl:3: a site needs 'sequence' made of A, C, G, T"),
])
def test_predict_records_with_letters_outside_the_alphabet(task, record, fragment):
    from biopost.registry import get_task

    with pytest.raises(ValueError) as err:
        get_task(task).example_from_input(record, "in.jsonl:3")
    assert str(err.value).startswith(fragment) and "\n" not in str(err.value)


def test_a_gzipped_fasta_is_read_and_a_broken_one_is_one_line(tmp_path):
    import gzip

    from biopost.data.sequences import read_fasta

    path = tmp_path / "p.fasta.gz"
    path.write_bytes(gzip.compress(fasta(PROTEINS).encode()))
    assert {k: v[0] for k, v in read_fasta(path, "protein").items()} == PROTEINS
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"^p\.fasta\.gz: not a FASTA file \(.*\); every record starts"):
        read_fasta(path, "protein")
