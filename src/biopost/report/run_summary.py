"""One run at a glance: the metric per stage, step and split, as a table and as ID/OOD curves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from biopost.runlog import read_metrics

SPLIT_ORDER = ["val", "id_test", "ood_val", "ood_test", "heldout"]


def metric_table(run_dir: Path, metric: str = "accuracy") -> pd.DataFrame:
    """Rows: (stage, step); columns: splits; values: ``metric`` (perplexity for CPT rows)."""
    rows = [r for r in read_metrics(run_dir) if r["split"] != "train"
            and (r["metric"] == metric or (r["split"] == "heldout" and r["metric"] == "perplexity"))]
    if not rows:
        raise ValueError(f"{run_dir}: no evaluation rows for metric {metric!r} in metrics.jsonl")
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index=["stage_index", "stage", "step"], columns="split", values="value", aggfunc="first")
    table = table[[s for s in SPLIT_ORDER if s in table.columns]].rename(columns={"heldout": "heldout_ppl"})
    return table.reset_index(level="stage_index", drop=True)


def plot_curves(run_dir: Path, metric: str = "accuracy", out: Path | None = None) -> Path:
    """ID and OOD ``metric`` along the whole pipeline (x = steps, stages laid end to end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame([r for r in read_metrics(run_dir) if r["metric"] == metric and r["split"] != "train"])
    if frame.empty:
        raise ValueError(f"{run_dir}: no evaluation rows for metric {metric!r}")
    offsets, offset = {}, 0
    for (index, stage), rows in frame.groupby(["stage_index", "stage"], sort=True):
        offsets[stage] = offset
        offset += rows["step"].max()
    frame["x"] = frame["step"] + frame["stage"].map(offsets)
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, rows in frame.groupby("split"):
        rows = rows.sort_values("x")
        ax.plot(rows["x"], rows["value"], marker="o", label=split)
        if rows["ci_low"].notna().any():
            ax.fill_between(rows["x"], rows["ci_low"], rows["ci_high"], alpha=0.15)
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
