"""What a report reads: the results table of a study (``study collect``'s) or of one run (``summary``'s), and
from it the evaluation points, each run's final and best-on-val point, and the curves the sections draw."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from biopost.study.results import collect, load_plan, run_table

ID, OOD, OOD_VAL = "id_test", "ood_test", "ood_val"
SPLITS = ["val", ID, OOD_VAL, OOD]
LENGTH_FIELDS = ("max_steps", "epochs", "steps")  # axes that set a stage's length, not what it is


@dataclass
class ReportData:
    """The table and where each run's directory (its ``predictions/``) lives."""

    directory: Path
    kind: str  # "study" or "run"
    table: pd.DataFrame
    axes: list[str]
    run_dirs: dict[str, Path]
    own_task: dict[str, str]  # run id -> the task it trains on (other tasks' rows are forgetting checks)
    unfinished: list[str] = field(default_factory=list)
    metric_override: str | None = None
    fused: set[str] = field(default_factory=set)  # runs whose model reads sequences through an encoder

    @property
    def tasks(self) -> list[str]:
        return sorted(set(self.own_task.values()))

    def varied_axes(self) -> list[str]:
        """Axes with more than one value among the finished runs (a constant axis labels nothing)."""
        runs = self.table.drop_duplicates("run_id")
        return [a for a in self.axes if runs[a].dropna().astype(str).nunique() > 1]

    def primary_metric(self, task: str) -> str:
        """The metric checkpoints were selected on (``selection.json``), else ``accuracy``."""
        if self.metric_override:
            return self.metric_override
        for run_id, own in self.own_task.items():
            for path in sorted((self.run_dirs[run_id] / "stages").glob("*/selection.json")) if own == task else []:
                return json.loads(path.read_text())["metric"]
        return "accuracy"


def load(directory: Path, metric: str | None = None) -> ReportData:
    """A study directory (has ``plan.json``) or one run directory (has ``metrics.jsonl``)."""
    directory = Path(directory)
    if (directory / "plan.json").is_file():
        table, unfinished = collect(directory)
        if table.empty:
            raise ValueError(f"{directory}: no finished run to report on; run `biopost study run {directory}` first")
        plan = load_plan(directory)
        axes = list(plan.runs[0].axes) if plan.runs else []
        done = set(table["run_id"])
        return ReportData(directory, "study", table, axes,
                          {r.id: directory / "runs" / r.id for r in plan.runs if r.id in done},
                          {r.id: r.config.task.name for r in plan.runs if r.id in done}, unfinished, metric,
                          {r.id for r in plan.runs if r.id in done and r.config.model.encoders})
    if (directory / "metrics.jsonl").is_file():
        table = run_table(directory)
        run_id = table["run_id"].iloc[0]
        table["pipeline"] = "+".join(dict.fromkeys(table.loc[table["stage_index"] >= 0, "stage"]))
        return ReportData(directory, "run", table, [], {run_id: directory}, {run_id: table.attrs["own_task"]},
                          [], metric)
    raise FileNotFoundError(f"{directory} is neither a study directory (plan.json) nor a run directory "
                            f"(metrics.jsonl): give the --output-dir of `biopost study run` or `biopost train`")


def points(data: ReportData, task: str, metric: str) -> pd.DataFrame:
    """One row per evaluation point of a run on its own ``task``: ``val``, ``id_test``, ``ood_test`` values with
    ``<split>_lo`` / ``<split>_hi`` (bootstrap 95%) and ``<split>_n``. Baseline points have ``stage_index`` -1."""
    t = data.table
    own = t["run_id"].map(data.own_task) == task
    rows = t[own & (t["task"] == task) & (t["metric"] == metric) & t["split"].isin(SPLITS)]
    keys = ["run_id", "stage_index", "stage", "stage_kind", "step"]
    wide = rows.pivot_table(index=keys, columns="split", values=["value", "ci_low", "ci_high", "n"], aggfunc="first")
    out = pd.DataFrame(index=wide.index)
    for split in SPLITS:
        for col, name in (("value", split), ("ci_low", f"{split}_lo"), ("ci_high", f"{split}_hi"), ("n", f"{split}_n")):
            out[name] = wide[(col, split)] if (col, split) in wide.columns else np.nan
    extra = rows.groupby(keys)[["epoch", "alpha"]].first()
    out = out.join(extra).reset_index()
    out = out[out[[s for s in SPLITS]].notna().any(axis=1)]
    return out.sort_values(["run_id", "stage_index", "step"]).reset_index(drop=True)


def trained(pts: pd.DataFrame) -> pd.DataFrame:
    return pts[pts["stage_index"] >= 0]


