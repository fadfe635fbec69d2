"""The `table` task: tasks defined only in a config over CSV / TSV / Parquet / JSON(L) files and `datasets`
directories; column maps, templates, label sets and the four answer kinds; one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from biopost.cli import main
from biopost.config import ConfigError, load_config, validate_config
from biopost.pipeline import load_task_and_splits
from biopost.registry import get_task
from biopost.tasks.answer_kinds import parse_number

TYPES = ["B", "T", "NK", "Mono"]
MARKERS = {"B": "MS4A1 CD79A", "T": "CD3E CD3D", "NK": "NKG7 GNLY", "Mono": "LYZ CD14"}
PHASES = ["G1", "G1", "S", "G2M"]


def cell_rows(n: int = 48) -> list[dict]:
    """Distinct cells: the marker genes of the type, then a per-cell filler gene."""
    return [{"cell_id": f"c{i:03d}", "genes": f"{MARKERS[TYPES[i % 4]]} GENE{i}", "cell_type": TYPES[i % 4],
             "phase": PHASES[(i // 4) % 4]} for i in range(n)]


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ISSUE_YAML = """
task:
  name: table
  options:
    source: {source}
    columns: {{id: cell_id, answer: cell_type, group: phase}}
    prompt: "Genes of one cell, most expressed first: {{{{ genes }}}}. Which cell type is it?"
    answer_kind: label
  split: {{ood_test_groups: [S, G2M]}}
