"""Continued pre-training: causal-LM loss on packed documents, held-out perplexity at every eval point.

Packing: documents are tokenized, each ends with the end-of-turn/EOS token, and the stream is cut into
blocks of ``seq_length``. Attention inside a block may see the previous document (as in standard packed
pre-training), but the loss never crosses a boundary: the first token of every document is not a target,
so no term predicts one document from another (tests/test_cpt.py checks this).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from biopost.data.corpus import load_corpus
from biopost.models.adapters import prepare_for_training
from biopost.stages.context import StageContext, plan_steps
from biopost.stages.trainer import IGNORE, collate, train_with_trainer


def run_cpt(ctx: StageContext):
    stage = ctx.stage
    # ---- setup: corpus window, model, packed blocks
    corpus = load_corpus(stage.corpus, ctx.task, ctx.splits)
    if ctx.forgetting is not None:
        ctx.forgetting.check_not_trained_on(corpus.train)
    policy = ctx.load_policy(ctx.init_path)
    policy = prepare_for_training(policy, stage.resolved_lora(ctx.config.model), ctx.stage_dir,
                                  source=ctx.init_path, freeze_projector=stage.freeze_projector)
    eos = policy.tokenizer.eos_token_id
    train = pack(tokenize_documents(policy.tokenizer, corpus.train, eos), stage.seq_length, eos)
    heldout = pack(tokenize_documents(policy.tokenizer, corpus.heldout, eos), stage.seq_length, eos)
    ctx.task_state["cpt_documents"] = len(corpus.train)
    total, per_epoch, every = plan_steps(stage, len(train))

    def evaluate(step: int, epoch: float) -> None:
        where = {"stage": ctx.name, "stage_index": ctx.index, "step": step, "epoch": epoch}
        loss = heldout_loss(policy, heldout, stage.eval_batch_size)
        ctx.log.write([{**where, **row} for row in perplexity_rows("heldout", *loss)])
        # A forgetting corpus that is this held-out window, packed alike, reuses the loss instead of a second pass.
        ctx.evaluate_and_save(policy, step, epoch, score_task=stage.eval_task,
                              known_losses={(tuple(corpus.heldout), stage.seq_length): loss})

    # ---- loop
    train_with_trainer(ctx, policy, train, total, every, per_epoch, evaluate)
    # ---- save
    return ctx.save_final(policy, scratch="trainer")


def tokenize_documents(tokenizer, docs: list[str], eos: int) -> list[list[int]]:
    return [ids + [eos] for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]


def pack(docs: list[list[int]], seq_length: int, eos: int) -> list[dict]:
    """Concatenate documents into blocks of ``seq_length``; a document's first token is never a target.

    >>> blocks = pack([[5, 6, 0], [7, 8, 0]], seq_length=4, eos=0)
    >>> [b["input_ids"] for b in blocks], [b["labels"] for b in blocks]
    ([[5, 6, 0, 7], [8, 0]], [[-100, 6, 0, -100], [8, 0]])
    """
    stream, starts = [], []
    for doc in docs:
        starts.append(len(stream))
        stream += doc
    first = set(starts)
    blocks = []
    for begin in range(0, len(stream), seq_length):
        ids = stream[begin : begin + seq_length]
        labels = [IGNORE if begin + i in first else t for i, t in enumerate(ids)]
        if len(ids) > 1:
            blocks.append({"input_ids": ids, "labels": labels})
    return blocks


def perplexity_rows(split: str, loss: float, tokens: int) -> list[dict]:
    """The ``loss`` and ``perplexity`` rows of one held-out evaluation (``n`` = target tokens)."""
    where = {"split": split, "n": tokens}
    return [{**where, "metric": "loss", "value": loss}, {**where, "metric": "perplexity", "value": math.exp(loss)}]


@torch.no_grad()
def heldout_loss(policy, blocks: list[dict], batch_size: int) -> tuple[float, int]:
    """Mean next-token loss over all target tokens of the held-out blocks (perplexity = exp of it)."""
    was_training = policy.model.training
    policy.model.eval()
    total, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc="heldout perplexity", leave=False):
        batch = collate(blocks[start : start + batch_size], policy.tokenizer.pad_token_id)
        batch = {k: v.to(policy.device) for k, v in batch.items()}
        logits = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                ignore_index=IGNORE, reduction="sum")
        total += float(nll)
        count += int((targets != IGNORE).sum())
    policy.model.train(was_training)
    return total / max(count, 1), count