def final_points(pts: pd.DataFrame) -> pd.DataFrame:
    """Each run's last evaluation point (its last stage's last step)."""
    return trained(pts).groupby("run_id", sort=False).tail(1).set_index("run_id")


def best_on_val(pts: pd.DataFrame) -> pd.DataFrame:
    """Each run's point with the highest ``val`` value (ties: the earliest), the way stages select."""
    rows = trained(pts).dropna(subset=["val"]).copy()
    rows["order"] = range(len(rows))
    rows = rows.sort_values(["run_id", "val", "order"], ascending=[True, False, True])
    return rows.groupby("run_id", sort=False).head(1).drop(columns="order").set_index("run_id")


def run_info(data: ReportData, pts: pd.DataFrame) -> pd.DataFrame:
    """Per run: its stage kinds in order, its SFT length (steps, epochs), whether RL started cold (no stage
    before it), the share of a fixed budget given to SFT, and its varied axis values."""
    t = data.table[data.table["stage_index"] >= 0]
    runs = data.table.drop_duplicates("run_id").set_index("run_id")
    info = pd.DataFrame(index=pd.Index(sorted(set(trained(pts)["run_id"])), name="run_id"))
    stages = t.drop_duplicates(["run_id", "stage_index"]).sort_values("stage_index")
    info["kinds"] = stages.groupby("run_id")["stage_kind"].agg(tuple).reindex(info.index)
    sft = trained(pts)[trained(pts)["stage_kind"] == "sft"].groupby("run_id").tail(1).set_index("run_id")
    info["sft_steps"], info["sft_epochs"] = sft["step"], sft["epoch"]
    info["rl_cold"] = [k is not None and "rl" in k and k.index("rl") == 0 for k in info["kinds"]]
    budget_cols = [c for c in runs.columns if c.startswith("budget.")]
    if budget_cols:
        amounts = runs.loc[info.index, budget_cols].astype(float)
        share = amounts.get("budget.sft")
        info["sft_share"] = share / amounts.sum(axis=1) if share is not None else np.nan
        info["budget"] = runs.loc[info.index, "budget"]
    else:
        info["sft_share"], info["budget"] = np.nan, None
    for axis in data.axes:
        info[axis] = runs.loc[info.index, axis]
    info["pipeline"] = runs.loc[info.index, "pipeline"]
    info["arm"] = [FUSED if r in data.fused else CPT if "cpt" in (k or ()) else TEXT
                   for r, k in zip(info.index, info["kinds"])]
    return info


TEXT, FUSED, CPT = "text", "fused", "CPT"  # arms: how a run's model reads the task, and whether CPT came first
ARM_ORDER = {TEXT: 0, CPT: 1, FUSED: 2}


def replicate_axes(axes: list[str]) -> list[str]:
    """Seed axes: repeats of the same study (a replicate to summarise over), never a condition to pick from."""
    return [a for a in axes if a == "seed" or a.endswith(".seed")]


def describe(info: pd.DataFrame, run_id: str, axes: list[str], skip=()) -> str:
    """A short label of a run from its varied axes (those in ``skip`` left out)."""
    row = info.loc[run_id]
    parts = [f"{a.removeprefix('stages.')}={fmt_value(row[a])}" for a in axes if a not in skip and not is_missing(row[a])]
    if isinstance(row.get("budget"), str) and row["budget"]:
        parts.append(f"budget {row['budget']}")
    return ", ".join(parts) or str(row["pipeline"] or run_id)


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA or value == ""