stages: [{{kind: sft}}]
"""


def table_config(source, **options) -> dict:
    columns = options.pop("columns", {"id": "cell_id", "answer": "cell_type", "group": "phase"})
    split = options.pop("split", {"ood_test_groups": ["S", "G2M"]})
    prompt = options.pop("prompt", "Genes: {{ genes }}. Which cell type?")
    return {"task": {"name": "table", "options": {"source": str(source), "columns": columns, "prompt": prompt, **options},
                     "split": split}, "stages": [{"kind": "sft"}]}


def load(raw: dict):
    return load_task_and_splits(validate_config(raw))


# ---------------------------------------------------------------- the shape in the issue, from a CSV file
def test_issue_yaml_works_as_written_on_a_csv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "cells.csv", cell_rows())
    (tmp_path / "task.yaml").write_text(ISSUE_YAML.format(source="cells.csv"))
    task, splits = load_task_and_splits(load_config(tmp_path / "task.yaml"))
    assert {e.meta["phase"] for e in splits.ood_test} == {"S", "G2M"}
    assert {e.meta["phase"] for s in ("train", "val", "id_test") for e in splits[s]} == {"G1"}
    assert sum(splits.sizes().values()) == 48
    assert task.labels == sorted(TYPES)  # read from the training split
    example = splits.id_test[0]
    row = next(r for r in cell_rows() if r["cell_id"] == example.id)
    user = task.messages(example)[-1]["content"]
    assert user == f"Genes of one cell, most expressed first: {row['genes']}. Which cell type is it?"
    assert task.target(example).endswith(f"Answer: {row['cell_type']}")
    assert task.score(f"<think>\nmarkers\n</think>\n\nAnswer: {row['cell_type']}", example)["accuracy"] == 1.0
    wrong = next(t for t in TYPES if t != row["cell_type"])
    assert task.score(f"<think>\nx\n</think>\n\nAnswer: {row['cell_type']} or {wrong}", example)["accuracy"] == 0.0


def test_csv_is_read_as_written(tmp_path):
    """Ids keep their zeros, 'NA' stays text, numbers keep their spelling: no type guessing on CSV / TSV."""
    rows = [{"cell_id": f"00{i}", "genes": "NA" if i == 0 else f"G{i}", "cell_type": TYPES[i % 2],
             "phase": ["G1", "S"][i // 6], "score": "3"} for i in range(8)]
    task, splits = load(table_config(write_csv(tmp_path / "t.csv", rows), split={"ood_test_groups": ["S"]}))
    examples = {e.id: e for s in splits.sizes() for e in splits[s]}
    assert "000" in examples and examples["000"].fields["genes"] == "NA" and examples["001"].fields["score"] == "3"


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl", "json"])
def test_every_file_format_gives_the_same_examples(tmp_path, fmt):
    rows = cell_rows(24)
    path = tmp_path / f"cells.{fmt}"
    if fmt in ("csv", "tsv"):
        write_csv(path, rows, "," if fmt == "csv" else "\t")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        path.write_text(json.dumps(rows))
    task, splits = load(table_config(path))
    got = sorted((e.id, e.answer, e.fields["genes"], e.meta["phase"]) for s in splits.sizes() for e in splits[s])
    assert got == sorted((r["cell_id"], r["cell_type"], r["genes"], r["phase"]) for r in rows)


# ---------------------------------------------------------------- a JSONL task: payloads, reasoning, sets of labels
def dna_rows() -> list[dict]:
    motifs = {"TATA": ["TBP"], "CACGTG": ["MYC", "MAX"], "GGAA": ["ETS1"], "CCAAT": ["NFYA"]}
    rows = []
    for i in range(40):
        motif, factors = list(motifs.items())[i % 4]
        tag = "".join("ACGT"[(i >> (2 * k)) & 3] for k in range(3))  # a unique tail, in bases
        rows.append({"site": f"s{i}", "window": f"{'ACGT'[i % 4] * (i % 7 + 1)}{motif}GC{tag}",
                     "factors": factors, "why": f"the window holds {motif}", "species": ["human", "mouse"][i // 20]})
    return rows


def test_jsonl_task_with_a_dna_payload_reasoning_and_multilabel_answers(tmp_path):
    path = write_jsonl(tmp_path / "sites.jsonl", dna_rows())
    task, splits = load(table_config(
        path, columns={"id": "site", "answer": "factors", "group": "species", "dna": "window", "reasoning": "why"},
        prompt="Which factors bind {{ window }}? Choose from {{ choices | join(', ') }}.",
        answer_kind="multilabel", split={"ood_test_groups": ["mouse"]}))
    assert task.primary_metric == task.reward_metric == "f1"
    example = next(e for e in splits.train if e.id == "s1")
    assert example.dna == "CCCACGTGGCCAA" and "window" not in example.fields
    assert example.answer == "MYC; MAX" and example.reasoning == "the window holds CACGTG"
    assert task.target(example) == "<think>\nthe window holds CACGTG\n</think>\n\nAnswer: MYC; MAX"
    assert task.messages(example)[-1]["content"] == "Which factors bind CCCACGTGGCCAA? Choose from ETS1, MAX, MYC, NFYA, TBP."
    task.fused_modalities = frozenset({"dna"})  # read through an encoder: the prompt holds the placeholder
    assert task.messages(example)[-1]["content"].startswith("Which factors bind <|dna|>?")

    def scores(answer):
        return task.score(f"<think>\nx\n</think>\n\nAnswer: {answer}", example)

    assert scores("MAX; MYC")["f1"] == 1.0 and scores("max;myc")["f1_strict"] == 1.0
    half = scores("MYC; TBP")
    assert half["precision"] == 0.5 and half["recall"] == 0.5 and half["f1"] == 0.5 and half["exact_match"] == 0.0
    assert scores("MYC; MAX; TBP; ETS1; NFYA")["f1"] == pytest.approx(2 * 0.4 / 1.4)  # listing all costs precision
    assert task.score("no answer here", example)["f1"] == 0.0


def test_number_and_exact_answers(tmp_path):
    rows = [{"id": f"g{i}", "seq": "ACGT" * (i + 1), "gc": f"{50 + i}.0", "name": f"Gene {i}", "batch": str(i % 2)}
            for i in range(20)]
    path = write_jsonl(tmp_path / "genes.jsonl", rows)
    common = {"split": {"ood_test_groups": ["1"]}, "prompt": "{{ seq }}"}
    task, splits = load(table_config(path, columns={"id": "id", "answer": "gc", "group": "batch"},
                                     answer_kind="number", tolerance=0.5, **common))
    example = next(e for e in splits.ood_test if e.id == "g1")  # gold 51.0
    score = lambda text: task.score(f"<think>\nx\n</think>\n\nAnswer: {text}", example)  # noqa: E731
    assert score("51.4")["accuracy"] == 1.0 and score("51.6")["accuracy"] == 0.0
    assert score("51 percent") == {"accuracy": 1.0, "accuracy_strict": 0.0, "format": 1.0}
    assert score("51 or 52")["accuracy"] == 0.0
    assert task.prediction("<think></think>Answer: 51.00") == {"strict": "51.00", "lenient": "51.00"}

    task, splits = load(table_config(path, columns={"id": "id", "answer": "name", "group": "batch"},
                                     answer_kind="exact", **common))
    example = next(e for e in splits.ood_test if e.id == "g3")
    assert task.score("<think>\nx\n</think>\n\nAnswer: gene 3.", example)["accuracy_strict"] == 1.0
    assert task.score("<think>\nx\n</think>\n\nAnswer: Gene 33", example)["accuracy"] == 0.0


def number_task(tmp_path, golds: list[str], **options):
    """A number task over rows whose gold answers are ``golds`` (one OOD batch of each parity)."""
    rows = [{"id": f"g{i}", "seq": "ACGT" * (i + 1), "value": gold, "batch": str(i % 2)} for i, gold in enumerate(golds)]
    task, splits = load(table_config(write_jsonl(tmp_path / "values.jsonl", rows), answer_kind="number",
                                     columns={"id": "id", "answer": "value", "group": "batch"},
                                     split={"ood_test_groups": ["1"]}, prompt="{{ seq }}", **options))
    return task, {e.id: e for s in ("train", "val", "id_test", "ood_test") for e in splits[s]}


def answer(text: str) -> str:
    return f"<think>\nx\n</think>\n\nAnswer: {text}"


@pytest.mark.parametrize("text", ["not 3.5", "< 3.5", "<3.5", "≤ 3.5", "~3.5", "3.5?", "about 3.5", "3.5 or 4",
                                  "3.5 maybe", "maybe 3.5", "3.5-4", "3.5 ± 0.1", "at least 3.5"])
def test_hedged_negated_or_questioned_numbers_get_no_credit(tmp_path, text):
    task, examples = number_task(tmp_path, ["3.5"] * 20)
    assert task.score(answer(text), examples["g1"])["accuracy"] == 0.0
    assert task.prediction(answer(text))["lenient"] is None


@pytest.mark.parametrize("text, strict", [("3.5 kb", 0.0), ("3.5kb", 0.0), ("**3.5**", 1.0), ("(3.5).", 0.0),
                                          (" 3.50 ", 1.0), ("3.5 mg/mL", 0.0), ("35e-1 %", 0.0)])
def test_lenient_numbers_forgive_units_spacing_and_punctuation(tmp_path, text, strict):
    task, examples = number_task(tmp_path, ["3.5"] * 20)
    assert task.score(answer(text), examples["g1"]) == {"accuracy": 1.0, "accuracy_strict": strict, "format": 1.0}


def test_thousands_separators_group_three_digits(tmp_path):
    task, examples = number_task(tmp_path, ["15", "1500"] * 10)
    assert task.score(answer("1,5"), examples["g0"])["accuracy"] == 0.0  # was read as 15
    assert task.score(answer("1,500"), examples["g1"])["accuracy_strict"] == 1.0
    assert [task.score(answer(a), examples["g1"])["accuracy"] for a in ("1,50,0", "15,00", "1,5000")] == [0.0] * 3
    with pytest.raises(ValueError, match=r"values.jsonl: example 'g0': answer '1,5' is not a number"):
        number_task(tmp_path, ["1,5"] * 20)


def test_tolerance_zero_is_exact_equality_and_tolerances_are_decimal(tmp_path):
    task, examples = number_task(tmp_path, ["3.5"] * 20)
    assert task.score(answer("3.5000000000001"), examples["g1"])["accuracy"] == 0.0  # 1e-13 off: was credited
    assert task.score(answer("3.50"), examples["g1"])["accuracy_strict"] == 1.0
    task, examples = number_task(tmp_path, ["3.5"] * 20, tolerance=0.1)
    assert task.score(answer("3.6"), examples["g1"])["accuracy"] == 1.0  # 3.6 - 3.5 is 0.1, not 0.10000000000000009
    assert task.score(answer("3.6000001"), examples["g1"])["accuracy"] == 0.0


def test_predicted_numbers_are_written_as_parsed(tmp_path):
    task, _ = number_task(tmp_path, ["3.5"] * 20)
    for text in ("1234567", "0.1000000001", "-2.5e-12", "1,234,567.25"):
        value = task.prediction(answer(text))["strict"]
        assert value == text.replace(",", "") or float(value) == float(text)  # was "1.23457e+06" (six digits)
        assert parse_number(value) == parse_number(text)


def test_label_collision_prefers_the_closest_label(tmp_path):
    rows = [{"cell_id": f"c{i}", "genes": f"G{i}", "cell_type": ["B", "B cell", "T"][i % 3], "phase": "GS"[i % 2]}
            for i in range(36)]
    task, splits = load(table_config(write_csv(tmp_path / "cells.csv", rows), split={"ood_test_groups": ["S"]}))
    b, b_cell = (next(e for e in splits.ood_test if e.answer == label) for label in ("B", "B cell"))
    scores = lambda text, example: task.score(answer(text), example)["accuracy"]  # noqa: E731
    assert scores("B cell", b_cell) == 1.0 and scores("B cell", b) == 0.0  # was 0 for both: a shared lenient form
    assert scores("B", b) == 1.0 and scores("B", b_cell) == 0.0
    assert scores("the B cell.", b_cell) == 1.0 and scores("the B cell.", b) == 0.0
    assert scores("B cells", b) == scores("B cells", b_cell) == 0.0  # fits both: ambiguous, no credit
    assert task.prediction(answer("B-cells"))["lenient"] is None


def test_multilabel_rows_without_labels_are_refused_at_load(tmp_path):
    rows = [{"id": f"s{i}", "seq": "ACGT" * (i + 1), "tfs": "MYC; MAX", "batch": str(i % 2)} for i in range(20)]
    for empty in (" ; ", []):
        rows[7]["tfs"] = empty
        with pytest.raises(ValueError, match=r"^values.jsonl: example 's7' has no labels in column 'tfs' "
                                             r"\(columns.answer\); give every row at least one label"):
            load(table_config(write_jsonl(tmp_path / "values.jsonl", rows), answer_kind="multilabel",
                              columns={"id": "id", "answer": "tfs", "group": "batch"},
                              split={"ood_test_groups": ["1"]}, prompt="{{ seq }}"))


def test_prompt_errors_on_a_later_row_name_the_row_at_load(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = cell_rows()
    rows[30].pop("genes")  # a JSON row without the key the prompt uses
    write_jsonl(tmp_path / "cells.jsonl", rows)
    with pytest.raises(ValueError, match=r"^task.options.prompt: the template uses genes, which example 'c030' does "
                                         r"not provide; its variables: choices, phase$"):
        load(table_config("cells.jsonl"))
    rows = cell_rows()
    rows[41]["genes"] = None
    write_jsonl(tmp_path / "cells.jsonl", rows)
    raw = table_config("cells.jsonl", prompt="First gene: {{ genes.split()[0] }}")
    with pytest.raises(ValueError, match=r"^task.options.prompt: the template fails on example 'c041' \(UndefinedError"):
        load(raw)
    raw["task"]["split"]["allow_overlap"] = True  # no leakage check: the prompts are still all rendered at load
    (tmp_path / "run.yaml").write_text(json.dumps(raw))
    assert main(["train", "run.yaml", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "example 'c041'" in err and len(err.splitlines()) == 1 and not (tmp_path / "run" / "stages").exists()


def test_cell_payload_column_shows_through_sequence_text(tmp_path):
    rows = [{"id": f"c{i}", "cell": {"LYZ": 3.0 + i, "CD14": 1.0, f"G{i}": 0.5, "XIST": 0.0}, "type": "Mono",
             "donor": f"d{i % 3}"} for i in range(12)]
    path = write_jsonl(tmp_path / "cells.jsonl", rows)
    task, splits = load(table_config(path, columns={"id": "id", "answer": "type", "group": "donor", "cell": "cell"},
                                     prompt="Cell: {{ cell }}.", split={"ood_test_groups": ["d2"]},
                                     labels=["Mono", "B"]))
    example = splits.ood_test[0]
    assert example.cell["genes"] == ["LYZ", "CD14", "G2"] and example.cell["values"] == [5.0, 1.0, 0.5]
    assert task.messages(example)[-1]["content"] == "Cell: LYZ CD14 G2."
    assert task.labels == ["Mono", "B"]  # given, not read from train
    task.fused_modalities = frozenset({"cell"})
    assert task.messages(example)[-1]["content"] == "Cell: <|cell|>."


# ---------------------------------------------------------------- Hub-style datasets, from local directories
def test_saved_datasets_directory_and_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = cell_rows(24)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": Dataset.from_list(rows), "extra": Dataset.from_list(rows[:12])}).save_to_disk(str(tmp_path / "dict"))
    _, single = load(table_config(tmp_path / "single"))
    _, extra = load(_with(table_config(tmp_path / "dict", split={"ood_test_groups": ["S"]}), split="extra"))
    assert sum(single.sizes().values()) == 24 and sum(extra.sizes().values()) == 12
    with pytest.raises(ValueError, match=r"has no split 'test'; splits: train, extra"):
        load(_with(table_config(tmp_path / "dict"), split="test"))


def _with(raw: dict, **options) -> dict:
    raw["task"]["options"].update(options)
    return raw


def test_local_data_directory_through_load_dataset(tmp_path):
    """A directory of data files, read by datasets' own loader as a Hub repository would be."""
    (tmp_path / "repo").mkdir()
    write_csv(tmp_path / "repo" / "train.csv", cell_rows(24))
    task, splits = load(table_config(tmp_path / "repo"))
    assert sum(splits.sizes().values()) == 24 and task.labels == sorted(TYPES)


