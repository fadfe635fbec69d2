"""The plan of a study: its runs (content-hash ids), the steps each one trains, and exact prefix sharing.

Two runs share a prefix when they are identical up to a point of their training: the same run-level
settings, the same earlier stages, and a stage that differs only in length whose learning rate is the same
at every step up to that point. Then the later run copies the earlier one's state there (a resumable
snapshot: weights, optimizer, scheduler, RNG, data position) and trains only the rest, so it ends with the
weights it would have had alone. With ``constant`` or ``warmup_stable_decay`` schedules and absolute
``warmup_steps`` a shorter stage is a prefix of a longer one (for WSD, up to its own decay); the learning
rates are compared step by step with the very schedule the stage builds, so only what is provably
identical is shared. ``cosine`` and ``linear`` stages of different lengths share nothing, and the plan
says so.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from biopost import durable
from biopost.config import ConfigError, RunConfig, write_yaml
from biopost.mixture import mixed_size
from biopost.study.config import Study, expand, get_field

SHAREABLE = ("constant", "warmup_stable_decay")


@dataclass
class PlannedRun:
    id: str
    config: RunConfig
    pipeline: str
    blocks: list[str]
    axes: dict[str, Any]
    budget: str | None = None
    budget_amounts: dict[str, float] = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)  # per stage: name, kind, steps, eval_every, schedule
    donor: str | None = None
    branch: tuple[int, int] | None = None  # (stage index, step) taken from the donor
    snapshots: dict[int, list[int]] = field(default_factory=dict)  # steps this run keeps for its branches
    wave: int = 0

    @cached_property
    def parts(self) -> tuple[str, list[dict]]:
        """(run-level settings as JSON text, stage dicts): what prefix sharing compares. The tasks mixed into
        any stage are run-level: they are scored at every evaluation point of every stage, so a run that mixes
        a task in only in a later stage still differs from the first step on."""
        config = self.config.model_dump(mode="json")
        stages = config.pop("stages")
        config["mixed_tasks"] = {name: task.model_dump(mode="json") for name, task in self.config.mixed_tasks().items()}
        return json.dumps(config, sort_keys=True), stages

    @cached_property
    def stage_json(self) -> list[str]:
        return [json.dumps(s, sort_keys=True) for s in self.parts[1]]

    @property
    def steps(self) -> int | None:
        counts = [s["steps"] for s in self.stages]
        return None if None in counts else sum(counts)

    @property
    def executed(self) -> int | None:
        """Steps this run trains itself: all of them, less the prefix it copies."""
        if self.branch is None:
            return self.steps
        k, b = self.branch
        rest = [s["steps"] for s in self.stages[k:]]
        return None if None in rest else sum(rest) - b

    def to_json(self) -> dict:
        return {"id": self.id, "pipeline": self.pipeline, "blocks": self.blocks, "budget": self.budget,
                "budget_amounts": self.budget_amounts, "axes": self.axes, "stages": self.stages,
                "steps": self.steps, "steps_executed": self.executed, "donor": self.donor,
                "branch": None if self.branch is None else {"stage_index": self.branch[0], "step": self.branch[1]},
                "snapshots": {str(k): v for k, v in self.snapshots.items()}, "wave": self.wave,
                "config": self.config.model_dump(mode="json")}

    @classmethod
    def from_json(cls, d: dict) -> "PlannedRun":
        branch = d["branch"] and (d["branch"]["stage_index"], d["branch"]["step"])
        return cls(d["id"], RunConfig.model_validate(d["config"]), d["pipeline"], d["blocks"], d["axes"], d["budget"],
                   d["budget_amounts"], d["stages"], d["donor"], branch,
                   {int(k): v for k, v in d["snapshots"].items()}, d["wave"])


@dataclass
class Plan:
    study: str
    digest: str
    sizes: str  # "loaded" (counted on the data) or "declared" (train_examples, for a dry run)
    runs: list[PlannedRun]
    notes: list[str] = field(default_factory=list)
    tasks: dict[str, dict] = field(default_factory=dict)  # task key -> name and split fingerprints

    @property
    def steps_executed(self) -> int:
        return sum(r.executed or 0 for r in self.runs)

    @property
    def steps_naive(self) -> int:
        return sum(r.steps or 0 for r in self.runs)

    def by_id(self) -> dict[str, PlannedRun]:
        return {r.id: r for r in self.runs}

    def to_json(self) -> dict:
        unknown = sum(s["steps"] is None for r in self.runs for s in r.stages)
        return {"study": self.study, "study_digest": self.digest, "sizes": self.sizes,
                "steps_executed": self.steps_executed, "steps_naive": self.steps_naive,
                "stages_with_unknown_steps": unknown, "notes": self.notes, "tasks": self.tasks,
                "runs": [r.to_json() for r in self.runs]}

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        return cls(d["study"], d["study_digest"], d["sizes"], [PlannedRun.from_json(r) for r in d["runs"]],
                   d["notes"], d["tasks"])

    def tree(self) -> str:
        """The runs as a forest: each run under the run it copies its prefix from."""
        children: dict[str | None, list[PlannedRun]] = {}
        for r in self.runs:
            children.setdefault(r.donor, []).append(r)
        naive, done = self.steps_naive, self.steps_executed
        lines = [f"study {self.study}: {len(self.runs)} runs; {done:,} optimizer steps executed of {naive:,} "
                 f"without sharing ({done / max(naive, 1):.0%}); step counts from {self.sizes} sizes"]

        def walk(run: PlannedRun, prefix: str, last: bool, root: bool):
            lines.append(("" if root else prefix + ("└─ " if last else "├─ ")) + describe(run))
            kids = children.get(run.id, [])
            for i, kid in enumerate(kids):
                walk(kid, "" if root else prefix + ("   " if last else "│  "), i == len(kids) - 1, False)

        for run in children.get(None, []):
            walk(run, "", True, True)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def describe(run: PlannedRun) -> str:
    stages = " -> ".join(f"{s['name']} {'?' if s['steps'] is None else s['steps']}" for s in run.stages)
    labels = [run.pipeline] + ([f"budget {run.budget}"] if run.budget else [])
    where = ""
    if run.branch:
        k, b = run.branch
        where = f", from {run.stages[k]['name']} step {b}" if b else f", after {run.stages[k - 1]['name']}"
    keep = "".join(f", keeps {run.stages[k]['name']}@{','.join(map(str, v))}" for k, v in sorted(run.snapshots.items()))
    runs = "?" if run.executed is None else run.executed
    return f"{run.id} [{', '.join(labels)}] {stages} (trains {runs}{where}{keep})"


# ---------------------------------------------------------------- step counts
class StepCounter:
    """Optimizer steps per stage. ``load=True`` counts on the loaded training split (data, no model);
    otherwise epochs are counted on the study's declared ``train_examples`` (a dry run loads nothing)."""

    def __init__(self, declared: dict[str, int], load: bool):
        self.declared, self.load = declared, load
        self.sizes: dict[str, int] = {}
        self.tasks: dict[str, dict] = {}

    def train_size(self, config: RunConfig, where: str, required: bool = True) -> int | None:
        key = task_key(config)
        if key not in self.sizes:
            if self.load:
                from biopost.pipeline import load_task_and_splits

                _, splits = load_task_and_splits(config)
                self.sizes[key] = len(splits.train)
                self.tasks[key] = {"name": config.task.name, "fingerprints": splits.fingerprints()}
            elif config.task.name in self.declared:
                self.sizes[key] = self.declared[config.task.name]
            elif not required:
                return None
            else:
                raise ConfigError(
                    f"{where} counts epochs: the plan needs the training-split size of task {config.task.name}; "
                    f"set train_examples: {{{config.task.name}: N}} in the study, or plan without --dry-run "
                    "(loads the data, no model)")
        return self.sizes[key]

    def stage(self, config: RunConfig, index: int) -> dict:
        """Name, kind, optimizer steps and evaluation interval (steps) of one stage."""
        from biopost.stages.context import plan_steps

        stage = config.stages[index]
        info = {"name": config.stage_name(index), "kind": stage.kind, "steps": 0, "eval_every": None}
        if stage.kind in ("eval", "interpolate", "baseline"):  # no optimizer steps
            return info
        if stage.kind == "cpt" and stage.max_steps is None:  # blocks of a packed corpus: known once tokenized
            info["steps"] = None
            return info
        if stage.max_steps is not None and stage.eval_every_steps:
            info["steps"], info["eval_every"] = stage.max_steps, stage.eval_every_steps
            return info
        n = self.train_size(config, f"stage {info['name']} of run {config.run_id()}", required=stage.max_steps is None)
        if n is None:  # a dry run without the data's size: the length is known, the epoch-based eval points not
            info["steps"] = stage.max_steps
            return info
        n = mixed_size(fraction_size(n, stage.data_fraction), stage)  # an epoch includes the tasks mixed in
        info["steps"], _, info["eval_every"] = plan_steps(stage, n)
        return info


