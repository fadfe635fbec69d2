"""Reinforcement learning with GRPO on the same Policy every other stage uses.

We own this loop (about a page) instead of TRL's GRPOTrainer because the rollouts and log-probabilities
must go through ``Policy.generate`` / ``Policy.logits``: fused encoder models plug in there, and TRL's
trainer only knows text and vision processors. The loss math lives in ``grpo.py`` and is checked against
TRL's on identical rollouts (tests/test_grpo_vs_trl.py).

Recipe per step: draw prompts -> sample G completions each -> score with the task's rewards -> group
advantages -> old and reference log-probs (no grad) -> ``mu`` clipped updates -> log -> evaluate on schedule.

Under a launcher each process rolls out and scores its contiguous share of the step's prompts (whole groups),
rewards are gathered so advantages and logged means are the whole batch's, each process's loss is its share of
the whole batch's loss, and gradients are summed over processes before clipping: one optimiser step on the
whole batch, as one process would take. Launched, each sequence samples from its own seeded generator
(biopost.sampling), so rollouts do not depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from biopost import distributed, durable
from biopost.evaluation import collate_payloads, encode_prompts
from biopost.mixture import item_shares, mixed_train
from biopost.models.adapters import is_adapter_weight, prepare_for_training
from biopost.models.generation import Sampling, TransformersBackend, make_backend
from biopost.models.memory import checkpoint_in_eval_mode, enable_gradient_checkpointing
from biopost.rewards import call_reward, correctness_reward, format_reward, length_penalty, load_reward_function, reward_columns
from biopost.sampling import row_seeds
from biopost.stages.context import StageContext, plan_steps, schedule_settings
from biopost.stages.grpo import completion_mask, group_advantages, grpo_loss, token_logps
from biopost.stages.sft import sample_fraction


def run_rl(ctx: StageContext):
    stage = ctx.stage
    # ---- setup: policy, frozen reference, rewards, optimiser, schedule
    policy = ctx.load_policy(ctx.init_path, trainable_adapter=stage.adapter == "continue")
    policy = prepare_for_training(policy, stage.resolved_lora(ctx.config.model), ctx.stage_dir, mode=stage.adapter,
                                  source=ctx.init_path, freeze_projector=stage.freeze_projector)
    reference = Reference.of(policy, ctx.init_path, stage.adapter, stage.reference)
    policy.model.eval()  # no dropout: old, new and reference log-probs must come from the same function
    if ctx.config.model.gradient_checkpointing:
        enable_gradient_checkpointing(policy.model)
        checkpoint_in_eval_mode(policy.model)  # after eval(), which clears the flag it sets
    rewards = reward_functions(ctx.task, stage, [ctx.mixed[m.task.name][0] for m in stage.mixture])
    train = sample_fraction(list(ctx.splits.train), stage.data_fraction, stage.seed)
    items = mixed_train(ctx.task, train, stage, ctx.mixed)  # the run's task, plus the tasks mixed in by weight
    ctx.task_state["train_items"] = item_shares(items)
    total, per_epoch, every = plan_steps(stage, len(items))
    save_every = stage.save_every_steps or every  # resume points, as the Trainer stages' save_steps
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params + policy.projector_parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = make_scheduler(stage, optimizer, total * stage.mu)
    state = ResumeState.load(ctx, policy, optimizer, scheduler)
    ctx.resume_from(state.step if state.step > 0 else -1)
    generator = rollout_backend(ctx, policy)  # after resume: a vLLM engine starts from the resumed weights
    if state.step == 0 and stage.eval_at_start:
        ctx.evaluate_and_save(policy, 0, epoch=0.0)

    # ---- loop
    bar = tqdm(range(state.step, total), initial=state.step, total=total, desc=f"rl {ctx.name}",
               disable=not distributed.is_main())  # one bar for the run
    for step in bar:
        share = distributed.shard_bounds(stage.prompts_per_step, "prompts_per_step")
        picked = prompts_for_step(items, step, stage.prompts_per_step, stage.seed)[share]
        batch = rollout(policy, [i.task for i in picked], [i.example for i in picked], stage, generator, step,
                        first=share.start)
        scores = {k: distributed.gather_tensor(v) for k, v in score_rollouts(batch, rewards, stage).items()}
        rows = slice(share.start * stage.num_generations, share.stop * stage.num_generations)
        advantages = group_advantages(scores["reward"], stage.num_generations, stage.scale_rewards)[rows]
        with torch.no_grad():
            # one pass (mu = 1): the old log-probs are the current ones, taken detached in `optimise` (as TRL)
            batch.old_logps = sequence_logps(policy, batch, stage.temperature)[0] if stage.mu > 1 else None
            batch.ref_logps = reference.logps(policy, batch, stage.temperature)
        stats = optimise(policy, optimizer, scheduler, params, batch, advantages, stage)
        generator.sync(policy)  # the next rollouts sample from the updated policy (a no-op for transformers)
        lengths = distributed.gather_tensor(batch.mask.sum(1))
        row = {**{k: mean_or_none(v) for k, v in scores.items()}, **stats,
               "completion_length": float(lengths.float().mean()), "lr": scheduler.get_last_lr()[0]}
        log_train_row(ctx, step + 1, per_epoch, row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl="-" if row["kl"] is None else f"{row['kl']:.4f}",
                        refresh=False)
        eval_point = (step + 1) % every == 0 or step + 1 == total
        if eval_point:
            ctx.evaluate_and_save(policy, step + 1, epoch=round((step + 1) / per_epoch, 4))
        if ((step + 1) % save_every == 0 and step + 1 < total) or step + 1 in ctx.snapshot_steps:
            ResumeState.save(ctx, policy, optimizer, scheduler, step + 1)
            ctx.log.settle(ctx.name, step + 1)  # a resume starts here: the rows up to it stay
        if step + 1 in ctx.snapshot_steps:  # kept for the study runs that branch off here
            ctx.save_snapshot(step + 1, ResumeState.path(ctx), "resume")
    if total not in ctx.evaluated:  # a run resumed at its last step (e.g. branched off a longer one)
        ctx.evaluate_and_save(policy, total, epoch=round(total / per_epoch, 4))

    # ---- save
    return ctx.save_final(policy, scratch=ResumeState.path(ctx).name)  # a finished stage is never resumed


@dataclass
class Rollouts:
    examples: list  # one per sequence (each prompt repeated G times)
    prompt_ids: torch.Tensor  # left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # right-padded after end-of-turn
    mask: torch.Tensor  # completion tokens that count (through the first end-of-turn)
    completions: list[str]
    payloads: dict
    old_logps: torch.Tensor | None = None  # None: the policy that sampled is the one optimised (mu = 1)
    ref_logps: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)  # rendered, one per sequence (for reward functions)
    task_names: list[str] = field(default_factory=list)  # each sequence's task (a mixed stage has several)


def prompts_for_step(train: list, step: int, n: int, seed: int) -> list:
    """Prompts of a step: epochs walk a fresh seeded permutation, so the data position is a function of step."""
    out, per_epoch = [], len(train)
    for k in range(step * n, step * n + n):
        epoch, pos = divmod(k, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(per_epoch)
        out.append(train[order[pos]])
    return out


def rollout_backend(ctx: StageContext, policy):
    """The rollouts' generation backend (``generation`` of the stage): the evaluator's own when both name the
    same settings, so one vLLM engine serves both."""
    if ctx.stage.generation == ctx.eval_cfg.generation:
        return ctx.eval_backend(policy)
    return make_backend(ctx.stage.generation, policy, ctx.stage_dir, ctx.stage.seed, where=f"stages.{ctx.index}")


@torch.no_grad()
def rollout(policy, task, examples: list, stage, backend=None, step: int = 0, first: int = 0) -> Rollouts:
    """Sample G completions per prompt with the stage's temperature / top-p / top-k. ``task``: the task of
    every example, or one task per example (a mixed stage). ``backend``: the generation backend
    (models/generation.py); None = transformers ``generate`` on the live policy. Under a launcher each
    sequence samples from its own generator, seeded by the stage seed, ``step`` and its row in the step's
    whole batch (``first``: the index of ``examples[0]`` among the step's prompts); so does every sequence of a
    vLLM backend (a per-request seed), launched or not."""
    tasks = task if isinstance(task, list) else [task] * len(examples)
    repeated = [e for e in examples for _ in range(stage.num_generations)]
    rendered = [policy.render_prompt(t.messages(e)) for t, e in zip(tasks, examples)]  # once per prompt, then repeated
    prompts = [p for p in rendered for _ in range(stage.num_generations)]
    payloads = collate_payloads(repeated, policy.modalities)
    enc = encode_prompts(policy, prompts, payloads)
    backend = backend or TransformersBackend()
    seeds = None
    if distributed.launched() or backend.per_row_seeds:
        seeds = tuple(row_seeds(stage.seed, step, range(first * stage.num_generations,
                                                         (first + len(examples)) * stage.num_generations)))
    sampling = Sampling(max_new_tokens=stage.max_completion_length, greedy=False, temperature=stage.temperature,
                        top_p=stage.top_p, top_k=stage.top_k, row_seeds=seeds)  # no per-request seed: G copies differ
    completion_ids = backend.generate(
        policy, enc["input_ids"], enc["attention_mask"], payloads, sampling)
    mask = completion_mask(completion_ids, policy.end_of_turn_id)
    return Rollouts(repeated, enc["input_ids"], enc["attention_mask"], completion_ids, mask,
                    [policy.decode(row) for row in completion_ids], payloads, prompts=prompts,
                    task_names=[t.name for t in tasks for _ in range(stage.num_generations)])


def sequence_logps(policy, batch: Rollouts, temperature: float, rows: slice = slice(None)):
    """Log-probs and entropies of the completion tokens of ``batch[rows]`` under the current policy."""
    ids = torch.cat([batch.prompt_ids[rows], batch.completion_ids[rows]], dim=1)
    attention = torch.cat([batch.prompt_mask[rows], batch.mask[rows]], dim=1)
    payloads = {k: v[rows] for k, v in batch.payloads.items()}
    width = batch.completion_ids.shape[1]
    logits = policy.logits(ids, attention, payloads, keep_last=width + 1)[:, :-1]  # position t predicts t + 1
    return token_logps(logits, batch.completion_ids[rows], temperature)


def reward_functions(task, stage, mixed: list = ()) -> dict:
    """name -> (weight, function): the built-in rewards, then the stage's ``rewards.custom`` functions.
    ``mixed``: the other tasks of a mixed stage; correctness scores each completion with its own task."""
    weights = stage.rewards
    funcs = {"correctness": (weights.correctness, correctness_reward(task, *mixed)),
             "format": (weights.format, format_reward)}
    if weights.length:
        funcs["length"] = (weights.length, length_penalty(weights.length_target_tokens, stage.max_completion_length))
    for custom in weights.custom:
        funcs[custom.label] = (custom.weight, load_reward_function(custom.function))
    return funcs


def score_rollouts(batch: Rollouts, rewards: dict, stage) -> dict[str, torch.Tensor]:
    """Each reward per completion (NaN where it abstained with None), and their weighted sum ``reward``,
    to which an abstention adds nothing. ``reward_<name>_none``: 1 where ``name`` abstained."""
    columns = {**reward_columns(batch.examples), "completion_lengths": batch.mask.sum(1).tolist()}
    if batch.task_names:
        columns["task_name"] = batch.task_names
    custom = {c.label for c in stage.rewards.custom}
    out, total = {}, torch.zeros(len(batch.completions))
    for name, (weight, func) in rewards.items():
        values = call_reward(name, func, batch.prompts, batch.completions, **columns)
        out[f"reward_{name}"] = torch.tensor([math.nan if v is None else v for v in values])
        if name in custom:  # built-in rewards never abstain
            out[f"reward_{name}_none"] = torch.tensor([float(v is None) for v in values])
        total += weight * torch.nan_to_num(out[f"reward_{name}"], nan=0.0)
    out["reward"] = total
    return out


def mean_or_none(values: torch.Tensor) -> float | None:
    """Mean over the values that are not NaN (rewards that abstained); None when all abstained."""
    mean = float(values.nanmean())
    return None if math.isnan(mean) else mean


def optimise(policy, optimizer, scheduler, params, batch: Rollouts, advantages, stage) -> dict[str, float]:
    """``mu`` passes over the rollouts; micro-batches accumulate into one optimiser step per pass. Launched,
    ``batch`` is this process's share: losses are normalised by the whole batch, gradients summed over processes."""
    n = len(batch.examples)
    sequences = n * distributed.world_size()  # every share has n sequences
    if batch.old_logps is None and stage.mu > 1:
        raise ValueError("with mu > 1 the rollouts need old_logps: later passes must compare with the sampling policy")
    micro = stage.micro_batch_size or n
    advantages = advantages.to(policy.device)
    tokens = float(distributed.gather_tensor(batch.mask.sum(1)).sum())  # dapo: by the whole batch's tokens
    losses: list[float] = []  # this process's share of each pass's loss
    stats: dict[str, list[float]] = {}
    for _ in range(stage.mu):
        optimizer.zero_grad(set_to_none=True)
        batch_loss = 0.0
        for start in range(0, n, micro):
            rows = slice(start, start + micro)
            logps, entropy = sequence_logps(policy, batch, stage.temperature, rows)
            loss, s = grpo_loss(
                logps, logps.detach() if batch.old_logps is None else batch.old_logps[rows],
                None if batch.ref_logps is None else batch.ref_logps[rows], advantages[rows], batch.mask[rows],
                loss_type=stage.loss_type, epsilon_low=stage.epsilon_low, epsilon_high=stage.epsilon_high,
                beta=stage.beta, max_completion_length=stage.max_completion_length,
                batch_sequences=sequences, batch_tokens=tokens,
            )
            loss.backward()  # this micro-batch's share: the shares add up to the full-batch loss
            batch_loss += float(loss.detach())
            mask = batch.mask[rows].float()
            s.update(entropy=float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1)))
            for k, v in s.items():
                stats.setdefault(k, []).append(v)
        losses.append(batch_loss)
        distributed.reduce_gradients(params + policy.projector_parameters(), "sum")
        torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
        if policy.projector_parameters():  # clipped on their own, as the Trainer stages do
            torch.nn.utils.clip_grad_norm_(policy.projector_parameters(), stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
    # one exchange a step: each pass's loss summed over processes, and every process's per-micro-batch statistics
    # in row order; a statistic nothing measured (kl without a reference) stays None
    shares = distributed.gather([(losses, stats)])  # every process's, in process order
    out = {"loss": float(np.mean([sum(by_process) for by_process in zip(*(own for own, _ in shares))]))}
    for k in stats:
        values = [v for _, theirs in shares for v in theirs[k]]
        out[k] = None if None in values else float(np.mean(values))
    return out


class Reference:
    """Log-probs under the frozen starting policy, for the KL penalty.

    new adapter: the starting policy is the model with the adapter switched off (no copy needed).
    continued adapter: the init adapter is loaded a second time, frozen, and selected per forward.
    full fine-tuning (``reference`` of the stage): a frozen copy of the starting weights on the device
    (``copy``), or kept on the CPU and moved to the device for each batch (``cpu_offload``: the device holds
    it only while it scores). ``none`` (beta 0, any policy): no KL term, nothing computed, kl logged as absent.
    A fused model's starting projector weights are swapped in for the reference forward.
    """

    def __init__(self, kind: str, frozen=None, projector=None):
        self.kind, self.frozen, self.projector = kind, frozen, projector or {}

    @classmethod
    def of(cls, policy, init_path, adapter_mode: str, full: str = "copy") -> "Reference":
        """``full``: the stage's ``reference``: how full fine-tuning keeps its reference (copy, cpu_offload);
        adapters need no copy. ``none`` (beta 0) computes no reference log-probs, with or without an adapter."""
        if full == "none":
            return cls("none")
        if not policy.is_adapter:
            import copy

            frozen = copy.deepcopy(policy)
            frozen.model.requires_grad_(False).eval()
            if full == "cpu_offload":
                frozen.to("cpu")
            return cls(full, frozen)
        if adapter_mode == "continue":
            policy.model.load_adapter(str(init_path), adapter_name="reference", is_trainable=False)
            return cls("named", projector=policy.projector_state())
        return cls("disabled", projector=policy.projector_state())

    @torch.no_grad()
    def logps(self, policy, batch: Rollouts, temperature: float) -> torch.Tensor | None:
        if self.kind == "none":
            return None
        if self.kind == "copy":
            return sequence_logps(self.frozen, batch, temperature)[0]
        if self.kind == "cpu_offload":
            self.frozen.to(policy.device)
            try:
                return sequence_logps(self.frozen, batch, temperature)[0]
            finally:
                self.frozen.to("cpu")
        with self._reference_weights(policy):
            return sequence_logps(policy, batch, temperature)[0]

    @contextmanager
    def _reference_weights(self, policy):
        with self._reference_projector(policy), self._reference_adapter(policy):
            yield

    @contextmanager
    def _reference_projector(self, policy):
        if not self.projector:
            yield
            return
        current = policy.projector_state()
        policy.load_projector_state(self.projector)
        try:
            yield
        finally:
            policy.load_projector_state(current)

    @contextmanager
    def _reference_adapter(self, policy):
        if self.kind == "disabled":
            with policy.model.disable_adapter():
                yield
            return
        policy.model.base_model.set_adapter("reference")
        try:
            yield
        finally:
            policy.model.base_model.set_adapter("default")
            for name, param in policy.model.named_parameters():  # set_adapter may change trainability
                param.requires_grad = is_adapter_weight(name)


def make_scheduler(stage, optimizer, total_updates: int):
    name, kwargs, warmup = schedule_settings(stage.schedule, total_updates, stage.mu)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_updates,
                         scheduler_specific_kwargs=kwargs)


