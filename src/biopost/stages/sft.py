"""Supervised fine-tuning: loss on assistant tokens only, end-of-turn included so the model learns to stop.

Built on transformers' ``Trainer`` (see stages/trainer.py for why). TRL's SFTTrainer adds dataset
formatting we do not need: our tokenization (prompt rendered once, target appended) is exactly what the
evaluator and the RL stage see.
"""

from __future__ import annotations

import sys

import numpy as np

from biopost import distributed
from biopost.evaluation import collate_payloads
from biopost.mixture import item_shares, mixed_train
from biopost.models.adapters import prepare_for_training
from biopost.stages.context import StageContext, plan_steps
from biopost.stages.trainer import IGNORE, train_with_trainer


def run_sft(ctx: StageContext):
    stage = ctx.stage
    # ---- setup: model, data, schedule
    policy = ctx.load_policy(ctx.init_path)
    policy = prepare_for_training(policy, stage.resolved_lora(ctx.config.model), ctx.stage_dir,
                                  source=ctx.init_path, freeze_projector=stage.freeze_projector)
    train = sample_fraction(list(ctx.splits.train), stage.data_fraction, stage.seed)
    items = mixed_train(ctx.task, train, stage, ctx.mixed)  # the run's task, plus the tasks mixed in by weight
    ctx.task_state["sft_train_examples"] = len(items)
    ctx.task_state["train_items"] = item_shares(items)
    dataset = [tokenize_example(policy, item.task, item.example, stage.max_length) for item in items]
    report_cut_answers(ctx, dataset, policy.end_of_turn_id)
    total, per_epoch, every = plan_steps(stage, len(dataset))
    # ---- loop: evaluate with the shared evaluator on schedule (resumes if interrupted)
    train_with_trainer(ctx, policy, dataset, total, every, per_epoch,
                       evaluate=lambda step, epoch: ctx.evaluate_and_save(policy, step, epoch))
    # ---- save
    return ctx.save_final(policy, scratch="trainer")


def report_cut_answers(ctx: StageContext, dataset: list[dict], end_of_turn_id: int) -> None:
    """Say how many answers ``max_length`` cut: such a row still trains, on an answer without its end-of-turn
    token (a model trained on many learns not to stop)."""
    cut = sum(row["labels"][-1] != end_of_turn_id for row in dataset)
    if cut and distributed.is_main():
        print(f"stages.{ctx.index} ({ctx.name}): {cut} of {len(dataset)} training answers are cut at "
              f"max_length={ctx.stage.max_length} and lose their end-of-turn token; raise max_length to keep them "
              f"whole", file=sys.stderr)


def sample_fraction(examples: list, fraction: float, seed: int) -> list:
    """The first ``fraction`` of one seeded order of the training split (the 'data fraction' axis).

    Fractions are nested: for one seed a smaller subset lies inside every larger one, so a data-scaling
    axis compares amounts of the same examples. Kept in split order.

    >>> small, large = (sample_fraction(list(range(100)), f, seed=0) for f in (0.3, 0.5))
    >>> len(small), len(large), set(small) <= set(large), small == sorted(small)
    (30, 50, True, True)
    """
    if fraction >= 1.0:
        return examples
    n = max(1, round(fraction * len(examples)))
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
    return [examples[i] for i in keep]


def tokenize_example(policy, task, example, max_length: int) -> dict:
    """Prompt tokens are masked out of the loss; target tokens and the end-of-turn token are learned.

    A fused model's rows carry the payloads its encoders read. Truncation cuts the answer's end only: an example
    whose prompt alone fills ``max_length`` is an error, not a row that teaches nothing.
    """
    payloads = collate_payloads([example], policy.modalities)
    prompt = policy.tokenize([policy.render_prompt(task.messages(example))], payloads)[0]
    target = policy.tokenize([task.target(example)])[0] + [policy.end_of_turn_id]
    if len(prompt) >= max_length:  # nothing left to learn from it; a fused row would also lose encoder positions
        fix = " or lower the encoder's num_tokens" if payloads else ""
        raise ValueError(f"example {example.id}: its prompt has {len(prompt)} tokens, so max_length={max_length} leaves "
                         f"no answer token to learn; raise the stage's max_length{fix}")
    ids = (prompt + target)[:max_length]
    labels = ([IGNORE] * len(prompt) + target)[:max_length]
    if not payloads:
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": labels, "payloads": {m: v[0] for m, v in payloads.items()}}
