"""The shared evaluator's scoring on hand-written completions, seeded subsets and bootstrap intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from biopost.config import EvalConfig
from biopost.data import Example
from biopost.evaluation import bootstrap_ci, evaluate, score_split, subset
from biopost.models.policy import load_policy


def cell(id_: str, answer: str) -> Example:
    return Example(id=id_, fields={"organism": "Homo sapiens", "genes": ["X"]}, answer=answer)


def think(answer: str) -> str:
    return f"<think>\nmarkers\n</think>\n\nAnswer: {answer}"


EXAMPLES = [cell("b", "CD19+ B"), cell("dc", "Dendritic")]


def test_greedy_scores_per_example(pbmc_task):
    records, per_metric = score_split(pbmc_task, EXAMPLES, [[think("CD19+ B")], ["Answer: CD19+ B"]])
    assert per_metric["accuracy"].tolist() == [1.0, 0.0]
    assert per_metric["accuracy_strict"].tolist() == [1.0, 0.0]
    assert per_metric["format"].tolist() == [1.0, 0.0]
    assert not any("pass@" in m for m in per_metric)
    assert [r["id"] for r in records] == ["b", "dc"]
    assert records[1]["parsed"] == [{"strict": None, "lenient": "CD19+ B"}]


def test_k_samples_give_mean_and_pass_at_k(pbmc_task):
    completions = [
        [think("CD19+ B"), "Answer: CD19+ B", think("Dendritic")],  # 2 of 3 right, 1 strictly
        [think("CD19+ B"), think("Dendritic or CD19+ B"), ""],  # none right
    ]
    records, per_metric = score_split(pbmc_task, EXAMPLES, completions)
    assert per_metric["accuracy"] == pytest.approx([2 / 3, 0.0])
    assert per_metric["accuracy_strict"] == pytest.approx([1 / 3, 0.0])
    assert per_metric["format"] == pytest.approx([2 / 3, 2 / 3])
    assert per_metric["accuracy_pass@3"].tolist() == [1.0, 0.0]
    assert records[0]["mean"]["accuracy"] == pytest.approx(2 / 3)
    assert len(records[0]["completions"]) == len(records[0]["scores"]) == 3


def test_subset_is_seeded_and_order_stable():
    items = list(range(100))
    chosen = subset(items, 10, seed=0)
    assert chosen == subset(items, 10, seed=0) == sorted(chosen)
    assert len(chosen) == 10 and chosen != subset(items, 10, seed=1)
    assert subset(items, None, seed=0) == items and subset(items[:5], 10, seed=0) == items[:5]


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0] * 3)
    lo, hi = bootstrap_ci(values, 500, seed=0)
    assert lo < values.mean() < hi and 0.0 <= lo and hi <= 1.0
    assert bootstrap_ci(values, 500, seed=0) == (lo, hi)
    assert bootstrap_ci(values, 500, seed=1) != (lo, hi)


def test_no_interval_without_resamples_or_from_one_example():
    assert bootstrap_ci(np.array([0.0, 1.0]), 0, seed=0) == (None, None)
    assert bootstrap_ci(np.array([1.0]), 100, seed=0) == (None, None)  # not the zero-width [1, 1] resampling gives
    assert bootstrap_ci(np.array([1.0, 1.0]), 100, seed=0) == (1.0, 1.0)


def test_one_example_evaluated_gives_rows_without_an_interval_and_valid_json(tiny_backbone, pbmc_task, pbmc_splits):
    """``eval.max_examples: 1``: the value and n=1, the interval empty (JSON null), never NaN."""
    policy = load_policy(tiny_backbone)
    example = pbmc_splits.val[0]
    policy.generate = lambda *args, **kwargs: torch.tensor([policy.tokenizer(f"Answer: {example.answer}",
                                                                             add_special_tokens=False)["input_ids"]])
    cfg = EvalConfig(max_examples=1, batch_size=1, max_new_tokens=4, bootstrap=50)
    rows, _ = evaluate(policy, pbmc_task, {"val": list(pbmc_splits.val)}, cfg)
    accuracy = next(r for r in rows if r["metric"] == "accuracy")
    assert (accuracy["n"], accuracy["ci_low"], accuracy["ci_high"]) == (1, None, None)
    json.dumps(rows, allow_nan=False)  # metrics.jsonl stays JSON: no NaN in any row


@pytest.mark.parametrize("num_samples", [1, 3])
def test_evaluation_leaves_the_callers_rng_alone(tiny_backbone, pbmc_task, pbmc_splits, num_samples, one_thread):
    """Rule 9: evaluating never resets the global RNG, and sampled evaluation is the same whatever came before."""
    policy = load_policy(tiny_backbone)
    task_splits = {"val": list(pbmc_splits.val[:2])}
    cfg = EvalConfig(max_new_tokens=4, num_samples=num_samples, batch_size=2, bootstrap=0, seed=0)
    completions = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        _, records = evaluate(policy, pbmc_task, task_splits, cfg)
        assert torch.equal(torch.get_rng_state(), before)
        completions.append([r["completions"] for r in records["val"]])
    assert completions[0] == completions[1]


def test_completion_tokens_count_generated_ids_through_end_of_turn(tiny_backbone, pbmc_task, pbmc_splits):
    """The generated ids, end-of-turn included (RL's completion mask), not a re-tokenisation of the text."""
    policy = load_policy(tiny_backbone)
    tok, eot = policy.tokenizer, policy.end_of_turn_id
    letters = tok.convert_tokens_to_ids(list("Answer"))  # one id per letter: re-tokenising the text merges them
    assert len(tok("Answer", add_special_tokens=False)["input_ids"]) < len(letters)
    stopped = letters + [eot] + [tok.pad_token_id] * 2  # 6 letters + end-of-turn = 7 tokens
    running = letters + letters[:3]  # hit max_new_tokens without end-of-turn: 9 tokens
    policy.generate = lambda *args, **kwargs: torch.tensor([stopped, running])
    rows, _ = evaluate(policy, pbmc_task, {"val": list(pbmc_splits.val[:2])}, EvalConfig(batch_size=2, bootstrap=0))
    assert [r["value"] for r in rows if r["metric"] == "completion_tokens"] == [(7 + 9) / 2]