def fmt_value(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def length_axis(axis: str, stage: str) -> bool:
    return axis.startswith(f"stages.{stage}.") and axis.rsplit(".", 1)[-1] in LENGTH_FIELDS


def sft_group(data: ReportData, pts: pd.DataFrame, info: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """SFT's evaluation points, and the runs whose SFT stages are alike except their length and seed: the same
    arm, stages before SFT, non-length axes of SFT and of the model / task, and budget (axes of later stages
    do not touch SFT's points). Among such groups, the one with the most SFT lengths (ties: the text arm)."""
    sft_pts = trained(pts)[trained(pts)["stage_kind"] == "sft"]
    if sft_pts.empty:
        return sft_pts, []
    seeds = replicate_axes(data.axes)
    alike = [a for a in data.axes if not length_axis(a, "sft") and a not in seeds
             and (not a.startswith("stages.") or a.startswith("stages.sft."))]
    groups: dict[tuple, list[str]] = {}
    for run_id in sft_pts["run_id"].unique():
        row = info.loc[run_id]
        before = row["kinds"][: row["kinds"].index("sft")]
        key = (row["arm"], before, str(row.get("budget")), *(fmt_value(row[a]) for a in alike))
        groups.setdefault(key, []).append(run_id)
    best = max(groups.items(), key=lambda kv: (info.loc[kv[1], "sft_steps"].nunique(), -ARM_ORDER[kv[0][0]]))[1]
    return sft_pts, best


def seed_of(info: pd.DataFrame, run_id: str, seeds: list[str]) -> tuple:
    """A run's seed values, numbers ordered as numbers."""
    values = [info.loc[run_id, a] for a in seeds]
    return tuple((0, float(v), "") if isinstance(v, (int, float)) and not is_missing(v) else (1, 0.0, str(v))
                 for v in values)


def per_length(runs: list[str], info: pd.DataFrame) -> dict:
    """One run per SFT length: the one with the fewest stages (identical SFT points either way)."""
    chosen: dict = {}
    for run_id in sorted(runs, key=lambda r: (info.loc[r, "sft_steps"], len(info.loc[r, "kinds"]), r)):
        chosen.setdefault(info.loc[run_id, "sft_steps"], run_id)
    return chosen


def length_points(sft_pts: pd.DataFrame, runs: list[str], info: pd.DataFrame) -> pd.DataFrame:
    """SFT's step 0 (the model it starts from) and each length's last SFT point, one run per length."""
    chosen = per_length(runs, info)
    finals = [sft_pts[sft_pts["run_id"] == r].tail(1) for r in chosen.values()]
    first = sft_pts[sft_pts["run_id"] == next(iter(chosen.values()))].head(1)
    return pd.concat([first, *finals]).drop_duplicates(["run_id", "stage_index", "step"]).reset_index(drop=True)


def sft_curve(data: ReportData, pts: pd.DataFrame, info: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """ID and OOD against SFT length, and how it was drawn. Across runs when the study varies SFT length
    among runs that otherwise train SFT alike (each run's last SFT point, plus SFT's step 0, the model it
    started from), of the first seed when there are several; else along the SFT stage of the run with the
    most SFT evaluations."""
    sft_pts, best = sft_group(data, pts, info)
    if sft_pts.empty:
        return sft_pts, ""
    arm = info.loc[best[0], "arm"]
    if info.loc[best, "sft_steps"].nunique() >= 2:
        seeds = replicate_axes(data.axes)
        first_seed = min(seed_of(info, r, seeds) for r in best)
        runs = [r for r in best if seed_of(info, r, seeds) == first_seed]
        curve = length_points(sft_pts, runs, info)
        of_seed = f", {describe(info, runs[0], seeds)}" if seeds and len({seed_of(info, r, seeds) for r in best}) > 1 \
            else ""
        how = (f"the {arm} arm's runs{of_seed}: each run's last SFT evaluation, one run per SFT length, and SFT's "
               f"step 0 (the model it starts from)")
        return curve, how
    counts = sft_pts.groupby("run_id").size()
    run_id = min(counts.index, key=lambda r: (ARM_ORDER[info.loc[r, "arm"]], -counts[r], len(info.loc[r, "kinds"]), r))
    curve = sft_pts[sft_pts["run_id"] == run_id]
    return curve.reset_index(drop=True), f"the SFT stage's evaluations along run {run_id} ({info.loc[run_id, 'arm']} arm)"


def sft_spread(data: ReportData, pts: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame | None:
    """The SFT-length curve over every seed: per point (step 0 and each length), the number of seeds and each
    split's mean, standard deviation, min and max across seeds. ``None`` with one seed or no length axis."""
    sft_pts, best = sft_group(data, pts, info)
    seeds = replicate_axes(data.axes)
    if sft_pts.empty or not seeds or info.loc[best, "sft_steps"].nunique() < 2:
        return None
    by_seed: dict[tuple, list[str]] = {}
    for run_id in best:
        by_seed.setdefault(seed_of(info, run_id, seeds), []).append(run_id)
    if len(by_seed) < 2:
        return None
    curves = [length_points(sft_pts, runs, info).assign(length=lambda c: c["step"]) for runs in by_seed.values()]
    every = pd.concat(curves)
    out = every.groupby("length").agg(step=("step", "first"), epoch=("epoch", "first"), seeds=("run_id", "size"))
    for split in SPLITS:
        stats = every.groupby("length")[split].agg(["mean", "std", "min", "max"])
        for col in stats:
            out[f"{split}_{col}"] = stats[col]
    return out.reset_index(drop=True)


def x_of(curve: pd.DataFrame) -> tuple[pd.Series, str]:
    """SFT epochs where every point records them, else optimizer steps."""
    if curve["epoch"].notna().all():
        return curve["epoch"].astype(float), "SFT epochs"
    return curve["step"].astype(float), "SFT optimizer steps"


def rl_curves(data: ReportData, pts: pd.DataFrame, info: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """RL evaluation points per starting point (label -> points, with an ``arm`` column), the run with most RL
    points per start. A start is its SFT length, its arm (text, fused, CPT) and the other axes varied among
    this task's runs (the seed among them), so runs of different arms or seeds are separate curves."""
    rl_pts = trained(pts)[trained(pts)["stage_kind"] == "rl"]
    varied = [a for a in data.axes if not length_axis(a, "rl") and not length_axis(a, "sft")
              and info[a].dropna().astype(str).nunique() > 1]
    curves: dict[str, pd.DataFrame] = {}
    for run_id, rows in rl_pts.groupby("run_id", sort=True):
        row = info.loc[run_id]
        before = row["kinds"][row["kinds"].index("rl") - 1] if not row["rl_cold"] else None
        # warm means started from SFT; RL straight after another stage (CPT) is labelled by that stage
        start = ("cold (from the base model)" if row["rl_cold"] else
                 f"after {before.upper()}" if before != "sft" else "warm" + (
                     f" (after SFT {int(row['sft_steps'])} steps)" if not is_missing(row["sft_steps"]) else ""))
        label = f"{start}, {row['arm']} arm"
        if varied or (isinstance(row.get("budget"), str) and row["budget"]):
            label += f", {describe(info, run_id, varied)}"
        if label not in curves or len(rows) > len(curves[label]):
            curves[label] = rows.reset_index(drop=True).assign(arm=row["arm"])
    return dict(sorted(curves.items(), key=lambda kv: (ARM_ORDER[kv[1]["arm"].iloc[0]], kv[0])))


def arm_comparison(data: ReportData, pts: pd.DataFrame, info: pd.DataFrame, arms=(TEXT, FUSED)) -> pd.DataFrame:
    """ID and OOD of two arms at equal SFT length, after SFT and at the run's end (after RL), mean over seeds:
    one row per (SFT steps, checkpoint, arm) with ``seeds``, the splits' means and their spread across seeds
    (``<split>_sd``, or the bootstrap interval with one seed). Empty unless both arms have an SFT length in common."""
    runs = info[info["arm"].isin(arms) & info["sft_steps"].notna()]
    common = set.intersection(*(set(runs.loc[runs["arm"] == a, "sft_steps"]) for a in arms)) if len(runs) else set()
    rows, seeds = [], replicate_axes(data.axes)
    for run_id in runs.index[runs["sft_steps"].isin(common)]:
        run_pts = trained(pts)[trained(pts)["run_id"] == run_id]
        sft = run_pts[run_pts["stage_kind"] == "sft"]
        ends = {"after SFT": sft.iloc[-1]} if len(sft) else {}
        if run_pts.iloc[-1]["stage_kind"] != "sft":
            ends[f"after {run_pts.iloc[-1]['stage']}"] = run_pts.iloc[-1]
        for checkpoint, p in ends.items():
            rows.append({"run_id": run_id, "seed": seed_of(info, run_id, seeds), "sft_steps": int(runs.loc[run_id, "sft_steps"]), "checkpoint": checkpoint,
                         "arm": runs.loc[run_id, "arm"], **{k: p.get(k) for k in p.index if k.startswith(("id_", "ood_"))}})
    if not rows:
        return pd.DataFrame()
    # a run that stops after SFT and one that continues to RL share their SFT point: count it once per seed
    frame = pd.DataFrame(rows).drop_duplicates(["sft_steps", "checkpoint", "arm", "seed"])
    out = frame.groupby(["sft_steps", "checkpoint", "arm"], sort=True).agg(
        seeds=("run_id", "size"), runs=("run_id", ", ".join),
        **{f"{s}{suffix}": (f"{s}{suffix}", "mean") for s in (ID, OOD) for suffix in ("", "_lo", "_hi")},
        **{f"{s}_sd": (s, "std") for s in (ID, OOD)})
    return out.reset_index()


def baseline(pts: pd.DataFrame) -> pd.Series | None:
    rows = pts[pts["stage"] == "baseline"]
    return None if rows.empty else rows.iloc[0]


def pareto_front(frame: pd.DataFrame, x: str = ID, y: str = OOD) -> pd.DataFrame:
    """Points no other point beats on both ``x`` and ``y`` (ties kept), sorted by ``x``.

    >>> f = pd.DataFrame({"id_test": [0.1, 0.5, 0.4, 0.9], "ood_test": [0.8, 0.5, 0.4, 0.2]})
    >>> pareto_front(f)["id_test"].tolist()
    [0.1, 0.5, 0.9]
    """
    rows = frame.dropna(subset=[x, y])
    keep = [not ((rows[x] >= r[x]) & (rows[y] >= r[y]) & ((rows[x] > r[x]) | (rows[y] > r[y]))).any()
            for _, r in rows.iterrows()]
    return rows[keep].sort_values(x)
