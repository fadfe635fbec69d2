"""Supervised fine-tuning: loss on assistant tokens only, end-of-turn included so the model learns to stop.

Built on transformers' ``Trainer``: it already owns what we would otherwise rewrite and get wrong
(gradient accumulation, schedules, mixed precision, multi-GPU through accelerate, and exact resume of
model, optimizer, scheduler, RNG and data position). TRL's SFTTrainer adds dataset formatting we do not
need, because our tokenization (prompt rendered once, target appended) is what the evaluator sees too.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from biopost.models.adapters import prepare_for_training
from biopost.models.policy import load_policy
from biopost.stages.context import StageContext, plan_steps

IGNORE = -100


def run_sft(ctx: StageContext):
    stage = ctx.stage
    # ---- setup: model, data, schedule
    policy = load_policy(ctx.init_path, ctx.config.model.dtype)
    policy = prepare_for_training(policy, stage.resolved_lora(ctx.config.model), ctx.stage_dir, mode="new")
    train = sample_fraction(list(ctx.splits.train), stage.data_fraction, stage.seed)
    ctx.task_state["sft_train_examples"] = len(train)
    dataset = [tokenize_example(policy, ctx.task, e, stage.max_length) for e in train]
    total, per_epoch, every = plan_steps(stage, len(dataset))
    args = training_arguments(ctx, total, every)
    callback = EvalCallback(ctx, policy, every, total, per_epoch)
    trainer = Trainer(
        model=policy.model, args=args, train_dataset=dataset,
        data_collator=lambda rows: collate(rows, policy.tokenizer.pad_token_id), callbacks=[callback],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress)  # progress bar without a printed dict per step
    # ---- loop (resumes from the last trainer checkpoint if a previous attempt was interrupted)
    resume = last_checkpoint(ctx.stage_dir / "trainer")
    ctx.resume_from(int(resume.name.split("-")[1]) if resume else -1)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # ---- save
    final = policy.save(ctx.stage_dir / "final", ctx.task_state)
    shutil.rmtree(ctx.stage_dir / "trainer", ignore_errors=True)
    return final


def last_checkpoint(trainer_dir):
    found = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def sample_fraction(examples: list, fraction: float, seed: int) -> list:
    """A seeded subset of the training split (the 'SFT data fraction' axis)."""
    if fraction >= 1.0:
        return examples
    n = max(1, round(fraction * len(examples)))
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False))
    return [examples[i] for i in keep]


def tokenize_example(policy, task, example, max_length: int) -> dict:
    """Prompt tokens are masked out of the loss; target tokens and the end-of-turn token are learned."""
    tok = policy.tokenizer
    prompt = tok(policy.render_prompt(task.messages(example)), add_special_tokens=False)["input_ids"]
    target = tok(task.target(example), add_special_tokens=False)["input_ids"] + [policy.end_of_turn_id]
    ids = (prompt + target)[:max_length]
    labels = ([IGNORE] * len(prompt) + target)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(rows: list[dict], pad_id: int) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def training_arguments(ctx: StageContext, total: int, every: int) -> TrainingArguments:
    stage = ctx.stage
    sched = stage.schedule
    kwargs = {}
    if sched.name == "warmup_stable_decay":
        kwargs = {"num_decay_steps": max(1, round(sched.decay_ratio * total))}
    return TrainingArguments(
        output_dir=str(ctx.stage_dir / "trainer"),
        per_device_train_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        learning_rate=stage.lr,
        weight_decay=stage.weight_decay,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(sched.name, sched.name),
        lr_scheduler_kwargs=kwargs,
        warmup_steps=round(sched.warmup_ratio * total),
        max_steps=total,
        max_grad_norm=stage.max_grad_norm,
        logging_steps=1,
        save_strategy="steps",
        save_steps=stage.save_every_steps or every,
        save_total_limit=1,
        report_to="none",
        seed=stage.seed,
        data_seed=stage.seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=ctx.config.model.dtype == "bfloat16",
        fp16=ctx.config.model.dtype == "float16",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


class EvalCallback(TrainerCallback):
    """Evaluate at step 0, every ``every`` steps and at the end; log training loss as data."""

    def __init__(self, ctx: StageContext, policy, every: int, total: int, per_epoch: int):
        self.ctx, self.policy, self.every, self.total, self.per_epoch = ctx, policy, every, total, per_epoch

    def _evaluate(self, step: int) -> None:
        self.ctx.evaluate_and_save(self.policy, step, epoch=round(step / self.per_epoch, 4))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and self.ctx.stage.eval_at_start:
            self._evaluate(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == self.total:
            self._evaluate(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.ctx.log.write([{"stage": self.ctx.name, "stage_index": self.ctx.index, "step": state.global_step,
                                 "epoch": round(state.global_step / self.per_epoch, 4), "split": "train",
                                 "metric": "loss", "value": float(logs["loss"]), "n": None}])


class QuietProgress(ProgressCallback):
    """The usual progress bar; the loss goes to metrics.jsonl instead of the terminal."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
