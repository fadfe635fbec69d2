"""The cell-type task's parser, scorer and reward on awkward completions."""

from __future__ import annotations

import time

import pytest

from biopost.data import Example
from biopost.tasks.parsing import match_label

B_CELL = Example(id="cell", fields={"organism": "Homo sapiens", "genes": ["MS4A1", "CD79A"]}, answer="CD19+ B")
GOOD = "<think>\nMS4A1 and CD79A are high.\n</think>\n\nAnswer: CD19+ B"


def scores(task, completion: str) -> tuple[float, float, float]:
    s = task.score(completion, B_CELL)
    return s["accuracy"], s["accuracy_strict"], s["format"]


def test_well_formed_correct_answer_scores_everywhere(pbmc_task):
    assert scores(pbmc_task, GOOD) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("completion", [
    "",
    "<think>\nB cell.\n</think>\n\nAnswer: Dendritic, CD19+ B",
    "<think>\nB cell.\n</think>\n\nAnswer: Dendritic or CD14+ Monocyte",
    "<think>\nB cell.\n</think>\n\nAnswer: CD19+ B or Dendritic",
    "<think>\nB cell.\n</think>\n\nCD19+ B",  # no Answer: line
    "<think>\nB cell.\n</think>\n\nAnswer: CD19+ B\nAnswer: CD19+ B",  # repeated
    "<think>\nB cell.\n</think>\n\nAnswer: CD14+ Monocyte",  # wrong
    "<think>\nB cell.\n</think>\n\nAnswer:",  # empty answer
])
def test_no_single_correct_answer_gets_no_credit(pbmc_task, completion):
    accuracy, strict, _ = scores(pbmc_task, completion)
    assert accuracy == 0.0 and strict == 0.0


def test_missing_think_tags_fail_strict_but_lenient_can_score(pbmc_task):
    assert scores(pbmc_task, "Answer: CD19+ B") == (1.0, 0.0, 0.0)
    assert scores(pbmc_task, "<think>\nB cell.\n\nAnswer: CD19+ B") == (1.0, 0.0, 0.0)  # unclosed
    assert scores(pbmc_task, "The markers say so.\nAnswer: a CD19+ B cell") == (1.0, 0.0, 0.0)


def test_text_after_the_answer_line_fails_both_modes(pbmc_task):
    """Lenient mode cannot tell a courtesy line from a further answer: any later non-blank line scores 0."""
    assert scores(pbmc_task, GOOD + "\nI hope this helps.") == (0.0, 0.0, 0.0)
    assert scores(pbmc_task, GOOD + "\n\n  \n") == (1.0, 1.0, 1.0)  # trailing blank lines are fine


@pytest.mark.parametrize("answer", [
    "CD19+ B cell", "CD19+ B cells", "a CD19+ B cell.", "The CD19+ B-cell", "cd19+ b cell type", '"CD19+ B cells"',
    "(CD19+ B)", "CD19+ B;", "*CD19+ B cell*",
])
def test_lenient_forgives_form(pbmc_task, answer):
    assert scores(pbmc_task, f"<think>\nB.\n</think>\n\nAnswer: {answer}")[0] == 1.0
    assert scores(pbmc_task, f"Answer: {answer}")[0] == 1.0  # without a think block too


MEMORY_T = Example(id="memory", fields={}, answer="CD4+/CD45RO+ Memory")
MONOCYTE = Example(id="monocyte", fields={}, answer="CD14+ Monocyte")


