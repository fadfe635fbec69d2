"""One run at a glance: the metric per stage, step and split, as a table and as ID/OOD curves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from biopost.study.results import run_table

SPLIT_ORDER = ["val", "id_test", "ood_val", "ood_test", "heldout"]


def evaluation_rows(run_dir: Path) -> pd.DataFrame:
    """The run's table (:func:`run_table`, as the report reads it) less training rows, with a ``column``
    label: the split, or ``<task> <split>`` for another task's rows."""
    table = run_table(run_dir)
    frame = table[table["split"] != "train"].copy()
    if frame.empty:
        raise ValueError(f"{run_dir}: no evaluation rows in metrics.jsonl")
    own = table.attrs["own_task"]
    frame["column"] = frame["split"].where(frame["task"] == own, frame["task"] + " " + frame["split"])
    return frame


def metric_table(run_dir: Path, metric: str = "accuracy") -> pd.DataFrame:
    """Rows: (stage, step); columns: splits (the run's task's, then other tasks'); values: ``metric``, and
    perplexity for CPT's held-out documents and the forgetting corpora (``general/<name>``)."""
    frame = evaluation_rows(run_dir)
    corpus = frame["split"].eq("heldout") | frame["split"].str.startswith("general/")
    frame = frame[frame["metric"].eq(metric) | (corpus & frame["metric"].eq("perplexity"))]
    if frame.empty:
        raise ValueError(f"{run_dir}: no evaluation rows for metric {metric!r} in metrics.jsonl")
    table = frame.pivot_table(index=["stage_index", "stage", "step"], columns="column", values="value", aggfunc="first")
    order = [s for s in SPLIT_ORDER if s in table.columns] + sorted(c for c in table.columns if c not in SPLIT_ORDER)
    table = table[order].rename(columns=lambda c: f"{c}_ppl" if c == "heldout" or c.startswith("general/") else c)
    return table.rename_axis(columns="split").reset_index(level="stage_index", drop=True)


def plot_curves(run_dir: Path, metric: str = "accuracy", out: Path | None = None) -> Path:
    """ID and OOD ``metric`` along the whole pipeline (x = steps, stages laid end to end)."""
    import matplotlib.pyplot as plt

    from biopost.report.figures import COLORS  # the report's ID / OOD colours (and the Agg backend)

    frame = evaluation_rows(run_dir)
    frame = frame[frame["metric"] == metric]
    if frame.empty:
        raise ValueError(f"{run_dir}: no evaluation rows for metric {metric!r}")
    offsets, offset = {}, 0
    for (index, stage), rows in frame.groupby(["stage_index", "stage"], sort=True):
        offsets[stage] = offset
        offset += rows["step"].max()
    frame["x"] = frame["step"] + frame["stage"].map(offsets)
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, rows in frame.groupby("column"):
        rows = rows.sort_values("x")
        line, = ax.plot(rows["x"], rows["value"], marker="o", label=split, color={**COLORS, "val": "#777777"}.get(split))
        if rows["ci_low"].notna().any():
            ax.fill_between(rows["x"], rows["ci_low"], rows["ci_high"], alpha=0.15, color=line.get_color())
    for stage, start in offsets.items():
        ax.axvline(start, color="grey", lw=0.5)
        ax.text(start, 1.01, stage, transform=ax.get_xaxis_transform(), fontsize=8)
    ax.set_xlabel("training step (stages end to end)")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    out = Path(out or Path(run_dir) / f"curves-{metric}.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