def fraction_size(n: int, fraction: float) -> int:
    """Examples in a stage's ``data_fraction`` of ``n`` (the count of ``stages.sft.sample_fraction``, which
    imports the whole training stack; tests/test_study_plan.py checks the two agree).

    >>> fraction_size(351, 0.2), fraction_size(351, 1.0), fraction_size(3, 0.1)
    (70, 351, 1)
    """
    return n if fraction >= 1 else max(1, round(fraction * n))


def task_key(config: RunConfig) -> str:
    return hashlib.sha256(json.dumps(config.task.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- planning
def make_plan(study: Study, load_data: bool = True) -> Plan:
    """Expand the study, count steps, and pick for every run the earlier run it shares the most with."""
    counter = StepCounter(study.config.train_examples, load_data)
    fields = study.axis_fields()
    runs: dict[str, PlannedRun] = {}
    for cell in expand(study):
        rid = cell.config.run_id()
        if rid in runs:  # the same run reached from several blocks: one run, every label kept
            run = runs[rid]
            run.blocks += [cell.block] if cell.block not in run.blocks else []
            run.budget = run.budget or cell.budget
            run.budget_amounts = run.budget_amounts or cell.budget_amounts
            continue
        if load_data:  # the study's split fingerprints, which collect holds every run to
            counter.train_size(cell.config, f"run {rid}")
        config_json = cell.config.model_dump(mode="json")
        axes = {f: get_field(config_json, f) for f in fields}
        stages = [counter.stage(cell.config, i) for i in range(len(cell.config.stages))]
        runs[rid] = PlannedRun(rid, cell.config, cell.pipeline, [cell.block], axes, cell.budget, cell.budget_amounts,
                               stages)
    # longest first stage first (then second..., a pipeline before its prefixes): it becomes the trunk and
    # most branches hang directly off it
    ordered = sorted(runs.values(), key=lambda r: ([-(s["steps"] or 0) for s in r.stages] + [math.inf], r.id))
    notes = share_prefixes(ordered)
    return Plan(study.name, study.digest(), "loaded" if load_data else "declared", ordered, notes, counter.tasks)


def share_prefixes(runs: list[PlannedRun]) -> list[str]:
    """Give each run the earlier run it shares the deepest prefix with (ties: the earliest run)."""
    notes: set[str] = set()
    done: list[PlannedRun] = []
    by_id = {r.id: r for r in runs}
    for run in runs:
        best, where = None, (0, 0)
        for other in done:
            pos = shared_position(run, other, notes)
            if pos > where:
                best, where = other, pos
        if best is not None:
            k, b = where
            while b and best.branch is not None and best.branch >= where:  # it copied that point too: go to its source
                best = by_id[best.donor]
            run.donor, run.branch, run.wave = best.id, where, best.wave + 1
            if b:
                best.snapshots.setdefault(k, [])
                if b not in best.snapshots[k]:
                    best.snapshots[k] = sorted(best.snapshots[k] + [b])
        done.append(run)
    return sorted(notes)


def shared_position(a: PlannedRun, x: PlannedRun, notes: set[str]) -> tuple[int, int]:
    """How far ``a`` and ``x`` train identically: (k, b) = stages before k complete, then b steps of stage k."""
    (ca, sa), (cx, sx) = a.parts, x.parts
    if ca != cx:
        return (0, 0)
    k = 0
    while k < len(sa) and k < len(sx) and sa[k] == sx[k]:
        k += 1
    if k == len(sa) or k == len(sx):
        return (k, 0)
    if {f: v for f, v in sa[k].items() if f not in LENGTH} != {f: v for f, v in sx[k].items() if f not in LENGTH}:
        return (k, 0)
    ta, tx = a.stages[k]["steps"], x.stages[k]["steps"]
    if ta is None or tx is None or "schedule" not in sa[k]:
        return (k, 0)
    if sa[k]["schedule"]["name"] not in SHAREABLE or sx[k]["schedule"]["name"] not in SHAREABLE:
        name = next(s["schedule"]["name"] for s in (sa[k], sx[k]) if s["schedule"]["name"] not in SHAREABLE)
        notes.add(f"stage {a.stages[k]['name']} uses a {name} schedule: its lengths share "
                  f"nothing (constant or warmup_stable_decay with warmup_steps would share their prefix)")
        return (k, 0)
    b = agreement(a.stage_json[k], ta, x.stage_json[k], tx)
    if ta != tx and sa[k]["schedule"]["warmup_steps"] is None and sa[k]["schedule"]["warmup_ratio"] > 0:
        notes.add(f"stage {a.stages[k]['name']}: warmup_ratio gives each length its own warmup, so lengths share "
                  "at most the first steps; set schedule.warmup_steps")
    return (k, b)


LENGTH = ("epochs", "max_steps", "schedule")  # compared through the learning rates instead


@lru_cache(maxsize=4096)
def agreement(stage_a: str, steps_a: int, stage_x: str, steps_x: int) -> int:
    """Steps ``b`` after which a run of ``stage_a`` can continue from a run of ``stage_x``'s state, exactly.

    The first ``b`` steps must get the same learning rate at every optimizer update, and so must the next
    update unless ``a`` ends at ``b``: a resumed optimizer carries the learning rate of its next update.
    """
    mu = json.loads(stage_a).get("mu", 1)
    fa, fx = lr_factors(stage_a, steps_a), lr_factors(stage_x, steps_x)
    shorter = min(steps_a, steps_x)
    first = next((u for u in range(shorter * mu + 1) if fa(u) != fx(u)), None)
    if first is None:
        return shorter
    b = first // mu
    if b != steps_a and b * mu == first:
        b -= 1
    return max(b, 0)


@lru_cache(maxsize=4096)
def lr_factors(stage_json: str, steps: int):
    """The learning-rate multiplier per update, built exactly as the stage builds its scheduler."""
    import torch
    from transformers import get_scheduler

    from biopost.config import STAGE_KINDS
    from biopost.stages.context import schedule_settings

    raw = json.loads(stage_json)
    stage = STAGE_KINDS[raw["kind"]].model_validate(raw)
    mu = getattr(stage, "mu", 1)
    name, kwargs, warmup = schedule_settings(stage.schedule, steps * mu, mu)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps * mu,
                              scheduler_specific_kwargs=kwargs)
    return scheduler.lr_lambdas[0]


# ---------------------------------------------------------------- the study directory
def prepare(study: Study, study_dir: Path) -> Plan:
    """The plan in ``study_dir``: reused when the study is unchanged (a rerun loads no data), else made anew
    (runs already finished keep their ids and are not redone); ``study.yaml`` and ``plan.json`` are written."""
    study_dir.mkdir(parents=True, exist_ok=True)
    saved = study_dir / "plan.json"
    if saved.is_file():
        plan = Plan.from_json(json.loads(saved.read_text()))
        if plan.digest == study.digest():
            return plan
        print(f"{study_dir}: the study changed since its plan; planning again (finished runs are kept)")
    plan = make_plan(study, load_data=True)
    write_yaml(study.resolved(), study_dir / "study.yaml")
    durable.write_json(saved, plan.to_json(), indent=1)
    return plan
