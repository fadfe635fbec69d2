"""Genomics tasks: hub-schema files the tests write, networks / chromosomes / taxa held out whole, prompts
that switch between text and encoder placeholders, rationales from training statistics only."""

from __future__ import annotations

import dataclasses
import json

import pytest
from genomics_data import coding_rows, kegg_rows, non_snv_rows, write

from biopost.cli import main
from biopost.config import ConfigError, validate_config
from biopost.data.example import PLACEHOLDERS
from biopost.data.splits import SPLIT_NAMES, LeakageError, check_leakage, cut_splits
from biopost.pipeline import load_task_and_splits, split_rule
from biopost.registry import get_task
from biopost.tasks.genomics.dna import reverse_complement
from conftest import assert_prompt_shows_placeholder


def load(name: str, split: dict | None = None, **options):
    config = validate_config({"task": {"name": name, "options": options, "split": split or {}},
                              "stages": [{"kind": "sft"}]})
    return load_task_and_splits(config)


@pytest.fixture(scope="module")
def kegg_file(tmp_path_factory):
    return write(kegg_rows(), tmp_path_factory.mktemp("kegg") / "kegg.jsonl")


@pytest.fixture(scope="module")
def tf():
    return load("tf_class/jaspar")


# ---------------------------------------------------------------- KEGG
def test_kegg_networks_are_held_out_whole_and_seeded(kegg_file):
    task, splits = load("kegg/disease", source=str(kegg_file))
    networks = lambda name: {e.meta["network"] for e in splits[name]}  # noqa: E731
    assert len({e.meta["network"] for name in ("train", "val", "id_test", "ood_test") for e in splits[name]}) == 10
    assert splits.ood_test and len(splits.ood_test_groups) == 2  # 20% of 10 networks
    assert networks("ood_test") == set(splits.ood_test_groups)
    assert not networks("ood_test") & (networks("train") | networks("val") | networks("id_test"))
    # records whose '*' marks another gene of the same network belong to that network
    assert all(len([e for e in splits.ood_test if e.meta["network"] == g]) == 4 for g in splits.ood_test_groups)
    again = load("kegg/disease", source=str(kegg_file))[1]
    assert again.ood_test_groups == splits.ood_test_groups
    others = {load("kegg/disease", {"seed": s}, source=str(kegg_file))[1].ood_test_groups for s in range(1, 6)}
    assert len(others | {splits.ood_test_groups}) > 1


def test_kegg_answers_labels_reasoning_and_meta(kegg_file):
    task, splits = load("kegg/disease", source=str(kegg_file))
    assert task.labels == [f"disease {i}" for i in range(6)]  # 'DISEASE 3' merged into 'disease 3'
    example = splits.train[0]
    assert example.answer in task.labels and example.meta["disease"] == example.answer
    assert task.target(example).startswith("<think>\nStep 1:") and task.target(example).endswith(f"Answer: {example.answer}")
    assert example.meta["gene"].startswith("G") and example.meta["chromosome"].isdigit()
    assert example.meta["source_split"] == "file"
    score = task.score(f"<think>x</think>\nAnswer: {example.answer.upper()}", example)
    assert score == {"accuracy": 1.0, "accuracy_strict": 1.0, "format": 1.0}


def test_kegg_prompt_shows_sequences_as_text_or_placeholders(kegg_file):
    task, splits = load("kegg/disease", source=str(kegg_file), window=20)
    example = splits.train[0]
    ref, alt = example.dna
    assert len(ref) == len(alt) == 20 and ref != alt  # windows centred on the variant keep it
    text = task.user_prompt(example)
    assert ref in text and alt in text and example.fields["question"] in text
    task.fused_modalities = frozenset({"dna"})
    fused = task.user_prompt(example)
    assert fused.count(PLACEHOLDERS["dna"]) == 2 and ref not in fused and alt not in fused


def test_kegg_reads_csv_and_drops_duplicate_inputs(tmp_path):
    rows = kegg_rows(networks=5, per_network=2)
    source = write(rows + [dict(rows[0], ID="copy")], tmp_path / "kegg.csv")
    task = get_task("kegg/disease", {"source": str(source)})
    examples = task.load()
    assert len(examples) == 10 and task.dropped_duplicates == 1


