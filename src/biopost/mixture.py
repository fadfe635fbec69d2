"""Multi-task stages: the run's task mixed with other tasks' training splits, by weight (SFT and RL).

A stage's ``mixture`` lists other tasks with a weight each; the run's task has the stage's ``task_weight``.
Each mixed task is loaded, split (its own seeded rule and leakage check) and fitted on its own train split,
exactly as a run of that task would be. One epoch of the stage's data is the run's task's training examples
once (after ``data_fraction``) plus, for each mixed task, ``round(n * weight / task_weight)`` items drawn from
its train split, so each task's share of the items is its weight over the sum of weights. Every item keeps its
task, which renders its prompt and target and (RL) scores its reward. Mixed tasks are scored on their own eval
splits at every evaluation point (see biopost.forgetting); selection stays on the run's task's val.

The draw depends on the stage's seed and the task's name only, and the stage trains on it as on any list of
examples: the Trainer (SFT) or the step number (RL) holds the data position, so a resumed stage continues the
same sequence.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from biopost.config import ConfigError, RunConfig

if TYPE_CHECKING:
    from biopost.data import Example, Splits


@dataclass(frozen=True)
class TrainItem:
    """One training example and the task that renders, targets and rewards it."""

    task: object
    example: Example


def item_counts(n_own: int, stage) -> dict[str, int]:
    """Items per epoch of each mixed task, for ``n_own`` examples of the run's task.

    >>> from biopost.config import SFTStage
    >>> stage = SFTStage(task_weight=2.0, mixture=[{"task": {"name": "amp/modlamp"}, "weight": 1.0}])
    >>> item_counts(100, stage), mixed_size(100, stage)
    ({'amp/modlamp': 50}, 150)
    """
    return {m.task.name: max(1, round(n_own * m.weight / stage.task_weight)) for m in getattr(stage, "mixture", ())}


def mixed_size(n_own: int, stage) -> int:
    """Items in one epoch of a stage's data (``n_own`` when nothing is mixed in); the study planner counts
    steps with it."""
    return n_own + sum(item_counts(n_own, stage).values())


def draw(n: int, count: int, seed: list[int]) -> list[int]:
    """``count`` indices into ``n`` examples: successive seeded permutations, so a task asked for more items
    than it has repeats each example evenly (and one asked for fewer takes a seeded subset).

    >>> picks = draw(3, 7, [0, 1])
    >>> sorted(picks[:3]), len(picks), max(picks.count(i) for i in range(3)) - min(picks.count(i) for i in range(3))
    ([0, 1, 2], 7, 1)
    """
    import numpy as np

    out: list[int] = []
    cycle = 0
    while len(out) < count:
        out += np.random.default_rng([*seed, cycle]).permutation(n).tolist()
        cycle += 1
    return out[:count]


def mixed_train(task, train: list[Example], stage, mixed: dict[str, tuple[object, Splits]]) -> list[TrainItem]:
    """The stage's training items: ``train`` (the run's task) once, then each mixed task's share."""
    items = [TrainItem(task, e) for e in train]
    for name, count in item_counts(len(train), stage).items():
        other, splits = mixed[name]
        examples = list(splits.train)
        items += [TrainItem(other, examples[i]) for i in draw(len(examples), count, [stage.seed, task_seed(name)])]
    return items


def task_seed(name: str) -> int:
    """A stable number per task name (Python's ``hash`` of a string changes between processes).

    >>> task_seed("amp/modlamp") == task_seed("amp/modlamp") != task_seed("cell_type/pbmc68k")
    True
    """
    return zlib.crc32(name.encode())


def item_shares(items: list[TrainItem]) -> dict[str, int]:
    """Training items per task name (kept in the stage's checkpoints, ``train_items``)."""
    return dict(Counter(item.task.name for item in items))


def load_mixed_tasks(config: RunConfig) -> dict[str, tuple[object, Splits]]:
    """Every task mixed into a stage, loaded and split on its own (before any model loads); a problem with one
    is an error naming its field."""
    from biopost.pipeline import check_encoder_inputs, load_task_and_splits

    where: dict[str, str] = {}  # the first field that names each task
    for i, stage in enumerate(config.stages):
        for j, m in enumerate(getattr(stage, "mixture", [])):
            where.setdefault(m.task.name, f"stages.{i}.mixture.{j}.task")
    loaded = {}
    for name, task_config in config.mixed_tasks().items():
        as_run = config.model_copy(update={"task": task_config})
        try:
            other, splits = load_task_and_splits(as_run)
            if config.model.encoders:  # a fused model's batches carry the payloads its encoders read, from every task
                check_encoder_inputs(as_run, splits)
        except ConfigError as err:
            raise ConfigError(under(where[name], str(err))) from None
        loaded[name] = (other, splits)
    return loaded


def under(where: str, message: str) -> str:
    """A mixed task's error with its ``task.`` paths put under the mixture entry ``where``, so it names one path.

    >>> under("stages.0.mixture.0.task", "config error: 'task.options.max_peptides': a number is expected")
    "'stages.0.mixture.0.task.options.max_peptides': a number is expected"
    >>> under("stages.0.mixture.0.task", "unknown task 'no/such'")
    "stages.0.mixture.0.task: unknown task 'no/such'"
    """
    message = message.removeprefix("config error: ")
    moved = re.sub(r"\btask\.(?=\w)", f"{where}.", message)  # quoted or not, as the message has it
    return moved if moved != message else f"{where}: {message}"