def test_hub_id_that_cannot_be_loaded_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        load(table_config("no-such-user/no-such-dataset"))
    assert "could not load dataset 'no-such-user/no-such-dataset'" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


# ---------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("change, message", [
    ({"columns": {"id": "cell_id", "answer": "celltype", "group": "phase"}},
     "cells.csv has no column 'celltype' (task.options.columns.answer); columns: cell_id, genes, cell_type, phase"),
    ({"columns": {"id": "cell_id", "answer": "cell_type", "group": "phase", "dna": "seq"}},
     "cells.csv has no column 'seq' (task.options.columns.dna); columns: cell_id, genes, cell_type, phase"),
    ({"prompt": "Genes: {{ gene }}."},
     "task.options.prompt: the template uses gene, which example 'c000' does not provide; its variables: choices, "
     "genes, phase"),
    ({"prompt": "Genes: {{ genes }."}, "'task.options.prompt': template syntax error (line 1): unexpected '}'"),
    ({"prompt": "{{ genes.__class__.__mro__ }}"}, "task.options.prompt: the template fails on example 'c000' (Security"),
    ({"columns": {"answer": "cell_type", "group": "phase", "fields": ["genes", "cell_type"]}},
     "fields include 'cell_type', the answer or reasoning column"),
    ({"columns": {"answer": "cell_type", "group": "phase", "label": "x"}},
     "unknown key 'task.options.columns.label' for task table; valid keys here: answer, cell, dna, fields, group, id, "
     "protein, reasoning"),
    ({"answer_kind": "number"}, "answer 'B' is not a number"),
    ({"tolerance": 0.1}, "tolerance applies to answer_kind number, not label"),
    ({"labels": ["B", "T", "NK"]}, "1 answer not in task.options.labels: ['Mono']; list every label in"),
    ({"source": "missing.csv"}, "table not found: missing.csv"),
    ({"revision": "v2"}, "task.options.revision does not apply to a file (cells.csv)"),
])
def test_bad_maps_and_templates_are_one_line_errors(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "cells.csv", cell_rows())
    raw = table_config("cells.csv")
    raw["task"]["options"].update(change)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load(raw)
    assert message in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_held_out_label_missing_from_train_is_an_error(tmp_path):
    rows = cell_rows()
    for r in rows:
        if r["phase"] == "S":
            r["cell_type"] = "Platelet"  # only in ood_test
    with pytest.raises(ValueError, match=r"1 answer not in the label set read from the training split: \['Platelet'\]; "
                                         "list every label in task.options.labels"):
        load(table_config(write_csv(tmp_path / "cells.csv", rows)))
    task, splits = load(table_config(tmp_path / "cells.csv", labels=[*TYPES, "Platelet"]))
    assert "Platelet" in task.labels and {e.answer for e in splits.ood_test} >= {"Platelet"}


