"""``biopost demo``: the embedded study (``configs/studies/demo.yaml``) run end to end on a CPU laptop, offline.

Three modalities on real data shipped in Python packages (PBMC cell types, JASPAR transcription-factor
classes, modlamp antimicrobial peptides), tiny models built in-process: the base model, SFT at several
lengths, RL from a short and a long SFT, CPT before SFT->RL (transcriptomics), a fused DNA encoder against
DNA as text (genomics), and the classical baselines, planned with shared prefixes and run two at a time.
It is an ordinary study directory: a rerun continues where the last one stopped, and
``biopost study collect DIR`` / ``biopost report DIR`` work on it. It ends with one table (per task: ID and OOD
accuracy after each stage) and the report.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pandas as pd

from biopost.config import ConfigError

PRESET = Path(__file__).resolve().parents[2] / "configs" / "studies" / "demo.yaml"
SEED_AXIS = ("seed", "stages.*.seed")  # the preset's zip group that --seeds replaces
# the run seed and the stage seeds, in the base or the zip group (split, eval and corpus seeds are left alone)
SEED_OVERRIDE = re.compile(r"base\.(stages\.[^.]+\.)?seed|zip\.\d+\.(stages\.\*\.)?seed")
SPLITS = {"id_test": "ID", "ood_test": "OOD"}
STAGE_LABELS = {"eval": "base model", "baseline": "baseline", "cpt": "CPT", "rl": "RL"}


def demo_study(seeds: int = 1, overrides: list[str] = (), preset: Path = PRESET):
    """The preset with its seed group set to seeds 0..N-1 (run and stage seeds together) and dotted overrides."""
    from biopost.config import read_yaml
    from biopost.study.config import study_from_dict

    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if not preset.is_file():
        raise ConfigError(f"the demo preset {preset} is missing: run biopost demo from a clone of the repository "
                          "(pip install -e .)")
    for item in overrides:  # --seeds replaces the seed group: an override of a seed would be silently lost
        key = item.split("=", 1)[0]
        if SEED_OVERRIDE.fullmatch(key):
            raise ConfigError(f"{key}: the demo's run and stage seeds are set by --seeds N (seeds 0..N-1); drop the "
                              f"override, or run `biopost study run` on a copy of {preset.name} to choose seeds")
    raw = read_yaml(preset, overrides, "study")
    groups = [g for g in raw.get("zip", []) if set(g) == set(SEED_AXIS)]
    if len(groups) != 1:
        raise ConfigError(f"{preset}: the demo needs exactly one zip group over {' and '.join(SEED_AXIS)}")
    groups[0].update({axis: list(range(seeds)) for axis in SEED_AXIS})
    return study_from_dict(raw, preset.parent)


def run_demo(output_dir: Path, seeds: int = 1, overrides: list[str] = (), executor: str = "ray",
             preset: Path = PRESET) -> dict:
    """Plan (or resume), run, collect; returns the summary table, the report path, failures and costs."""
    from biopost.study.execute import Resources, execute
    from biopost.study.plan import prepare
    from biopost.study.results import write_results

    output_dir = Path(output_dir)
    started = time.perf_counter()
    study = demo_study(seeds, overrides, preset)
    plan = prepare(study, output_dir)
    print(plan.tree())
    # one torch thread per run whatever the executor: tiny models gain nothing from more, and a seed then gives
    # the same numbers on any machine; Ray runs as many runs side by side as there are cores
    failed = execute(plan, output_dir, executor, Resources(cpus=1))
    _, _, table, unfinished = write_results(output_dir)
    summary = summarize(table)
    (output_dir / "summary.txt").write_text(format_summary(summary) + "\n")
    report = write_demo_report(output_dir)
    return {"summary": summary, "report": report, "failed": failed, "unfinished": unfinished,
            "wall_s": time.perf_counter() - started, "runs_cpu_s": runs_cpu_seconds(output_dir, plan)}


def write_demo_report(study_dir: Path) -> Path:
    """The study's HTML report (and its Markdown twin), drawn from the results table."""
    from biopost.report import write_report

    return write_report(study_dir)


def runs_cpu_seconds(study_dir: Path, plan) -> float:
    """CPU seconds the runs recorded (``logs/<run>.cost.json``, last attempt of each run), whichever invocation
    ran them: after a resume this counts runs an earlier invocation finished, so it is no share of this one's wall."""
    total = 0.0
    for run in plan.runs:
        cost = Path(study_dir) / "logs" / f"{run.id}.cost.json"
        if cost.is_file():
            total += json.loads(cost.read_text())["cpu_s"]
    return total


