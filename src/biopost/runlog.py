"""The run directory's data files: ``metrics.jsonl`` (one JSON object per line) and ``predictions/``.

Every number a report compares is written here as data, never scraped from logs. Experiment trackers
(``report_to``) get each row as it is written here, the one place every stage writes through (those that cannot
delete a point once a resume can no longer drop it: see :meth:`RunLog.settle`). Rows are appended whole and
fsynced; a line torn by a kill is dropped on the next read or append (see biopost.durable).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from biopost.trackers import Tracker

from biopost import durable

DONE = "DONE"  # written in a run (or stage) directory once it has finished

class RunLog:
    """Appends rows to ``metrics.jsonl`` (each with the ``common`` fields) and sends them to ``trackers``.

    Use it as a context manager when it has trackers: leaving closes them (marked failed on an exception).
    ``writer=False``: a log that reads the run's rows but writes nothing (the non-main processes of a
    distributed run, whose rows the main process writes).
    """

    def __init__(self, run_dir: Path, common: dict[str, Any] | None = None, trackers: list[Tracker] = (),
                 writer: bool = True):
        self.run_dir = Path(run_dir)
        self.writer = writer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.common = dict(common or {})
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.trackers = list(trackers)
        backlog = [t for t in self.trackers if t.fresh]
        if backlog:  # rows from before the tracker existed: a prefix copied from a donor run, an earlier attempt
            rows = read_metrics(self.run_dir)
            for tracker in backlog:
                tracker.write(rows)

    def write(self, rows: list[dict[str, Any]], sync: bool = True) -> None:
        """``sync=False``: per-step training rows, made durable by the next synced write (see
        ``durable.append_lines``); a resumed stage redoes the steps after its checkpoint and drops their rows."""
        if not self.writer:
            return
        rows = [{**self.common, **row} for row in rows]
        durable.append_lines(self.metrics_path, [json.dumps(row) for row in rows], sync=sync)
        for tracker in self.trackers:
            tracker.write(rows)

    def drop_rows(self, stage: str, after_step: int = -1) -> list[dict[str, Any]]:
        """Forget a stage's rows past ``after_step`` (an interrupted attempt is redone from there)."""
        rows = read_metrics(self.run_dir)
        kept = [r for r in rows if r.get("stage") != stage or r.get("step", 0) <= after_step]
        if not self.writer:  # the writer's rewrite is atomic: before or after it, these are the rows kept
            return [r for r in kept if r.get("stage") == stage]
        durable.write_lines(self.metrics_path, [json.dumps(row) for row in kept])
        dropped = [r for r in rows if r.get("stage") == stage and r.get("step", 0) > after_step]
        if dropped:
            for tracker in self.trackers:
                tracker.purge(stage, after_step, dropped)
        self.settle(stage, after_step)  # the attempt goes on from there: the rows kept stay
        return [r for r in kept if r.get("stage") == stage]

    def settle(self, stage: str, step: float = math.inf) -> None:
        """Rows of ``stage`` up to ``step`` stay whatever happens next (a resumable state at ``step`` is saved;
        no ``step``: the stage is done): trackers that cannot delete points are sent them now."""
        for tracker in self.trackers:
            tracker.settle(stage, step)

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)
        self.trackers = []

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(failed=kind is not None)

    def write_predictions(self, name: str, records: list[dict[str, Any]]) -> Path:
        path = self.run_dir / "predictions" / f"{name}.jsonl"
        if not self.writer:
            return path
        return durable.write_lines(path, [json.dumps(record) for record in records])


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return durable.read_jsonl(Path(run_dir) / "metrics.jsonl")

