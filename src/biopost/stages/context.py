"""What every stage receives, and the evaluate-and-checkpoint step they all share."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from biopost import distributed, durable
from biopost.config import EvalConfig, RunConfig
from biopost.data import Splits
from biopost.evaluation import evaluate
from biopost.models.device import resolve_dtype
from biopost.models.generation import make_backend
from biopost.models.policy import Policy, load_policy
from biopost.runlog import RunLog

if TYPE_CHECKING:
    from biopost.forgetting import ForgettingChecks


@dataclass
class StageContext:
    config: RunConfig
    index: int
    name: str
    task: object
    splits: Splits
    log: RunLog
    stage_dir: Path
    init_path: Path
    task_state: dict
    history: list[dict] = field(default_factory=list)  # val primary metric per evaluated step
    device: str = "cpu"  # the run's device, resolved once from model.device
    resolve: Callable[[str], Path] | None = None  # a checkpoint reference ('previous', '<stage>:best'...) -> path
    forgetting: ForgettingChecks | None = None  # scored at every evaluation point
    mixed: dict = field(default_factory=dict)  # task name -> (task, splits) of the tasks stages mix in
    evaluated: set[int] = field(default_factory=set)  # steps with evaluation rows (kept or written now)
    snapshot_steps: tuple[int, ...] = ()  # steps to keep a resumable state at, for runs that branch off here
    generation: object | None = None  # the evaluator's generation backend, built at the first evaluation

    @property
    def stage(self):
        return self.config.stages[self.index]

    def load_policy(self, path: Path, trainable_adapter: bool = False) -> Policy:
        """A checkpoint (or the backbone) as the run's model settings say: dtype, revision, remote code, device."""
        model = self.config.model
        return load_policy(path, self.dtype, trainable_adapter=trainable_adapter, revision=model.revision,
                           device=self.device, trust_remote_code=model.trust_remote_code,
                           quantization=model.quantization)

    @property
    def dtype(self) -> str:
        """``model.dtype`` resolved for the run's device (auto: bfloat16 on a CUDA GPU that has it, else float32)."""
        return resolve_dtype(self.config.model.dtype, self.device)

    @property
    def eval_cfg(self) -> EvalConfig:
        return self.config.eval

    def eval_splits(self) -> dict[str, list]:
        return {name: list(self.splits[name]) for name in self.eval_cfg.splits if self.splits[name]}

    def evaluate_and_save(self, policy: Policy, step: int, epoch: float | None, score_task: bool = True,
                          labels: dict | None = None, known_losses: dict | None = None) -> None:
        """Score the eval splits with the shared evaluator (unless ``score_task`` is false) and the forgetting
        checks, log rows (plus ``labels``, e.g. an interpolation's alpha), keep a loadable checkpoint.
        ``known_losses``: corpus losses already computed at this point (see ``ForgettingChecks.evaluate``)."""
        backend = self.eval_backend(policy)
        rows, records = evaluate(policy, self.task, self.eval_splits(), self.eval_cfg, backend) if score_task else ([], {})
        if self.forgetting is not None:
            other_rows, other_records = self.forgetting.evaluate(policy, known_losses, backend)
            rows, records = rows + other_rows, {**records, **other_records}
        where = {"stage": self.name, "stage_index": self.index, "step": step, "epoch": epoch, **(labels or {})}
        self.log.write([{**where, **row} for row in rows])
        for split, recs in records.items():
            self.log.write_predictions(f"{self.name}-step{step:06d}-{split.replace('/', '_')}", recs)
        if distributed.is_main():  # every process holds the same rows (the evaluator gathers them)
            policy.save(self.stage_dir / "checkpoints" / f"step-{step:06d}", self.task_state)
        self.evaluated.add(step)
        val = [r for r in rows if r["split"] == "val" and r["metric"] == self.task.primary_metric
               and "task" not in r]  # the run's task: rows of other tasks (mixed, forgetting) name theirs
        if val:
            self.history.append({"step": step, "value": val[0]["value"]})
            if distributed.is_main():
                self.write_selection()

    def save_final(self, policy: Policy, scratch: str | None = None) -> Path:
        """The stage's final checkpoint, written by the main process; ``scratch``: a working directory of the
        stage (e.g. the Trainer's) to delete now that the stage is done."""
        final = self.stage_dir / "final"
        if distributed.is_main():
            policy.save(final, self.task_state)
            if scratch:
                shutil.rmtree(self.stage_dir / scratch, ignore_errors=True)
        return final

    def eval_backend(self, policy: Policy):
        """The evaluator's generation backend (``eval.generation``), built once per stage and synced to ``policy``'s
        current weights before each use."""
        if self.generation is None:
            self.generation = make_backend(self.eval_cfg.generation, policy, self.stage_dir, self.eval_cfg.seed)
        else:
            self.generation.sync(policy)
        return self.generation

    def resume_from(self, step: int) -> None:
        """Drop rows logged after ``step`` by an interrupted attempt; restore the val history before it."""
        kept = self.log.drop_rows(self.name, after_step=step)
        self.history = val_history(kept, self.task.primary_metric, self.task.name)
        self.evaluated = {r["step"] for r in kept if r["split"] != "train"}

    def write_selection(self) -> None:
        write_selection(self.stage_dir, self.task.primary_metric, self.history)

    def save_snapshot(self, step: int, source: Path, restore_to: str) -> None:
        """Keep a copy of the resumable state ``source`` at ``step``: a run that shares this stage's first
        ``step`` steps resumes from it (the study planner copies it to ``restore_to`` in that run's stage)."""
        if not distributed.is_main():
            return
        with durable.publishing(self.stage_dir / "snapshots" / f"step-{step:06d}") as target:
            shutil.copytree(source, target / "state")
            (target / "snapshot.json").write_text(json.dumps({"step": step, "restore_to": restore_to}))