def log_train_row(ctx: StageContext, step: int, per_epoch: int, row: dict) -> None:
    where = {"stage": ctx.name, "stage_index": ctx.index, "step": step, "epoch": round(step / per_epoch, 4),
             "split": "train", "n": None}
    ctx.log.write([{**where, "metric": k, "value": v} for k, v in row.items()], sync=False)  # every step


class ResumeState:
    """Model, optimiser, scheduler and RNG at the last save point (``save_every_steps``, default the eval
    points); the data position is the step. Each save is written whole under ``resume.next`` with a checksum
    manifest, then renamed to ``resume``; the save point before it stays as ``resume.prev``, the fallback when
    the newest is found damaged."""

    def __init__(self, step: int):
        self.step = step

    @staticmethod
    def path(ctx):
        return ctx.stage_dir / "resume"

    @classmethod
    def save(cls, ctx, policy, optimizer, scheduler, step: int) -> None:
        """Written by the main process (every process holds the same weights and optimiser state)."""
        with distributed.main_writes() as main:
            if main:
                cls._save(ctx, policy, optimizer, scheduler, step)

    @classmethod
    def _save(cls, ctx, policy, optimizer, scheduler, step: int) -> None:
        path = cls.path(ctx)
        with durable.publishing(path.with_name("resume.next")) as tmp:
            policy.save(tmp / "policy")
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "cuda_rng": cuda_rng},
                       tmp / "state.pt")
            (tmp / "step.json").write_text(json.dumps({"step": step}))
        if path.exists():
            durable.replace_dir(path, path.with_name("resume.prev"))
        durable.replace_dir(path.with_name("resume.next"), path)

    @classmethod
    def newest_intact(cls, ctx) -> tuple[int, Path | None]:
        """(step, directory) of the newest save point whose files match their manifest; (0, None) if none."""
        best = (0, None)
        for candidate in (cls.path(ctx).with_name(n) for n in ("resume", "resume.next", "resume.prev")):
            if not candidate.exists():
                continue
            problem = durable.check_manifest(candidate)
            if problem:
                print(f"{candidate}: {problem}; using an earlier save point", file=sys.stderr)
                continue
            step = json.loads((candidate / "step.json").read_text())["step"]
            best = max(best, (step, candidate), key=lambda b: b[0])
        return best

    @classmethod
    def load(cls, ctx, policy, optimizer, scheduler) -> "ResumeState":
        step, path = cls.newest_intact(ctx)
        if path is None:
            return cls(0)
        from safetensors.torch import load_file

        weights = path / "policy" / ("adapter_model.safetensors" if policy.is_adapter else "model.safetensors")
        if policy.is_adapter:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(policy.model, load_file(weights))
        else:
            policy.model.load_state_dict(load_file(weights), strict=False)
        policy.load_projector(path / "policy")
        state = torch.load(path / "state.pt", weights_only=True)  # tensors, numbers and tuples only: runs no code
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        print(f"rl {ctx.name}: resuming at step {step}")
        return cls(step)
