"""The embedded antimicrobial-peptide task: deduplicated real sequences, a negatives shift as OOD."""

from __future__ import annotations

from collections import Counter

import pytest

from biopost.config import validate_config
from biopost.pipeline import load_task_and_splits
from biopost.tasks.proteins.amp import AMP, INACTIVE
from conftest import assert_prompt_shows_placeholder


@pytest.fixture(scope="module")
def amp():
    return load_task_and_splits(validate_config({"task": {"name": "amp/modlamp"}, "stages": [{"kind": "sft"}]}))


def test_sequences_are_unique_and_ood_holds_the_transmembrane_negatives(amp):
    from modlamp.datasets import load_AMPvsTM

    _, splits = amp
    everything = [e for name in ("train", "val", "id_test", "ood_test") for e in splits[name]]
    assert len({e.protein for e in everything}) == len(everything)
    tm = load_AMPvsTM()
    tm_sequences = set(map(str, tm.sequences))
    assert {e.protein for e in splits.ood_test} == tm_sequences  # AMPs shared with the UniProt set stay here
    assert not tm_sequences & {e.protein for n in ("train", "val", "id_test") for e in splits[n]}
    assert Counter(e.answer for e in splits.ood_test) == {AMP: 206, INACTIVE: 206}
    assert {e.meta["negatives"] for e in splits.train} == {"uniprot"}
    assert 0.4 < Counter(e.answer for e in splits.train)[AMP] / len(splits.train) < 0.6


def test_rationale_comes_from_training_statistics(amp):
    task, splits = amp
    example = splits.id_test[0]
    before = task.reasoning(example)
    assert before.startswith("Net charge") and "training medians" in before
    medians = dict(task.medians)
    try:
        task.fit([e for e in splits.train if e.answer == AMP][:50]
                 + [e for e in splits.train if e.answer == INACTIVE][:50])
        assert task.medians != medians and task.reasoning(example) != before
    finally:
        task.fit(splits.train)
    assert task.target(example).endswith(f"Answer: {example.answer}")


def test_prompt_text_or_encoder_placeholder_and_scoring(amp):
    task, splits = amp
    example = splits.train[0]
    assert example.protein in task.user_prompt(example)
    assert_prompt_shows_placeholder(task, example, "protein")
    right, wrong = (example.answer, INACTIVE if example.answer == AMP else AMP)
    assert task.score(f"<think>\n</think>\n\nAnswer: {right}", example)["accuracy"] == 1.0
    assert task.score(f"<think>\n</think>\n\nAnswer: {wrong}", example)["accuracy"] == 0.0
    assert task.score(f"Answer: {AMP} or {INACTIVE}", example)["accuracy"] == 0.0
    user = task.example_from_input({"id": "x", "sequence": " glfdivkkvv "}, "in:1")
    assert user.protein == "GLFDIVKKVV" and "GLFDIVKKVV" in task.user_prompt(user)
    with pytest.raises(ValueError, match="needs 'sequence'"):
        task.example_from_input({"id": "x"}, "in:2")


@pytest.mark.parametrize("negated", ["non-antimicrobial", "Non antimicrobial", "not an antimicrobial peptide",
                                     "unlikely to be antimicrobial"])
def test_a_negated_answer_is_no_answer(amp, negated):
    task, splits = amp
    positive = next(e for e in splits.id_test if e.answer == AMP)
    negative = next(e for e in splits.id_test if e.answer == INACTIVE)
    completion = f"<think>\nweakly cationic\n</think>\n\nAnswer: {negated}"
    assert task.prediction(completion) == {"strict": None, "lenient": None}
    assert task.score(completion, positive)["accuracy"] == task.score(completion, negative)["accuracy"] == 0.0
    assert task.reward([completion], [positive]) == [0.0]
    assert AMP not in INACTIVE and INACTIVE not in AMP  # no label can be read inside the other


@pytest.mark.slow  # the full-split k-mer baseline (~45 s on 2 cores)
def test_docstring_and_demo_config_state_the_biopost_baseline(tmp_path):
    import re
    from pathlib import Path

    from biopost.baselines import run_baseline
    from biopost.config import load_config
    from biopost.tasks.proteins import amp as amp_module

    config_path = Path(__file__).parents[1] / "configs" / "demo" / "protein-text-tiny.yaml"
    rows = run_baseline(load_config(config_path, ["eval.max_examples=null"]), tmp_path)
    acc = {r["split"]: r for r in rows if r["metric"] == "accuracy"}
    doc = " ".join(amp_module.__doc__.split())
    for split in ("val", "id_test", "ood_test"):
        assert re.search(rf"{acc[split]['value']:.3f} \(({split}, )?n = {acc[split]['n']}\)", doc), split
    comment = config_path.read_text()
    assert f"ID {acc['id_test']['value']:.3f}".replace("0.", ".") in comment
    assert f"OOD {acc['ood_test']['value']:.3f}".replace("0.", ".") in comment
