"""transformers ``Trainer`` plumbing shared by the SFT and CPT stages.

The Trainer owns gradient accumulation, schedules, mixed precision, multi-GPU through accelerate, and exact
resume (model, optimizer, scheduler, RNG, data position); we add evaluation on our schedule and log rows.
Each checkpoint the Trainer saves gets a checksum manifest once complete; resuming takes the newest one whose
files match it (the two newest are kept), so a checkpoint cut short by a kill or damaged later is skipped.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import torch
from accelerate.data_loader import BatchSamplerShard
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from biopost import distributed, durable
from biopost.stages.context import StageContext, schedule_settings

IGNORE = -100


def train_with_trainer(ctx: StageContext, policy, dataset: list[dict], total: int, every: int, per_epoch: int,
                       evaluate) -> None:
    """Run the Trainer over ``dataset`` calling ``evaluate(step, epoch)`` at 0, every ``every`` steps and the end."""
    trainer, callback = stage_trainer(ctx, policy, dataset, total, every, per_epoch, evaluate)
    resume = distributed.on_main(lambda: last_checkpoint(ctx.stage_dir / "trainer"))  # sets damaged ones aside
    done = int(resume.name.split("-")[1]) if resume else -1
    ctx.resume_from(done)
    if resume and policy.projector_parameters():
        policy.load_projector(resume)
    if done >= total:  # nothing left to train, and the Trainer would take one more step: just load the weights
        trainer._load_from_checkpoint(str(resume))  # the Trainer's own loader (adapters, shards)
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if total not in ctx.evaluated:  # a run resumed at its last step (e.g. branched off a longer one)
        callback.evaluate_at(total)


def stage_trainer(ctx: StageContext, policy, dataset: list[dict], total: int, every: int, per_epoch: int,
                  evaluate) -> tuple["PolicyTrainer", "EvalCallback"]:
    """The stage's Trainer with all its callbacks, not started (benchmarks/run_all.py times this very object)."""
    args = training_arguments(ctx, total, every)
    callback = EvalCallback(ctx, evaluate, every, total, per_epoch)
    callbacks = [callback]
    if policy.projector_parameters():
        callbacks.append(ProjectorCallback(policy))
    callbacks.append(NoPickledArguments())
    callbacks.append(ManifestCallback())  # after every callback that writes into (or deletes from) a checkpoint
    callbacks.append(SettleCallback(ctx))  # once the checkpoint is sealed, a resume keeps the rows up to it
    callbacks.append(SnapshotCallback(ctx))  # last: copies checkpoints once they are complete
    trainer = PolicyTrainer(policy, model=policy.model, args=args, train_dataset=TrainRows(dataset),
                            data_collator=lambda rows: collate(rows, policy.tokenizer.pad_token_id), callbacks=callbacks)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress)  # progress bar without a printed dict per step
    return trainer, callback


