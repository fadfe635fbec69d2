"""The report's plots (matplotlib, Agg). One colour for ID and one for OOD in every figure."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ID_COLOR, OOD_COLOR = "#0072B2", "#D55E00"  # blue / vermillion: apart for colour-blind readers too
COLORS = {"id_test": ID_COLOR, "ood_test": OOD_COLOR}
NAMES = {"id_test": "ID (id_test)", "ood_test": "OOD (ood_test)"}
STAGE_COLORS = {"eval": "#555555", "cpt": "#009E73", "sft": "#56B4E9", "rl": "#CC79A7", "interpolate": "#E69F00"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # legends placed outside the axes stay in
    plt.close(fig)
    return buf.getvalue()


def band(ax, x, rows: pd.DataFrame, split: str, **kwargs):
    """A split's values as a line with its 95% interval as a band."""
    ax.plot(x, rows[split], color=COLORS[split], marker=kwargs.pop("marker", "o"), label=kwargs.pop("label", NAMES[split]),
            **kwargs)
    if rows[f"{split}_lo"].notna().any():
        ax.fill_between(x, rows[f"{split}_lo"], rows[f"{split}_hi"], color=COLORS[split], alpha=0.15, lw=0)


def reference_lines(ax, base, splits=("id_test", "ood_test")):
    """The classical baseline's ID and OOD as dashed lines in the splits' colours."""
    if base is None:
        return
    for split in splits:
        if not pd.isna(base.get(split)):
            ax.axhline(base[split], color=COLORS[split], ls="--", lw=1, label=f"baseline {NAMES[split].split()[0]}")


def finish(ax, xlabel: str, ylabel: str, title: str):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)


def sft_length(curve: pd.DataFrame, x: pd.Series, unit: str, metric: str, base) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    x = x.to_numpy()
    for split in ("id_test", "ood_test"):
        band(ax, x, curve, split)
    peak = int(curve["ood_test"].to_numpy().argmax())
    ax.plot(x[peak], curve["ood_test"].iloc[peak], marker="*", ms=16, color=OOD_COLOR, mec="black", ls="none",
            label="OOD peak")
    ax.annotate(f"OOD peak {curve['ood_test'].iloc[peak]:.2f}", (x[peak], curve["ood_test"].iloc[peak]),
                textcoords="offset points", xytext=(6, 8), fontsize=8, color=OOD_COLOR)
    reference_lines(ax, base)
    finish(ax, unit, metric, f"ID and OOD {metric} against SFT length (bands: 95% CI)")
    ax.set_ylim(bottom=0)
    return png(fig)


def sft_length_seeds(spread: pd.DataFrame, x: pd.Series, unit: str, metric: str, base) -> bytes:
    """Mean across seeds as the line, the lowest to the highest seed as the band."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    x = x.to_numpy()
    for split in ("id_test", "ood_test"):
        ax.errorbar(x, spread[f"{split}_mean"], yerr=spread[f"{split}_std"].fillna(0), color=COLORS[split], marker="o",
                    capsize=3, label=f"{NAMES[split]}, mean ± sd")
        ax.fill_between(x, spread[f"{split}_min"], spread[f"{split}_max"], color=COLORS[split], alpha=0.15, lw=0)
    reference_lines(ax, base)
    seeds = int(spread["seeds"].max())
    finish(ax, unit, metric, f"ID and OOD {metric} against SFT length over {seeds} seeds (bands: min to max)")
    ax.set_ylim(bottom=0)
    return png(fig)


def arms(rows: pd.DataFrame, metric: str, base) -> bytes:
    """Per SFT length and checkpoint, each arm's ID and OOD as bars (hatched: fused)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    groups = list(dict.fromkeys(zip(rows["sft_steps"], rows["checkpoint"])))
    names = list(dict.fromkeys(rows["arm"]))
    width = 0.8 / len(names)
    for ax, split in zip(axes, ("ood_test", "id_test")):
        for k, arm in enumerate(names):
            mine = rows[rows["arm"] == arm].set_index(["sft_steps", "checkpoint"]).reindex(groups)
            several = mine["seeds"].max() > 1
            err = (mine[f"{split}_sd"].to_numpy() if several else
                   np.vstack([mine[split] - mine[f"{split}_lo"], mine[f"{split}_hi"] - mine[split]]))
            ax.bar(np.arange(len(groups)) + (k - (len(names) - 1) / 2) * width, mine[split], width,
                   color=COLORS[split], alpha=1 - 0.45 * k, hatch="//" if arm == "fused" else None,
                   yerr=None if np.isnan(np.asarray(err, dtype=float)).all() else err, capsize=3, label=f"{arm} arm")
        ax.set_xticks(range(len(groups)), [f"SFT {s} steps\n{c}" for s, c in groups], fontsize=8)
        reference_lines(ax, base, (split,))
        finish(ax, "", metric, f"{NAMES[split]}: fused against text at equal SFT length")
    return png(fig)


def rl_steps(curves: dict[str, pd.DataFrame], metric: str, base) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, ("ood_test", "id_test")):
        for i, (label, rows) in enumerate(curves.items()):
            ls = ":" if label.startswith("cold") else "-"
            ax.plot(rows["step"], rows[split], color=COLORS[split], marker=MARKERS[i % len(MARKERS)], ls=ls,
                    alpha=1 - 0.5 * i / max(1, len(curves)), label=label)
            if rows[f"{split}_lo"].notna().any():
                ax.fill_between(rows["step"], rows[f"{split}_lo"], rows[f"{split}_hi"], color=COLORS[split],
                                alpha=0.08, lw=0)
        reference_lines(ax, base, (split,))
        finish(ax, "RL step", metric, f"{NAMES[split]} across RL, per starting point (bands: 95% CI)")
    return png(fig)