def val_history(rows: list[dict], metric: str, task: str) -> list[dict]:
    """The stage's ``val`` values of ``metric`` by step, from its logged rows: the run's ``task`` only (a mixed
    task's val rows are reported, never selected on)."""
    return [{"step": r["step"], "value": r["value"]} for r in rows
            if r["split"] == "val" and r["metric"] == metric and r.get("task", task) == task]


def write_selection(stage_dir: Path, metric: str, history: list[dict]) -> None:
    """Best checkpoint on ``val`` only (ties go to the earlier step); its path is relative to this file, so
    the stage directory can move (a run directory moved, a study branch copied)."""
    best = max(history, key=lambda h: (h["value"], -h["step"]))
    durable.write_json(stage_dir / "selection.json", {
        "metric": metric, "split": "val", "best_step": best["step"],
        "best_value": best["value"], "checkpoint": f"checkpoints/step-{best['step']:06d}",
    })


def plan_steps(stage, n_examples: int) -> tuple[int, int, int]:
    """(total optimizer steps, steps per epoch, eval interval in steps)."""
    per_epoch = max(1, math.ceil(n_examples / stage.examples_per_step))
    if stage.max_steps is not None:
        total = stage.max_steps
    elif stage.epochs is not None:
        total = max(1, round(stage.epochs * per_epoch))
    else:
        raise ValueError("set epochs or max_steps for the stage")
    if stage.eval_every_steps:
        every = stage.eval_every_steps
    elif stage.eval_every_epochs:
        every = max(1, round(stage.eval_every_epochs * per_epoch))
    else:
        every = per_epoch
    return total, per_epoch, every


def schedule_settings(schedule, total_updates: int, updates_per_step: int = 1) -> tuple[str, dict, int]:
    """(transformers scheduler name, its extra kwargs, warmup updates) for a stage's schedule config.

    ``updates_per_step``: optimizer updates per stage step (RL's ``mu``), to turn ``warmup_steps`` into updates.
    """
    name = {"constant": "constant_with_warmup"}.get(schedule.name, schedule.name)
    kwargs = {"num_decay_steps": max(1, round(schedule.decay_ratio * total_updates))} if name == "warmup_stable_decay" else {}
    if schedule.warmup_steps is not None:
        return name, kwargs, schedule.warmup_steps * updates_per_step
    return name, kwargs, round(schedule.warmup_ratio * total_updates)
