"""Start a run from the prefix it shares with an earlier run of its study (see biopost.study.plan).

The run's directory is filled with what the run would have written itself up to the shared point, taken
from the donor's directory: the complete earlier stages, then, for a stage shared up to step ``b``, its
evaluation checkpoints, predictions and metrics rows up to ``b`` (only at the steps this run evaluates
at), its ``selection.json`` recomputed from those val rows alone, and the donor's resumable snapshot at
``b``. The pipeline's ordinary resume then trains the rest. ``branched_from.json`` is written last: a
directory without it is an interrupted copy and is made again. Experiment trackers are not copied: the
run's own tracker runs start with the copied rows (see biopost.runlog).

Paths inside a run directory are recorded relative to the file holding them, so copies need no rewriting.
The model directories beside the stages (the built backbone, merged bases under ``merged/``) are written
once and never changed, so a branch hard-links their files instead of copying them: a study of many runs
keeps one copy on disk, and each run directory still stands alone (it can be moved or kept by itself).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from biopost import durable
from biopost.runlog import read_metrics
from biopost.stages.context import val_history, write_selection
from biopost.study.plan import PlannedRun
from biopost.trackers import STORES as TRACKER_STORES

MARKER = "branched_from.json"
RUN_FILES = {"stages", "predictions", "metrics.jsonl", "DONE", "config.yaml", "env.json", MARKER, "attempts",
             ".lock", ".lock.json"}
NOT_COPIED = shutil.ignore_patterns("snapshots", "trainer", "resume", "resume.*", ".tmp-*")


def snapshot_dir(donor_dir: Path, run: PlannedRun) -> Path:
    k, b = run.branch
    return stage_dir(donor_dir, run, k) / "snapshots" / f"step-{b:06d}"


def stage_dir(run_dir: Path, run: PlannedRun, index: int) -> Path:
    return Path(run_dir) / "stages" / f"{index}-{run.stages[index]['name']}"


def materialise(donor_dir: Path, run_dir: Path, run: PlannedRun) -> bool:
    """Copy ``run``'s shared prefix from ``donor_dir`` into ``run_dir``; False if the donor lacks the snapshot."""
    k, b = run.branch
    if b and not (snapshot_dir(donor_dir, run) / "snapshot.json").is_file():
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for entry in donor_dir.iterdir():  # the backbone built for the run, merged bases, split sizes (not trackers)
        if entry.name not in RUN_FILES and entry.name not in TRACKER_STORES:
            share(entry, run_dir / entry.name)
    for index in range(k):
        shutil.copytree(stage_dir(donor_dir, run, index), stage_dir(run_dir, run, index), ignore=NOT_COPIED)
    keep = kept_steps(run)
    if b:
        copy_partial_stage(stage_dir(donor_dir, run, k), stage_dir(run_dir, run, k), snapshot_dir(donor_dir, run), keep)
    rows = [r for r in read_metrics(donor_dir) if keep_row(r, k, b, keep)]
    durable.write_lines(run_dir / "metrics.jsonl", [json.dumps({**r, "run_id": run.id}) for r in rows])
    copy_predictions(donor_dir / "predictions", run_dir / "predictions", run, k, b, keep)
    for index in range(k + (1 if b else 0)):
        reselect(stage_dir(donor_dir, run, index), stage_dir(run_dir, run, index),
                 [r for r in rows if r["stage_index"] == index], run.config.task.name)
    (run_dir / MARKER).write_text(json.dumps({"donor": run.donor, "stage_index": k, "step": b}, indent=2))
    return True


def kept_steps(run: PlannedRun):
    """Whether this run itself evaluates stage ``branch[0]`` at a step: at 0, every ``eval_every``, at its end."""
    k, _ = run.branch
    if k >= len(run.stages):
        return lambda step: True
    info, stage = run.stages[k], run.config.stages[k]
    every, total = info["eval_every"], info["steps"]
    return lambda step: (step == 0 and getattr(stage, "eval_at_start", True)) or step == total or (
        step > 0 and every and step % every == 0)


def keep_row(row: dict, k: int, b: int, keep) -> bool:
    index = row["stage_index"]
    if index < k:
        return True
    if index > k or not b or row["step"] > b:
        return False
    return row["split"] == "train" or keep(row["step"])


def copy_partial_stage(src: Path, dst: Path, snapshot: Path, keep) -> None:
    dst.mkdir(parents=True)
    step = json.loads((snapshot / "snapshot.json").read_text())["step"]
    for entry in src.iterdir():
        if entry.name == "checkpoints":
            for ckpt in entry.iterdir():
                at = int(ckpt.name.split("-")[1])
                if at <= step and keep(at):
                    shutil.copytree(ckpt, dst / "checkpoints" / ckpt.name)
    restore_to = json.loads((snapshot / "snapshot.json").read_text())["restore_to"]
    shutil.copytree(snapshot / "state", dst / restore_to)


def copy_predictions(src: Path, dst: Path, run: PlannedRun, k: int, b: int, keep) -> None:
    if not src.is_dir():
        return
    earlier = {s["name"] for s in run.stages[:k]}
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        stage, _, rest = file.name.rpartition("-step")  # <stage>-step<NNNNNN>-<split>.jsonl
        step = int(rest.split("-")[0])
        partial = b and k < len(run.stages) and stage == run.stages[k]["name"] and step <= b and keep(step)
        if stage in earlier or partial:
            shutil.copy2(file, dst / file.name)


def reselect(src: Path, dst: Path, rows: list[dict], task: str) -> None:
    """``selection.json`` from this run's own val rows of its ``task`` (the donor's may have seen later steps)."""
    chosen = src / "selection.json"
    if not chosen.is_file():
        return
    metric = json.loads(chosen.read_text())["metric"]
    history = val_history(rows, metric, task)
    if history:
        write_selection(dst, metric, history)


def share(src: Path, dst: Path) -> None:
    """A model directory written once (backbone, ``merged/``) as hard links; files are copied."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link_or_copy, ignore=shutil.ignore_patterns(".*"))
    else:
        shutil.copy2(src, dst)


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed there
        shutil.copy2(src, dst)