# ---------------------------------------------------------------- the terminal table
def arm_label(rows: pd.DataFrame, stage_index: int) -> str:
    """What a run had done by the end of ``stage_index``: 'SFT 8 ep -> RL', 'fused: SFT 1 ep', 'base model'."""
    stages = rows[rows["stage_index"] <= stage_index].drop_duplicates("stage_index").sort_values("stage_index")
    parts = []
    for _, row in stages.iterrows():
        if row["stage_kind"] == "sft":
            epochs = row.get("stages.sft.epochs")
            parts.append(f"SFT {epochs:g} ep" if pd.notna(epochs) else "SFT")
        else:
            parts.append(STAGE_LABELS.get(row["stage_kind"], str(row["stage"])))
    label = " -> ".join(parts)
    return f"fused: {label}" if str(rows["pipeline"].iloc[0]).startswith("fused") else label


def summarize(table: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Per task and arm: ID and OOD ``metric`` at the end of each stage, mean over seeds with its spread (the
    seeds' standard deviation, or the bootstrap 95% half-width for one seed). Runs that repeat another's
    prefix (SFT alone and SFT before RL) give one line."""
    rows = table[(table["metric"] == metric) & table["split"].isin(list(SPLITS))].copy()
    if rows.empty:
        raise ValueError(f"no {metric} rows on {', '.join(SPLITS)} in the results")
    rows = rows[rows["task"] == rows["task.name"]] if "task.name" in rows else rows  # not forgetting rows
    stages_of = {run_id: run_rows for run_id, run_rows in table.groupby("run_id", sort=False)}  # CPT has no accuracy
    finals = []
    for run_id, run_rows in rows.groupby("run_id", sort=False):
        for index, stage_rows in run_rows.groupby("stage_index"):
            last = stage_rows[stage_rows["step"] == stage_rows["step"].max()]
            arm, order = arm_label(stages_of[run_id], index), order_of(stages_of[run_id], index)
            for _, row in last.iterrows():
                finals.append({"task": row["task"], "arm": arm, "seed": row.get("seed"), "split": SPLITS[row["split"]],
                               "value": row["value"], "half": (row["ci_high"] - row["ci_low"]) / 2, "order": order})
    frame = pd.DataFrame(finals).drop_duplicates(["task", "arm", "seed", "split"])
    grouped = frame.groupby(["task", "arm", "split"], sort=False)
    out = grouped.agg(mean=("value", "mean"), sd=("value", "std"), half=("half", "mean"), seeds=("value", "size"),
                      order=("order", "first")).reset_index()
    out["spread"] = out["sd"].where(out["seeds"] > 1, out["half"])
    wide = out.pivot_table(index=["task", "order", "arm"], columns="split", values=["mean", "spread", "seeds"])
    wide.columns = [f"{split} {what}" for what, split in wide.columns]
    return wide.reset_index().sort_values(["task", "order", "arm"]).drop(columns="order").reset_index(drop=True)


def spread_text(spread) -> str:
    """``0.05``, or `` n/a`` where there is none (one seed scored on one example: no interval)."""
    return " n/a" if spread is None or pd.isna(spread) else f"{spread:4.2f}"


def order_of(run_rows: pd.DataFrame, stage_index: int) -> tuple:
    """Lines within a task: references first, then text arms by SFT length and depth, then CPT, then fused."""
    kinds = run_rows.drop_duplicates("stage_index").sort_values("stage_index")
    kinds = list(kinds[kinds["stage_index"] <= stage_index]["stage_kind"])
    group = 0 if kinds[-1] in ("eval", "baseline") else 3 if str(run_rows["pipeline"].iloc[0]).startswith("fused") \
        else 2 if "cpt" in kinds else 1
    epochs = run_rows["stages.sft.epochs"].iloc[0] if "stages.sft.epochs" in run_rows else None
    return (group, 0.0 if pd.isna(epochs) else float(epochs), len(kinds))


def format_summary(summary: pd.DataFrame) -> str:
    """The table printed at the end of the demo."""
    several = summary.filter(like="seeds").max().max() > 1
    spread = "sd over seeds" if several else "95% CI half-width"
    lines = [f"accuracy after each stage (test splits; ± {spread})"]
    width = max(len(a) for a in summary["arm"]) + 2
    for task, rows in summary.groupby("task", sort=False):
        lines.append(f"\n{task:<{width + 2}}{'ID':>13}{'OOD':>13}")
        for _, row in rows.iterrows():
            cells = "".join(f"{row[f'{s} mean']:>7.2f} ±{spread_text(row.get(f'{s} spread'))}"
                            if pd.notna(row.get(f"{s} mean")) else f"{'':>13}" for s in SPLITS.values())
            lines.append(f"  {row['arm']:<{width}}{cells}")
    return "\n".join(lines)


def default_executor() -> str:
    """Ray when it is installed and there are two cores or more (runs side by side), else one at a time."""
    from importlib.util import find_spec

    return "ray" if find_spec("ray") is not None and (os.cpu_count() or 1) > 1 else "local"
