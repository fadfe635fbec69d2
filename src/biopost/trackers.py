"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) fed with the rows of ``metrics.jsonl``.

:class:`biopost.runlog.RunLog` hands every row it writes to the trackers named in ``report_to``, so no stage
knows about them and a tracker shows exactly what the run directory holds. A row becomes scalars named
``<split>/<metric>`` (``<task>/<split>/<metric>`` for another task's forgetting rows) plus ``..._ci_low`` and
``..._ci_high`` where the row has an interval, at the row's ``step``, grouped by stage:

- TensorBoard: one event directory per stage, ``tensorboard/<stage>/``, so stages are TensorBoard runs; a
  resumed stage purges the points an interrupted attempt logged past its resume step, as metrics.jsonl does.
- W&B: keys ``<stage>/<split>/<metric>`` plotted against ``<stage>/step`` (each stage counts its own steps,
  and W&B's own step must only grow); files in ``wandb/``; ``WANDB_MODE=offline`` works without a network.
- MLflow: keys ``<stage>/<split>/<metric>`` (characters MLflow refuses, such as ``@``, become ``_``); a file
  store in ``mlruns/`` unless ``MLFLOW_TRACKING_URI`` names another.

W&B and MLflow cannot delete points, so they are sent a stage's rows only once a resume can no longer drop them:
at each resumable save point of the stage (:meth:`biopost.runlog.RunLog.settle`), when a resume keeps them, at
the stage's end, and when the run closes (a failed run's last rows too: it may never be resumed). Each tracker
run's id, and per ``<stage>/<tag>`` the last step it was sent, are kept in ``trackers.json``: a resumed run (or
a baseline written into the run directory) continues the same tracker run and sends each point once, in the
order of metrics.jsonl; a tracker run that starts empty is sent every row metrics.jsonl holds (a study run's
copied prefix). A point metrics.jsonl replaces after it was sent (a resume redoing a failed attempt's last rows
or the rows after a damaged newest checkpoint, ``biopost baseline`` run again) is sent again only when its value
changed: an exact resume recomputes the same value, a baseline with other features does not. A SIGKILL
can still lose what W&B had not written out yet (its offline files are written by a background process). In a
study a run is named by its run id and grouped by the study's name (W&B group, MLflow experiment).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from biopost import durable
from biopost.config import ConfigError
from biopost.runlog import read_metrics

IDS_FILE = "trackers.json"
STORES = ("tensorboard", "wandb", "mlruns", IDS_FILE)  # what trackers keep in a run directory


def check_installed(names: Iterable[str]) -> None:
    """A requested tracker that is not installed is a config error, raised before any model loads."""
    for name in names:  # each tracker's module and biopost extra share its name
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"config error: 'report_to': {name} is not installed; pip install biopost[{name}]")


@dataclass(frozen=True)
class Identity:
    """How a run appears in a tracker: a name, a group (its study), and what it is."""

    name: str
    run_id: str
    task: str
    group: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


def scalars(row: dict[str, Any], task: str) -> dict[str, float]:
    """The scalars of one metrics row, by tag; a row without a numeric value has none.

    >>> scalars({"task": "t", "split": "val", "metric": "accuracy", "value": 0.5, "ci_low": 0.2, "ci_high": 0.8}, "t")
    {'val/accuracy': 0.5, 'val/accuracy_ci_low': 0.2, 'val/accuracy_ci_high': 0.8}
    >>> scalars({"task": "other", "split": "id_test", "metric": "accuracy", "value": 1, "ci_low": None}, "t")
    {'other/id_test/accuracy': 1.0}
    >>> scalars({"split": "train", "metric": "loss", "value": None}, "t")
    {}
    """
    value = row.get("value")
    if not is_number(value):
        return {}
    other = row.get("task")
    tag = f"{row['split']}/{row['metric']}"
    tag = f"{other}/{tag}" if other and other != task else tag
    out = {tag: float(value)}
    for bound in ("ci_low", "ci_high"):
        if is_number(row.get(bound)):
            out[f"{tag}_{bound}"] = float(row[bound])  # beside the tag: MLflow's file store refuses a/b and a/b/c
    return out


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def by_point(rows: list[dict[str, Any]], task: str) -> list[tuple[str, int, dict[str, float]]]:
    """Rows gathered into (stage, step, scalars), in the order they were written."""
    points: dict[tuple[str, int], dict[str, float]] = {}
    for row in rows:
        values = scalars(row, task)
        if values:
            points.setdefault((str(row.get("stage", "run")), int(row.get("step") or 0)), {}).update(values)
    return [(stage, step, values) for (stage, step), values in points.items()]