@pytest.mark.parametrize("example, answer", [
    (MEMORY_T, "CD4+/CD25 T Regulatory or CD4+/CD45RO+ Memory T"),  # an alternative (once credited as Memory)
    (MEMORY_T, "CD4+/CD45RO+ Memory or CD4+/CD25 T Reg"),
    (MONOCYTE, "not CD14+ Monocyte"),  # a negation of the right label
    (MONOCYTE, "not a CD14+ Monocyte cell"),
    (B_CELL, "CD19+ B\nor maybe Dendritic"),  # a further answer on a later line
    (B_CELL, "CD19+ B\nAlternatively: Dendritic"),
    (B_CELL, "probably CD19+ B"),  # a qualifier
    (B_CELL, "it is a CD19+ B cell"),  # words beyond articles and "cell(s)"/"type"
    (B_CELL, "CD19+ B / Dendritic"),
    (B_CELL, "CD19+"),  # a part of the label is not the label
])
def test_lenient_never_credits_extra_content(pbmc_task, example, answer):
    for completion in (f"<think>\nx\n</think>\n\nAnswer: {answer}", f"Answer: {answer}"):
        assert pbmc_task.score(completion, example)["accuracy"] == 0.0, completion
        assert pbmc_task.prediction(completion)["lenient"] is None


def test_multi_line_reasoning_in_strict_mode(pbmc_task):
    completion = "<think>\nline one\n\nline two: MS4A1\n  line three\n</think>\nAnswer: CD19+ B"
    assert pbmc_task.parse(completion, "strict") == "CD19+ B"
    assert scores(pbmc_task, completion) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("answer", ["cd19+ b", "  CD19+   B. ", "CD19+ B.", '"CD19+ B"', "**CD19+ B**"])
def test_case_whitespace_quotes_and_period_are_normalised(pbmc_task, answer):
    assert scores(pbmc_task, f"<think>\nB.\n</think>\n\nAnswer: {answer}") == (1.0, 1.0, 1.0)


def test_huge_completion_is_parsed_quickly_and_correctly(pbmc_task):
    reasoning = ("MS4A1 CD79A are B-cell markers; " * 7000)[:200_000]
    start = time.perf_counter()
    assert scores(pbmc_task, f"<think>\n{reasoning}\n</think>\n\nAnswer: CD19+ B") == (1.0, 1.0, 1.0)
    assert scores(pbmc_task, f"<think>\n{reasoning}\n</think>\n\nAnswer: Dendritic") == (0.0, 0.0, 1.0)
    assert time.perf_counter() - start < 2.0


def test_long_blank_runs_do_not_make_the_strict_parser_quadratic(pbmc_task):
    start = time.perf_counter()
    assert pbmc_task.parse("<think>x</think>\nAnswer: CD19+ B" + " " * 100_000 + "x", "strict") is not None
    assert pbmc_task.parse("<think>x</think>\nAnswer: CD19+ B" + " " * 100_000 + "\nx", "strict") is None
    assert pbmc_task.parse("<think>x</think>\nAnswer:" + " \t" * 50_000 + "\nx", "strict") is None
    assert time.perf_counter() - start < 1.0


def test_reward_is_the_scorers_accuracy(pbmc_task):
    completions = [GOOD, "Answer: CD19+ B", "<think></think>Answer: Dendritic, CD19+ B", "", GOOD + "\nAnswer: x"]
    examples = [B_CELL] * len(completions)
    rewards = pbmc_task.reward(completions, examples)
    assert rewards == [pbmc_task.score(c, e)["accuracy"] for c, e in zip(completions, examples)]
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_unknown_parse_mode_is_an_error(pbmc_task):
    with pytest.raises(ValueError, match="strict"):
        pbmc_task.parse(GOOD, "fuzzy")


@pytest.mark.parametrize("answer", ["non-antimicrobial", "Non antimicrobial", "not an antimicrobial peptide",
                                    "unlikely to be antimicrobial", "it isn't antimicrobial"])
def test_a_label_after_a_negation_is_no_answer(answer):
    labels = ["antimicrobial", "inactive"]
    assert match_label(answer, labels, "lenient") is None
    assert match_label("The antimicrobial.", labels, "lenient") == "antimicrobial"
    assert match_label("not antimicrobial", ["antimicrobial", "not antimicrobial"], "lenient") == "not antimicrobial"
