"""The run directory's data files: ``metrics.jsonl`` (one JSON object per line) and ``predictions/``.

Every number a report compares is written here as data, never scraped from logs. Rows are appended whole
and fsynced; a line torn by a kill is dropped on the next read or append (see biopost.durable).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from biopost import durable

DONE = "DONE"  # written in a run (or stage) directory once it has finished

class RunLog:
    def __init__(self, run_dir: Path, common: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.common = dict(common or {})
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def write(self, rows: list[dict[str, Any]]) -> None:
        durable.append_lines(self.metrics_path, [json.dumps({**self.common, **row}) for row in rows])

    def drop_rows(self, stage: str, after_step: int = -1) -> list[dict[str, Any]]:
        """Forget a stage's rows past ``after_step`` (an interrupted attempt is redone from there)."""
        rows = read_metrics(self.run_dir)
        kept = [r for r in rows if r.get("stage") != stage or r.get("step", 0) <= after_step]
        durable.write_lines(self.metrics_path, [json.dumps(row) for row in kept])
        return [r for r in kept if r.get("stage") == stage]

    def write_predictions(self, name: str, records: list[dict[str, Any]]) -> Path:
        path = self.run_dir / "predictions" / f"{name}.jsonl"
        return durable.write_lines(path, [json.dumps(record) for record in records])


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return durable.read_jsonl(Path(run_dir) / "metrics.jsonl")