def last_steps(rows: list[dict[str, Any]], task: str) -> dict[str, int]:
    """``<stage>/<tag>`` -> the last step ``rows`` hold of it.

    >>> last_steps([{"stage": "sft", "step": 2, "split": "val", "metric": "accuracy", "value": 0.5},
    ...             {"stage": "sft", "step": 1, "split": "val", "metric": "accuracy", "value": 0.25}], "t")
    {'sft/val/accuracy': 2}
    """
    out: dict[str, int] = {}
    for stage, step, values in by_point(rows, task):
        out.update({f"{stage}/{tag}": max(step, out.get(f"{stage}/{tag}", -1)) for tag in values})
    return out


def open_trackers(names: Iterable[str], run_dir: Path, identity: Identity) -> list["Tracker"]:
    kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
    names = list(names)
    check_installed(names)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return [kinds[name](Path(run_dir), identity) for name in names]


class Tracker:
    """Receives metrics rows as the run writes them (see :class:`biopost.runlog.RunLog`). ``fresh``: it is also
    sent the rows the run directory held before it was opened."""

    fresh = True

    def __init__(self, run_dir: Path, identity: Identity):
        self.run_dir, self.identity = run_dir, identity

    def write(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def purge(self, stage: str, after_step: int, dropped: list[dict[str, Any]]) -> None:
        """Rows of ``stage`` past ``after_step`` (``dropped``) were dropped from metrics.jsonl (a resumed stage)."""

    def settle(self, stage: str, step: float) -> None:
        """Rows of ``stage`` up to ``step`` are kept for good: a resume of the stage starts after them."""

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError

    def saved(self) -> dict[str, Any]:
        path = self.run_dir / IDS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def saved_id(self, key: str) -> str | None:
        return self.saved().get(key)


class AppendOnlyTracker(Tracker):
    """A tracker that cannot delete points (W&B, MLflow): rows wait until settled, and each ``<stage>/<tag>`` is
    sent each step once, in order, whatever resumes happen between (see the module docstring). Always ``fresh``:
    it is given every row metrics.jsonl holds and sends the ones its tracker run lacks."""

    key = ""  # its name in trackers.json

    def __init__(self, run_dir: Path, identity: Identity):
        super().__init__(run_dir, identity)
        self.pending: list[dict[str, Any]] = []
        self.sent: dict[str, int] = {}  # "<stage>/<tag>" -> the last step the tracker run holds
        self.replaced: dict[tuple[str, int], float] = {}  # ("<stage>/<tag>", step) -> value: sent, then dropped

    def continue_or_start(self, run_id: str, continued: bool) -> None:
        """Record the tracker run now fed; a new one has been sent nothing yet. One continued from before
        trackers.json recorded what it was sent was sent every row as it was written: all metrics.jsonl holds."""
        sent = self.saved().get("sent", {})
        if not continued:
            self.sent = {}
        elif self.key in sent:
            self.sent = dict(sent[self.key])
        else:
            self.sent = last_steps(read_metrics(self.run_dir), self.identity.task)
        self.save_sent(**{self.key: run_id})

    def write(self, rows):
        self.pending.extend(rows)

    def purge(self, stage, after_step, dropped):
        self.pending = [r for r in self.pending if r.get("stage") != stage or (r.get("step") or 0) <= after_step]
        for name, step, values in by_point(dropped, self.identity.task):  # a new value there is sent again
            self.replaced.update({(f"{name}/{tag}", step): v for tag, v in values.items()
                                  if step <= self.sent.get(f"{name}/{tag}", -1)})

    def settle(self, stage, step):
        settled = [r.get("stage") == stage and (r.get("step") or 0) <= step for r in self.pending]
        self.flush([r for r, done in zip(self.pending, settled) if done])
        self.pending = [r for r, done in zip(self.pending, settled) if not done]

    def flush(self, rows: list[dict[str, Any]]) -> None:
        points = []
        for stage, step, values in by_point(rows, self.identity.task):
            new = {tag: v for tag, v in values.items() if self.unsent(f"{stage}/{tag}", step, v)}
            if new:
                points.append((stage, step, new))
                for tag in new:
                    self.sent[f"{stage}/{tag}"] = max(step, self.sent.get(f"{stage}/{tag}", -1))
                    self.replaced.pop((f"{stage}/{tag}", step), None)
        if points:
            self.send(points)
            self.save_sent()

    def save_sent(self, **entries: Any) -> None:
        """trackers.json with this tracker's ``sent`` steps (and ``entries``), read once and written once."""
        saved = self.saved()
        durable.write_json(self.run_dir / IDS_FILE,
                           {**saved, **entries, "sent": {**saved.get("sent", {}), self.key: self.sent}})

    def unsent(self, key: str, step: int, value: float) -> bool:
        """The tracker run lacks this point: a later step, or one sent, dropped and now measured otherwise."""
        if step > self.sent.get(key, -1):
            return True
        old = self.replaced.get((key, step))
        return old is not None and old != value and not (math.isnan(old) and math.isnan(value))

    def send(self, points: list[tuple[str, int, dict[str, float]]]) -> None:
        raise NotImplementedError

    def close(self, failed=False):
        rows, self.pending = self.pending, []
        self.flush(rows)
        self.finish(failed)

    def finish(self, failed: bool) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in ``tensorboard/<stage>/`` (torch's SummaryWriter, read by TensorBoard)."""

    def __init__(self, run_dir: Path, identity: Identity):
        super().__init__(run_dir, identity)
        self.writers: dict[str, Any] = {}
        self.fresh = not (run_dir / "tensorboard").is_dir()

    def writer(self, stage: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        if stage not in self.writers or purge_step is not None:
            if stage in self.writers:
                self.writers[stage].close()
            self.writers[stage] = SummaryWriter(str(self.run_dir / "tensorboard" / stage), purge_step=purge_step)
        return self.writers[stage]

    def write(self, rows):
        for stage, step, values in by_point(rows, self.identity.task):
            writer = self.writer(stage)
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)
        for writer in self.writers.values():
            writer.flush()  # the event files stay as current as metrics.jsonl, even if the process dies

    def purge(self, stage, after_step, dropped):
        self.writer(stage, purge_step=after_step + 1)  # TensorBoard drops this stage's points from there on

    def close(self, failed=False):
        for writer in self.writers.values():
            writer.close()
        self.writers = {}


class WandbTracker(AppendOnlyTracker):
    """A W&B run in ``wandb/``, resumed by its saved id; each stage plotted against its own step."""

    key = "wandb"

    def __init__(self, run_dir: Path, identity: Identity):
        super().__init__(run_dir, identity)
        import wandb

        saved = self.saved_id(self.key)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "biopost"), name=identity.name, group=identity.group,
            id=saved, resume="allow", dir=str(run_dir), config={**identity.config, "run_id": identity.run_id},
            tags=[identity.task], reinit="create_new",
            settings=wandb.Settings(console="off"),  # the run's output already goes to its log; leave stdout be
        )
        self.continue_or_start(self.run.id, continued=saved == self.run.id)
        self.stages: set[str] = set()

    def send(self, points):
        for stage, step, values in points:
            if stage not in self.stages:
                self.run.define_metric(f"{stage}/step", hidden=True)
                self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self.stages.add(stage)
            self.run.log({**{f"{stage}/{tag}": v for tag, v in values.items()}, f"{stage}/step": step})

    def finish(self, failed):
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker(AppendOnlyTracker):
    """An MLflow run (a file store in ``mlruns/`` unless MLFLOW_TRACKING_URI says otherwise)."""

    key = "mlflow"
    BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(self, run_dir: Path, identity: Identity):
        super().__init__(run_dir, identity)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow keeps its file store in maintenance mode behind this switch; a database store would
            # cost every run a schema migration (~20 s on a CPU) for a few hundred numbers
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        run_id = self.saved_id(self.key)
        if run_id:
            try:
                self.run_id = self.client.get_run(run_id).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")  # a failed or killed attempt's run goes on
                self.continue_or_start(self.run_id, continued=True)
                return
            except MlflowException:  # the store was moved or cleared: start a new tracker run
                pass
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or identity.group or identity.name
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        tags = {"biopost.run_id": identity.run_id, "biopost.task": identity.task}
        if identity.group:
            tags["biopost.study"] = identity.group
        self.run_id = self.client.create_run(experiment_id, run_name=identity.name, tags=tags).info.run_id
        params = [Param(k, v) for k, v in flatten(identity.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.continue_or_start(self.run_id, continued=False)

    def send(self, points):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(f"{stage}/{tag}"), value, now, step)
                   for stage, step, values in points for tag, value in values.items()]
        for start in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + self.BATCH])

    def finish(self, failed):
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def mlflow_key(name: str) -> str:
    """MLflow allows letters, digits and ``_-. :/`` in names.

    >>> mlflow_key("sft/val/accuracy_pass@4")
    'sft/val/accuracy_pass_4'
    """
    return re.sub(r"[^\w\-. :/]", "_", name)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` (MLflow params are flat strings of at most 6000 characters).

    >>> flatten({"model": {"lora": {"rank": 4}}, "stages": [{"kind": "sft"}], "name": "x"})
    {'model.lora.rank': '4', 'stages.0.kind': 'sft', 'name': 'x'}
    """
    out: dict[str, str] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list)) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[mlflow_key(name)] = json.dumps(value)[:6000] if not isinstance(value, str) else value[:6000]
    return out
