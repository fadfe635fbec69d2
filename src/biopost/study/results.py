"""One tidy results table for a study, from its runs' ``metrics.jsonl`` and config files only (no logs).

``biopost study collect STUDY_DIR`` writes ``results.parquet`` and ``results.csv``: one row per number a
run recorded (an evaluation of one metric on one split at one step, or a training-loss / reward row).

Columns, in order:

- ``run_id``: the run's content hash (its directory ``runs/<run_id>``).
- one column per study axis, named by its dotted field (``stages.sft.max_steps``, ``model.backbone``,
  ``seed``...): the value the run has (read from its config), empty where the run lacks that stage.
  Lists and mappings are JSON text.
- ``pipeline``: the arm (stage composition) name. ``blocks``: the blocks the run belongs to, joined by
  ``;``. ``budget``: the budget split as ``a:b`` weights, empty outside budget blocks; ``budget.<stage>``:
  the amount given to that stage (in the budget's unit). ``shared_from``: the run whose prefix it copied.
- ``task``, ``task_version``: the task the row was scored on (another task's for cross-task forgetting rows).
- ``stage``, ``stage_index``, ``stage_kind``: where in the pipeline; ``step`` (optimizer steps within the
  stage; RL: rollout steps; interpolate: the point's index), ``epoch``; ``alpha``: the interpolation weight of
  an ``interpolate`` stage's point (empty elsewhere).
- ``split``: ``val``, ``id_test``, ``ood_val``, ``ood_test``, ``heldout`` (CPT perplexity), ``general/<name>``
  (forgetting-corpus perplexity) or ``train``.
- ``metric``, ``value``; ``ci_low``, ``ci_high``: bootstrap 95% interval of the mean (empty where not
  computed); ``n``: examples (tokens for ``heldout``); ``num_samples``: completions per example.
- ``split_fingerprint``: fingerprint of the whole split the row's examples come from (the study refuses a
  run whose fingerprints differ from the study's); ``eval_fingerprint``: of the examples actually scored
  (a seeded subset when ``eval.max_examples`` caps it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from biopost import durable
from biopost.config import yaml12
from biopost.runlog import DONE, read_metrics
from biopost.study.plan import Plan, PlannedRun, task_key

ROW_FIELDS = ["task", "task_version", "stage", "stage_index", "stage_kind", "step", "epoch", "alpha", "split",
              "metric", "value", "ci_low", "ci_high", "n", "num_samples", "split_fingerprint", "eval_fingerprint"]


def load_plan(study_dir: Path) -> Plan:
    path = Path(study_dir) / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{study_dir} has no plan.json: run `biopost study run STUDY --output-dir {study_dir}`")
    return Plan.from_json(json.loads(path.read_text()))


def collect(study_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """The table of every finished run, and the ids of runs not finished (left out)."""
    study_dir = Path(study_dir)
    plan = load_plan(study_dir)
    budget_stages = sorted({s for r in plan.runs for s in r.budget_amounts})
    records, unfinished = [], []
    for run in plan.runs:
        run_dir = study_dir / "runs" / run.id
        if not (run_dir / DONE).is_file():
            unfinished.append(run.id)
            continue
        expected = plan.tasks.get(task_key(run.config), {}).get("fingerprints")
        rows = read_metrics(run_dir)
        check_fingerprints(run, run_dir, expected, rows)
        labels = run_labels(run, budget_stages)
        records += [{**labels, **r} for r in run_records(rows, [s.kind for s in run.config.stages])]
    columns = ["run_id", *plan.runs[0].axes, "pipeline", "blocks", "budget", *[f"budget.{s}" for s in budget_stages],
               "shared_from", *ROW_FIELDS] if plan.runs else ["run_id", *ROW_FIELDS]
    return as_table(records, columns), unfinished


def check_fingerprints(run: PlannedRun, run_dir: Path, expected: dict | None, rows: list[dict]) -> None:
    """Refuse a run whose splits are not the study's (changed data or split settings)."""
    saved = json.loads((run_dir / "splits.json").read_text())["fingerprints"]
    if expected is not None and saved != expected:
        differ = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
        raise ValueError(f"run {run.id}: split fingerprints differ from the study's ({', '.join(differ)}); "
                         f"its data or split changed since the plan: rerun it or remove runs/{run.id}")
    for row in rows:  # rows of other tasks (forgetting checks) carry those tasks' fingerprints
        if row.get("task") == run.config.task.name and row.get("split_fingerprints") not in (None, saved):
            raise ValueError(f"run {run.id}: metrics.jsonl holds rows scored on other splits than splits.json")


def run_labels(run: PlannedRun, budget_stages: list[str]) -> dict:
    axes = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in run.axes.items()}
    return {"run_id": run.id, **axes, "pipeline": run.pipeline, "blocks": ";".join(run.blocks), "budget": run.budget,
            **{f"budget.{s}": run.budget_amounts.get(s) for s in budget_stages}, "shared_from": run.donor}


def as_table(records: list[dict], columns: list[str]) -> pd.DataFrame:
    """Records as a table whose intervals are numbers, empty (NaN) where a row has none, even in a column
    with no interval at all (every point scored on one example, or ``eval.bootstrap: 0``)."""
    table = pd.DataFrame.from_records(records, columns=columns)
    return table.astype({"ci_low": float, "ci_high": float})


def run_records(rows: list[dict], kinds: list[str]) -> list[dict]:
    """A run's metrics rows as table columns (``kinds``: its stages' kinds in order); three columns are
    derived, the rest copied as recorded. The one place a run's rows become table rows."""
    return [{**{f: row.get(f) for f in ROW_FIELDS},
             "stage_kind": kinds[row["stage_index"]] if 0 <= row.get("stage_index", -1) < len(kinds) else row.get("stage"),
             "split_fingerprint": (row.get("split_fingerprints") or {}).get(row.get("split")),
             "eval_fingerprint": row.get("fingerprint")} for row in rows]


def run_table(run_dir: Path) -> pd.DataFrame:
    """One run directory's table, the study table's columns less the study's labels: `biopost summary`,
    `biopost report` on a run and ``collect`` all build a run's rows through :func:`run_records`."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl rows; give a run directory (biopost train ... --output-dir DIR)")
    config = yaml12().load((run_dir / "config.yaml").read_text())
    kinds = [s["kind"] for s in config["stages"]]
    run_id = next((r["run_id"] for r in rows if r.get("run_id")), run_dir.name)
    table = as_table([{"run_id": run_id, **r} for r in run_records(rows, kinds)], ["run_id", *ROW_FIELDS])
    table.attrs["own_task"] = config["task"]["name"]
    return table


def write_results(study_dir: Path) -> tuple[Path, Path, pd.DataFrame, list[str]]:
    """Write ``results.parquet`` (pyarrow) and ``results.csv`` into the study directory."""
    table, unfinished = collect(study_dir)
    parquet, csv = Path(study_dir) / "results.parquet", Path(study_dir) / "results.csv"
    with durable.replacing(parquet) as tmp:
        table.to_parquet(tmp, engine="pyarrow", index=False)
    with durable.replacing(csv) as tmp:
        table.to_csv(tmp, index=False)
    return parquet, csv, table, unfinished