def id_ood_scatter(pts: pd.DataFrame, front: pd.DataFrame, metric: str, base) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 5))
    for kind, rows in pts.groupby("stage_kind"):
        ax.scatter(rows["id_test"], rows["ood_test"], s=22, alpha=0.75, color=STAGE_COLORS.get(kind, "#999999"),
                   label=f"{kind} checkpoints", edgecolor="none")
    ax.plot(front["id_test"], front["ood_test"], color="black", lw=1.2, marker="o", mfc="none", ms=8,
            label="Pareto front")
    if base is not None:
        ax.scatter([base["id_test"]], [base["ood_test"]], marker="X", s=80, color="black", label="baseline")
    lims = [0, max(1e-9, np.nanmax(pts[["id_test", "ood_test"]].to_numpy()) * 1.05)]
    ax.plot(lims, lims, color="grey", lw=0.6, ls=":", label="ID = OOD")
    finish(ax, f"ID {metric} (id_test)", f"OOD {metric} (ood_test)", "Every checkpoint: ID against OOD")
    ax.xaxis.label.set_color(ID_COLOR)
    ax.yaxis.label.set_color(OOD_COLOR)
    return png(fig)


def budget(rows: pd.DataFrame, metric: str, base) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    rows = rows.sort_values("sft_share")
    x = rows["sft_share"].to_numpy() * 100
    for split in ("id_test", "ood_test"):
        err = np.vstack([rows[split] - rows[f"{split}_lo"], rows[f"{split}_hi"] - rows[split]])
        ax.errorbar(x, rows[split], yerr=None if np.isnan(err).all() else err, color=COLORS[split], marker="o",
                    capsize=3, label=NAMES[split])
    reference_lines(ax, base)
    finish(ax, "share of the budget given to SFT (%)", metric, "Fixed budget split between SFT and RL (final point)")
    ax.set_ylim(bottom=0)
    return png(fig)


def rank_matrix(matrices: dict[str, pd.DataFrame], metric: str) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (split, m) in zip(axes, matrices.items()):
        cmap = "Blues" if split == "id_test" else "Oranges"
        top = max(1e-9, np.nanmax(m.to_numpy(dtype=float)))
        image = ax.imshow(m.to_numpy(dtype=float), cmap=cmap, vmin=0, vmax=top)
        ax.set_xticks(range(len(m.columns)), [str(c) for c in m.columns])
        ax.set_yticks(range(len(m.index)), [str(i) for i in m.index])
        for (i, j), v in np.ndenumerate(m.to_numpy(dtype=float)):
            ax.text(j, i, "not run" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9,
                    color="grey" if np.isnan(v) else "white" if v > 0.6 * top else "black")  # legible on dark cells
        ax.set_xlabel("RL LoRA rank")
        ax.set_ylabel("SFT LoRA rank")
        ax.set_title(f"{NAMES[split]} {metric}, final point", fontsize=10, color=COLORS[split])
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return png(fig)


def cpt(ppl: dict[str, pd.DataFrame], downstream: pd.DataFrame | None, metric: str) -> bytes:
    panels = 2 if downstream is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for i, (label, rows) in enumerate(ppl.items()):
        ax.plot(rows["step"], rows["value"], color="#009E73", marker=MARKERS[i % len(MARKERS)], label=label)
    ax.set_yscale("log")
    finish(ax, "CPT step", "held-out perplexity (log)", "CPT held-out perplexity")
    if downstream is not None:
        ax = axes[0][1]
        x = np.arange(len(downstream))
        for k, split in enumerate(("id_test", "ood_test")):
            err = np.vstack([downstream[split] - downstream[f"{split}_lo"], downstream[f"{split}_hi"] - downstream[split]])
            ax.bar(x + (k - 0.5) * 0.38, downstream[split], 0.38, color=COLORS[split], label=NAMES[split],
                   yerr=None if np.isnan(err).all() else err, capsize=3)
        ax.set_xticks(x, downstream["label"], fontsize=8)
        finish(ax, "", metric, "Final point with and without CPT")
    fig.tight_layout()
    return png(fig)


def interpolation(curves: dict[str, pd.DataFrame], ppl: dict[str, pd.DataFrame], metric: str, base) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (label, rows) in enumerate(curves.items()):
        suffix = f" {label}" if len(curves) > 1 else ""
        for split in ("id_test", "ood_test"):
            band(ax, rows["alpha"].astype(float).to_numpy(), rows, split, marker=MARKERS[i % len(MARKERS)],
                 label=NAMES[split] + suffix)
    reference_lines(ax, base)
    finish(ax, "interpolation weight a  ((1 - a) * start + a * end)", metric, "ID and OOD along the interpolation")
    ax.set_ylim(bottom=0)
    if ppl:
        twin = ax.twinx()
        for i, (name, rows) in enumerate(ppl.items()):
            twin.plot(rows["alpha"].astype(float), rows["value"], color="#555555", ls="--",
                      marker=MARKERS[i % len(MARKERS)], ms=4, label=f"{name} perplexity")
        twin.set_ylabel("forgetting perplexity (grey, dashed)")
        handles = [h for a in (ax, twin) for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    return png(fig)