class PolicyTrainer(Trainer):
    """The Trainer on a Policy: rows with payloads go through ``Policy.embed`` (a fused model splices its
    encoder features in there), and the optimiser also updates the policy's projectors. Text-only policies
    train exactly as with the plain Trainer."""

    def __init__(self, policy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy
        self.flops_params = None

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate (6 x input tokens x non-embedding parameters) with the parameter count taken once:
        the Trainer counts them again every step by walking every module, milliseconds a step at small sizes."""
        if self.flops_params is None:
            self.flops_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self.flops_params

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """As the Trainer logs; a non-finite loss (a diverged step, or one with no label token: 0/0) also clears the
        Trainer's loss sum, which it resets by subtracting it from itself: NaN - NaN would log NaN for every later step."""
        if not math.isfinite(logs.get("loss", 0.0)):
            self._tr_loss.zero_()
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        payloads = inputs.pop("payloads", None)
        if payloads:
            inputs["inputs_embeds"] = self.policy.embed(inputs.pop("input_ids"), payloads)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def get_train_dataloader(self):
        """Under several processes, accelerate evens out an epoch's short last batch by repeating examples from the
        epoch's start (so that every process steps together); marked here, they carry no labels, so each step
        trains on the examples one process would (the loss is normalised by the global count of label tokens)."""
        loader = super().get_train_dataloader()
        if type(loader.batch_sampler) is BatchSamplerShard and not loader.batch_sampler.split_batches:
            loader.batch_sampler.__class__ = MarkedRepeats  # accelerate's own iteration, repeats marked
        return loader

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        extra = self.policy.projector_parameters()
        if extra and not any(p is extra[0] for group in optimizer.param_groups for p in group["params"]):
            optimizer.add_param_group({"params": extra, "weight_decay": self.args.weight_decay})
        return optimizer


class MarkedRepeats(BatchSamplerShard):
    """accelerate's shard of an epoch's batches (process ``p`` takes global batches ``p, p + N, ...``), with
    every index past the epoch's end, a repeat that evens out the last batch, given as ``-1 - index``."""

    def _iter_with_no_split(self):
        real = len(self.batch_sampler.sampler)
        for k, batch in enumerate(super()._iter_with_no_split()):
            start = (k * self.num_processes + self.process_index) * self.batch_size  # its place in the epoch
            yield [i if start + j < real else -1 - i for j, i in enumerate(batch)]


class TrainRows(torch.utils.data.Dataset):
    """The training rows; index ``-1 - i`` is row ``i`` without labels (a repeat that only fills a batch)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        if index >= 0:
            return self.rows[index]
        row = self.rows[-1 - index]
        return {**row, "labels": [IGNORE] * len(row["labels"])}


def last_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest complete, intact checkpoint; damaged or unfinished ones are reported and set aside."""
    found = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for checkpoint in found:
        problem = durable.check_manifest(checkpoint)
        if problem is None:
            return checkpoint
        aside = checkpoint.with_name(f"corrupt-{checkpoint.name}")
        shutil.rmtree(aside, ignore_errors=True)
        checkpoint.rename(aside)
        print(f"{checkpoint}: {problem}; moved to {aside.name}, resuming from an earlier checkpoint", file=sys.stderr)
    return None


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
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if "payloads" in rows[0]:  # a fused model's encoder inputs, per modality in row order
        batch["payloads"] = {m: [r["payloads"][m] for r in rows] for m in rows[0]["payloads"]}
    return batch


def training_arguments(ctx: StageContext, total: int, every: int) -> TrainingArguments:
    stage = ctx.stage
    scheduler, kwargs, warmup = schedule_settings(stage.schedule, total)
    return TrainingArguments(
        output_dir=str(ctx.stage_dir / "trainer"),
        # the config's batch is global: one config trains on the same examples per step under any number of processes
        per_device_train_batch_size=distributed.share_size(stage.batch_size, "batch_size"),
        gradient_accumulation_steps=stage.grad_accum,
        activation_checkpointing=ctx.config.model.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # works with frozen inputs (LoRA, projectors)
        learning_rate=stage.lr,
        weight_decay=stage.weight_decay,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=kwargs,
        warmup_steps=warmup,
        max_steps=total,
        max_grad_norm=stage.max_grad_norm,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a diverged step's loss is logged as it is (NaN), not as the running mean
        save_strategy="steps",
        save_steps=stage.save_every_steps or every,
        save_total_limit=2,  # the previous one is the fallback when the newest is found damaged
        report_to="none",  # rows reach trackers through RunLog alone (report_to in the run config), never twice
        seed=stage.seed,
        data_seed=stage.seed,
        remove_unused_columns=False,
        use_cpu=ctx.device == "cpu",
        bf16=ctx.dtype == "bfloat16",
        fp16=ctx.dtype == "float16",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


class EvalCallback(TrainerCallback):
    """Evaluate at step 0, every ``every`` steps and at the end; log training loss and learning rate as data."""

    def __init__(self, ctx: StageContext, evaluate, every: int, total: int, per_epoch: int):
        self.ctx, self.evaluate, self.every, self.total, self.per_epoch = ctx, evaluate, every, total, per_epoch

    def evaluate_at(self, step: int) -> None:
        self.evaluate(step, round(step / self.per_epoch, 4))  # through ctx.evaluate_and_save: marks the step

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and self.ctx.stage.eval_at_start:
            self.evaluate_at(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == self.total:
            self.evaluate_at(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            where = {"stage": self.ctx.name, "stage_index": self.ctx.index, "step": state.global_step,
                     "epoch": round(state.global_step / self.per_epoch, 4), "split": "train", "n": None}
            named = {"loss": "loss", "learning_rate": "lr"}  # RL's train rows name the learning rate lr too
            self.ctx.log.write([{**where, "metric": ours, "value": float(logs[theirs])}
                                for theirs, ours in named.items() if theirs in logs], sync=False)  # every step


class ProjectorCallback(TrainerCallback):
    """A fused policy's projectors beside the Trainer's own model: clipped like the LM's gradients and zeroed
    after each step (the Trainer does both for its model only), and saved in every resumable checkpoint."""

    def __init__(self, policy):
        self.policy = policy

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        distributed.reduce_gradients(self.policy.projector_parameters(), "mean")  # outside the module DDP wraps
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.policy.projector_parameters(), args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        for param in self.policy.projector_parameters():
            param.grad = None

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            self.policy.save_projector(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class ManifestCallback(TrainerCallback):
    """Seal each saved checkpoint with a checksum manifest (sizes and sha256): without one it is incomplete."""

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every process has written its part (its RNG state) of the checkpoint
        if args.should_save:
            durable.write_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class SettleCallback(TrainerCallback):
    """A sealed checkpoint is where a resume starts: the stage's rows up to it are settled (see RunLog.settle)."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    def on_save(self, args, state, control, **kwargs):
        self.ctx.log.settle(self.ctx.name, state.global_step)


class NoPickledArguments(TrainerCallback):
    """Delete the pickled ``TrainingArguments`` the Trainer writes into each checkpoint. Nothing reads it back
    (resume reads trainer_state.json), and it is the one file there that only an unsafe ``torch.load`` opens:
    what stays (optimizer, scheduler, RNG state) loads with ``weights_only=True``."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # the main process wrote it
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / TRAINING_ARGS_NAME).unlink(missing_ok=True)


class SnapshotCallback(TrainerCallback):
    """Save a Trainer checkpoint at each of ``ctx.snapshot_steps`` and keep a copy for runs branching there."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.ctx.snapshot_steps:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        if step in self.ctx.snapshot_steps:
            name = f"checkpoint-{step}"
            self.ctx.save_snapshot(step, self.ctx.stage_dir / "trainer" / name, f"trainer/{name}")


class QuietProgress(ProgressCallback):
    """The usual progress bar; the loss goes to metrics.jsonl instead of the terminal."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