def test_missing_values_name_the_example_and_column(tmp_path):
    rows = cell_rows()
    rows[5]["cell_type"] = ""
    with pytest.raises(ValueError, match=r"cells.csv: example 'c005' has no answer in column 'cell_type'"):
        load(table_config(write_csv(tmp_path / "cells.csv", rows)))
    rows = cell_rows()
    rows[7]["cell_id"] = rows[6]["cell_id"]
    with pytest.raises(ValueError, match=r"column 'cell_id' \(columns.id\) repeats ids, e.g. \['c006'\]"):
        load(table_config(write_csv(tmp_path / "cells.csv", rows)))


def test_cli_train_with_a_bad_column_map_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "cells.csv", cell_rows())
    (tmp_path / "task.yaml").write_text(ISSUE_YAML.format(source="cells.csv").replace("group: phase", "group: stage"))
    assert main(["train", "task.yaml", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("biopost train: cells.csv has no column 'stage' (task.options.columns.group); "
                   "columns: cell_id, genes, cell_type, phase")


def test_rows_from_predict_input(tmp_path):
    task = get_task("table", table_config(write_csv(tmp_path / "cells.csv", cell_rows()))["task"]["options"])
    task.labels = sorted(TYPES)
    example = task.example_from_input({"cell_id": "mine", "genes": "CD3E CD3D"}, "in.jsonl:1")
    assert example.id == "mine" and task.messages(example)[-1]["content"] == "Genes: CD3E CD3D. Which cell type?"
    with pytest.raises(ValueError, match=r"in.jsonl:2: no column 'genes', which the prompt uses"):
        task.example_from_input({"cell_id": "x", "markers": "CD3E"}, "in.jsonl:2")
    with pytest.raises(ConfigError):
        get_task("table", {"source": "x.csv"})


def test_any_column_can_define_the_ood_split(tmp_path):
    """Held-out cell types: the answer column as ood_field, with the label set given so NK can be answered."""
    task, splits = load(table_config(write_csv(tmp_path / "cells.csv", cell_rows()), labels=TYPES,
                                     split={"ood_field": "cell_type", "ood_test_groups": ["NK"]}))
    assert {e.answer for e in splits.ood_test} == {"NK"} and "NK" not in {e.answer for e in splits.train}
    assert task.labels == TYPES


# ---------------------------------------------------------------- review fixes (issue 17)
@pytest.mark.parametrize("given", [False, True])
def test_labels_that_are_one_answer_to_the_scorer_are_refused_at_load(tmp_path, given):
    """'A' and 'a' parse to the same answer: a perfect answer could never score, so loading refuses."""
    rows = [{**row, "cell_type": "b" if row["cell_type"] == "NK" else row["cell_type"]} for row in cell_rows()]
    options = {"labels": ["B", "T", "b", "Mono"]} if given else {}
    with pytest.raises(ValueError, match=r"labels 'B' and 'b' in .* are the same answer to the scorer"):
        load(table_config(write_csv(tmp_path / "cells.csv", rows), **options))
    with pytest.raises(ValueError, match=r"labels 'T' and 't\.' in task.options.labels"):
        load(table_config(write_csv(tmp_path / "ok.csv", cell_rows()), labels=TYPES + ["t."]))


def test_a_template_indexing_choices_read_from_train_loads_and_trains_as_checked(tmp_path):
    """check_prompts and the leakage check see the prompt that is trained on: choices filled by fit."""
    task, splits = load(table_config(write_csv(tmp_path / "cells.csv", cell_rows()),
                                     prompt="{{ genes }}: {{ choices[0] }} or {{ choices[-1] }}?"))
    example = splits.train[0]
    assert task.messages(example)[-1]["content"] == f"{example.fields['genes']}: B or T?"


def test_split_on_a_directory_holding_one_dataset_is_an_error(tmp_path):
    from datasets import Dataset

    Dataset.from_list(cell_rows(24)).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ConfigError, match=r"task.options.split \(test\) does not apply to single: it holds one Dataset"):
        load(_with(table_config(tmp_path / "single"), split="test"))


def test_a_csv_in_a_data_directory_is_read_as_text_like_the_file(tmp_path):
    """Through datasets.load_dataset too, ids '0036' stay '0036' and groups '03' stay '03'."""
    rows = [{**row, "cell_id": f"{i:04d}", "phase": f"{PHASES.index(row['phase']) + 1:02d}"}
            for i, row in enumerate(cell_rows())]
    (tmp_path / "repo").mkdir()
    write_csv(tmp_path / "repo" / "train.csv", rows)
    split = {"ood_test_groups": ["03", "04"]}
    _, from_file = load(table_config(tmp_path / "repo" / "train.csv", split=split))
    _, from_dir = load(table_config(tmp_path / "repo", split=split))
    assert from_dir.fingerprints() == from_file.fingerprints()
    assert {e.id for e in from_dir.ood_test} == {r["cell_id"] for r in rows if r["phase"] in ("03", "04")}


def test_eval_and_predict_find_a_relative_table_from_any_directory(tmp_path, monkeypatch, capsys, fast_config,
                                                                   one_thread):
    """The checkpoint records the table's absolute path; a moved table is one line naming --option source=."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    write_csv(work / "cells.csv", cell_rows())
    raw = fast_config()
    raw["task"] = table_config("cells.csv")["task"]
    raw["stages"] = [{**raw["stages"][0], "max_steps": 1, "eval_every_steps": None}]
    raw["eval"]["max_examples"] = 2
    (work / "run.yaml").write_text(json.dumps(raw))
    monkeypatch.chdir(work)
    assert main(["train", "run.yaml", "--output-dir", str(tmp_path / "run")]) == 0
    final = str(tmp_path / "run" / "stages" / "0-sft" / "final")
    monkeypatch.chdir(elsewhere)
    (elsewhere / "in.jsonl").write_text(json.dumps({"cell_id": "mine", "genes": "CD3E CD3D"}) + "\n")
    capsys.readouterr()
    assert main(["eval", final, "--task", "table", "--splits", "val", "--max-examples", "2"]) == 0
    assert main(["predict", final, "--task", "table", "--input", "in.jsonl", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    (work / "cells.csv").rename(elsewhere / "moved.csv")
    assert main(["eval", final, "--task", "table", "--splits", "val"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(work / "cells.csv") in err and "--option source=NEW_PATH" in err and len(err.splitlines()) == 1
    assert main(["eval", final, "--task", "table", "--splits", "val", "--max-examples", "2",
                 "--option", "source=moved.csv"]) == 0