@pytest.mark.parametrize("change, message", [
    (lambda r: {k: v for k, v in r.items() if k != "reasoning"}, "lacks column(s) ['reasoning']"),
    (lambda r: dict(r, question="What disease?"), "no 'Network Definition of the pathway:' line"),
])
def test_kegg_schema_problems_are_one_line_errors(tmp_path, change, message):
    source = write([change(r) for r in kegg_rows(networks=2, per_network=1)], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        get_task("kegg/disease", {"source": str(source)}).load()


def test_missing_source_file_and_bad_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        get_task("kegg/disease", {"source": str(tmp_path / "none.jsonl")}).load()
    with pytest.raises(ValueError, match="neither a file nor a hub dataset id"):
        get_task("kegg/disease", {"source": "not-a-hub-id"}).load()
    with pytest.raises(ConfigError, match="task.options.source"):
        get_task("kegg/disease", {})


def test_kegg_example_from_input(kegg_file):
    task = get_task("kegg/disease", {"source": str(kegg_file), "window": 10})
    row = kegg_rows(networks=1, per_network=1)[0]
    example = task.example_from_input(row, "in.jsonl:1")
    assert len(example.dna) == 2 and len(example.dna[0]) == 10 and example.fields["question"] == row["question"]
    with pytest.raises(ValueError, match="needs"):
        task.example_from_input({"question": "q"}, "in.jsonl:2")


# ---------------------------------------------------------------- variant effect
def test_coding_variants_hold_out_chromosome_8_with_binary_answers(tmp_path):
    task, splits = load("variant_effect/coding", source=str(write(coding_rows(), tmp_path / "coding.csv")))
    assert task.labels == ["benign", "pathogenic"]
    assert {e.meta["chromosome"] for e in splits.ood_test} == {"8"} and len(splits.ood_test) == 20
    assert "8" not in {e.meta["chromosome"] for e in splits.train}
    pathogenic = next(e for e in splits.train if e.answer == "pathogenic")
    assert pathogenic.meta["disease"].startswith("disease ")
    assert "single-base substitution C>T" in task.target(pathogenic) and pathogenic.meta["disease"] in task.target(pathogenic)
    benign = next(e for e in splits.train if e.answer == "benign")
    assert benign.meta["disease"] == "none" and "A>G" in task.target(benign)
    assert task.user_prompt(pathogenic).count(pathogenic.dna[1]) == 1


def test_non_snv_reads_mutated_sequence_and_splits_by_disease(tmp_path):
    source = write(non_snv_rows(), tmp_path / "non_snv.jsonl")
    task, splits = load("variant_effect/non_snv", {"ood_field": "disease", "ood_test_groups": ["Disease 2"]},
                        source=str(source))
    assert {e.meta["disease"] for e in splits.ood_test} == {"Disease 2"}
    assert all(e.answer == "pathogenic" for e in splits.ood_test)
    assert all(e.id.startswith("file-") for e in splits.train)  # no ID column: source split and row number
    assert "insertion, deletion or complex change" in task.target(splits.train[0])
    task, splits = load("variant_effect/non_snv", {"ood_test_groups": ["3"]}, source=str(source))
    assert {e.meta["chromosome"] for e in splits.ood_test} == {"3"}


def test_variant_answers_outside_the_two_labels_are_errors(tmp_path):
    rows = [dict(r, answer="uncertain significance") for r in coding_rows(n=4)]
    with pytest.raises(ValueError, match="neither benign nor pathogenic"):
        get_task("variant_effect/coding", {"source": str(write(rows, tmp_path / "x.jsonl"))}).load()


# ---------------------------------------------------------------- JASPAR TF class (embedded)
def test_tf_class_holds_out_plants_over_one_label_set(tf):
    task, splits = tf
    assert {e.meta["taxon"] for e in splits.ood_test} == {"plants"}
    assert "plants" not in {e.meta["taxon"] for n in ("train", "val", "id_test") for e in splits[n]}
    assert len(task.labels) == 5 and {e.answer for e in splits.ood_test} == set(task.labels)
    assert {e.answer for e in splits.train} == set(task.labels)
    assert 500 <= len(splits.train) <= 2000 and len(splits.ood_test) >= 100
    sites = [e.dna for n in ("train", "val", "id_test", "ood_test") for e in splits[n]]
    assert len({min(s, reverse_complement(s)) for s in sites}) == len(sites)  # no site twice, on either strand
    assert set("".join(sites)) == set("ACGT")


def test_tf_class_sites_are_seeded(tf):
    task, splits = tf
    same = get_task("tf_class/jaspar").load()
    other = get_task("tf_class/jaspar", {"seed": 1}).load()
    by_id = {e.id: e.dna for e in same}
    assert all(by_id[e.id] == e.dna for e in splits.train)
    assert sum(e.dna != by_id.get(e.id) for e in other) > len(other) // 2


def test_tf_class_sites_of_one_matrix_share_a_split():
    """Several sites drawn from one matrix are near copies: every matrix id lives in one split, by construction
    and by the leakage check (cut one example at a time, the same sites would span splits)."""
    config = validate_config({"task": {"name": "tf_class/jaspar", "options": {"sites_per_motif": 3}},
                              "stages": [{"kind": "sft"}]})
    task, splits = load_task_and_splits(config)
    where: dict[str, set[str]] = {}
    for name in SPLIT_NAMES:
        for e in splits[name]:
            where.setdefault(e.meta["matrix_id"], set()).add(name)
    assert all(len(names) == 1 for names in where.values())
    sizes = [sum(e.meta["matrix_id"] == m for e in splits.train) for m in {e.meta["matrix_id"] for e in splits.train}]
    assert max(sizes) == 3 and sum(splits.sizes().values()) > 2.5 * len(where)  # blocks of up to 3 sites
    assert abs(len(splits.val) / (len(splits.train) + len(splits.val) + len(splits.id_test)) - 0.1) < 0.01
    rule = split_rule(config, task)
    per_example = cut_splits([e for n in SPLIT_NAMES for e in splits[n]], dataclasses.replace(rule, group_field=None))
    with pytest.raises(LeakageError, match="sharing a matrix_id in two splits: train & val"):
        check_leakage(per_example, task.input_key, group_field="matrix_id")


def test_tf_class_one_site_per_matrix_splits_as_before(tf):
    """With one site per matrix, every block is one example: the split is the per-example one."""
    task, splits = tf
    rule = split_rule(validate_config({"task": {"name": "tf_class/jaspar"}, "stages": [{"kind": "sft"}]}), task)
    assert rule.group_field == "matrix_id"
    every = [e for n in SPLIT_NAMES for e in splits[n]]
    assert cut_splits(every, dataclasses.replace(rule, group_field=None)).fingerprints() == splits.fingerprints()


def test_tf_class_rationale_names_training_markers_found_in_the_site(tf):
    task, splits = tf
    assert set(task.markers) == set(task.labels)
    for example in splits.train[:100]:
        reason = task.reasoning(example)
        if reason.startswith("The site contains"):
            named = reason.split("contains ")[1].split(":")[0].split(", ")
            markers = set(task.markers[example.answer])
            assert all(k in example.dna and (k in markers or reverse_complement(k) in markers) for k in named)
    # statistics come from the training split only: other training examples, other markers
    refit = get_task("tf_class/jaspar")
    refit.fit(list(splits.train[: len(splits.train) // 3]))
    assert refit.markers != task.markers


def test_tf_class_prompt_and_input(tf):
    task, splits = tf
    example = splits.id_test[0]
    assert example.dna in task.user_prompt(example) and all(label in task.user_prompt(example) for label in task.labels)
    assert_prompt_shows_placeholder(task, example, "dna")
    assert task.example_from_input({"id": "s", "sequence": "acgtac"}, "x").dna == "ACGTAC"
    with pytest.raises(ValueError, match="A, C, G, T"):
        task.example_from_input({"sequence": "ACGU"}, "x:1")


def test_tasks_command_lists_genomics_tasks(capsys, tf):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out.splitlines()
    line = lambda name: next(line for line in out if line.startswith(name))  # noqa: E731
    for name in ("kegg/disease", "variant_effect/coding", "variant_effect/non_snv"):
        assert "needs task.options: source" in line(name)
    assert all(f"{k}={v}" in line("tf_class/jaspar") for k, v in tf[1].sizes().items())
    assert "plants" in line("tf_class/jaspar")


def test_tf_class_spaced_sites_and_rationales(tf):
    task, splits = tf
    spaced = get_task("tf_class/jaspar", {"spaced": True})
    spaced.labels, spaced.markers = task.labels, task.markers
    example = next(e for e in splits.train if task.reasoning(e).startswith("The site contains"))
    assert " ".join(example.dna) in spaced.user_prompt(example)
    kmer = task.reasoning(example).split("contains ")[1].split(",")[0].split(":")[0]
    assert " ".join(kmer) in spaced.reasoning(example)


def test_variant_records_with_identical_inputs_are_kept_once(tmp_path, capsys):
    rows = coding_rows(n=8)
    copy = dict(rows[0], ID="copy", answer="Pathogenic; another disease text")
    task = get_task("variant_effect/coding", {"source": str(write(rows + [copy], tmp_path / "dup.jsonl"))})
    examples = task.load()
    assert len(examples) == 8 and task.dropped_duplicates == 1 and "copy" not in {e.id for e in examples}
    assert "dropped 1 records" in capsys.readouterr().out
