"""The study's findings, each tested on the data: holds, does not hold, or cannot tell, with the numbers, the
paired difference over the same test examples (or interval overlap where per-example records are missing)
and the runs the verdict rests on. No text here is written before the numbers are known."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from biopost.report import data as d
from biopost.report.examples import Difference, compare

HOLDS, FAILS, UNSURE = "holds", "does not hold", "cannot tell"


@dataclass
class Finding:
    title: str
    verdict: str
    text: str
    runs: list[str] = field(default_factory=list)

    def body(self) -> str:
        return self.text + (f" Runs: {', '.join(self.runs)}." if self.runs else "")

    def paragraph(self) -> str:
        return f"{self.verdict.capitalize()}. {self.body()}"


def value(point, split: str) -> str:
    """``0.812 [0.750, 0.870]``: a point's value with its bootstrap 95% interval; ``1.000 [n/a: n=1]`` where one
    example gives no interval (see ``biopost.evaluation.bootstrap_ci``); the bare value for a metric without one."""
    v, lo, hi, n = point[split], point.get(f"{split}_lo"), point.get(f"{split}_hi"), point.get(f"{split}_n")
    if lo is None or pd.isna(lo):
        return f"{v:.3f} [n/a: n={int(n)}]" if n is not None and not pd.isna(n) and n < 2 else f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def sft_peak(curve: pd.DataFrame, x: pd.Series, unit: str, run_dirs, metric: str, how: str) -> Finding:
    """SFT raises ID while OOD peaks early and then falls: the peak is chosen on ``ood_val`` where every point has
    it, else on ``ood_test`` itself with both tests widened (Bonferroni over the checkpoints it was chosen among);
    holding needs OOD's rise from the start to the peak and its fall from the peak to the end both beyond noise."""
    title = "SFT raises ID while OOD peaks early, then falls"
    runs = list(dict.fromkeys(curve["run_id"])) if len(curve) else []
    if len(curve) < 3:
        return Finding(title, UNSURE, f"The SFT curve has {len(curve)} evaluation point(s); a peak and a fall need "
                                      f"at least 3 (start, peak, end).", runs)
    curve, x = curve.reset_index(drop=True), x.reset_index(drop=True)
    first, last, end_i = curve.iloc[0], curve.iloc[-1], len(curve) - 1
    at = lambda i: f"{x[i]:g} {unit.removeprefix('SFT ')}"  # noqa: E731
    id_rise = compare(run_dirs, first, last, d.ID, metric)
    on_val = d.OOD_VAL in curve and curve[d.OOD_VAL].notna().all()
    # choosing the peak on the split it is then tested on favours a peak: correct for the len(curve) candidates
    level = 0.95 if on_val else 1 - 0.05 / len(curve)
    peak_i = int(curve[d.OOD_VAL if on_val else d.OOD].to_numpy().argmax())
    peak = curve.iloc[peak_i]
    chosen = ("The OOD peak was chosen on ood_val and tested on ood_test." if on_val else
              f"The OOD peak was chosen on ood_test itself (no ood_val), so OOD's rise and fall are tested at "
              f"{level:.1%} (Bonferroni over {len(curve)} checkpoints; table intervals stay 95%).")
    head = (f"Drawn from {how}. ID {metric} went from {value(first, d.ID)} at {at(0)} to {value(last, d.ID)} at "
            f"{at(end_i)}: {id_rise.text()}. {chosen} ")
    rise = compare(run_dirs, first, peak, d.OOD, metric, level) if peak_i > 0 else None
    fall = compare(run_dirs, peak, last, d.OOD, metric, level) if peak_i < end_i else None
    if fall is None:
        text = (f"OOD was highest at the longest SFT, {value(last, d.OOD)} at {at(peak_i)}, from {value(first, d.OOD)} "
                f"at {at(0)}: {rise.text()}; it did not fall after a peak.")
        return Finding(title, FAILS if rise.sign > 0 else UNSURE,
                       head + text + ("" if rise.sign > 0 else " Its rise is within noise, so neither shape is shown."),
                       runs)
    text = (f"OOD peaked at {value(peak, d.OOD)} at {at(peak_i)} and ended at {value(last, d.OOD)} at "
            f"{at(end_i)}: {fall.text()}.")
    if rise is not None:
        text += f" From the start ({value(first, d.OOD)} at {at(0)}) to the peak: {rise.text()}."
    if rise is None or (rise.sign <= 0 and fall.sign < 0):
        verdict = FAILS if fall.sign < 0 else UNSURE
        text += (" OOD was highest before any SFT" if rise is None else " OOD's rise to the peak is within noise"
                 if rise.sign == 0 else " OOD fell to the peak") + (
            ": SFT never raised it." if fall.sign < 0 else ", and its fall is within noise.")
    elif id_rise.sign < 0:
        verdict = FAILS
        text += " ID fell, so SFT did not raise ID."
    elif rise.sign > 0 and fall.sign < 0 and id_rise.sign > 0:
        verdict = HOLDS
    else:
        verdict = UNSURE
        text += (" The rise to the peak is within noise." if rise.sign <= 0 else
                 " The fall from the peak is within noise." if fall.sign >= 0 else " The rise of ID is within noise.")
    return Finding(title, verdict, head + text, runs)


def rl_recovers(curves: dict[str, pd.DataFrame], run_dirs, metric: str) -> Finding:
    """RL from a strong SFT checkpoint raises OOD (warm start); the cold start is reported beside it."""
    title = "RL from a strong SFT checkpoint raises OOD"
    warm = {k: c for k, c in curves.items() if k.startswith("warm") and len(c) >= 2}
    warm = {k: c for k, c in warm.items() if c["arm"].iloc[0] == d.TEXT} or warm  # the plain text arm first
    if not warm:
        return Finding(title, UNSURE, "No RL started from SFT: no run has an RL stage right after SFT with at least "
                                      "two evaluations (RL from the base model or after CPT is not a warm start).")
    # the strongest start: highest val (selection uses val only), then the longest RL
    label = max(warm, key=lambda k: (np.nan_to_num(warm[k].iloc[0]["val"], nan=-1), len(warm[k])))
    curve = warm[label]
    start, end = curve.iloc[0], curve.iloc[-1]
    gain = compare(run_dirs, start, end, d.OOD, metric)
    id_change = compare(run_dirs, start, end, d.ID, metric)
    text = (f"From the strongest SFT start on val ({label}, val {value(start, 'val')}), OOD {metric} went from "
            f"{value(start, d.OOD)} at RL step 0 to {value(end, d.OOD)} at step {int(end['step'])}: {gain.text()}; "
            f"ID changed by {id_change.text()}.")
    if gain.sign > 0 and len(curve) > 2:
        early = (curve.iloc[1][d.OOD] - start[d.OOD]) / gain.value
        text += f" The first evaluation (step {int(curve.iloc[1]['step'])}) holds {early:.0%} of that gain."
    others = []
    for k, c in curves.items():
        if k != label and len(c) >= 2:
            diff = compare(run_dirs, c.iloc[0], c.iloc[-1], d.OOD, metric)
            others.append(f"{k}: {value(c.iloc[0], d.OOD)} to {value(c.iloc[-1], d.OOD)} ({diff.value:+.3f}, "
                          f"CI {diff.low:+.3f} to {diff.high:+.3f})")
    if others:
        text += " Other RL curves (OOD, start to end): " + "; ".join(others) + "."
    verdict = HOLDS if gain.sign > 0 else FAILS if gain.sign < 0 else UNSURE
    if verdict == UNSURE:
        text += " The change is within noise."
    runs = [curve.iloc[0]["run_id"]] + [c.iloc[0]["run_id"] for k, c in curves.items() if k != label]
    return Finding(title, verdict, text, list(dict.fromkeys(runs)))


# a relative change of held-out perplexity smaller than this is "cannot tell": perplexity has no interval
PPL_NOISE = 0.05


def perplexity_change(ppl: pd.DataFrame) -> tuple[str | None, list[str]]:
    """Held-out perplexity along CPT in every run: lowered (a fall over ``PPL_NOISE`` relative in each run),
    raised (a rise over it in each), else None; and a sentence per run."""
    moves, parts = [], []
    for run_id, rows in ppl.groupby("run_id", sort=True):
        first, last = rows.iloc[0], rows.iloc[-1]
        rel = (last["value"] - first["value"]) / first["value"]
        moves.append(-1 if rel < -PPL_NOISE else 1 if rel > PPL_NOISE else 0)
        parts.append(f"{run_id}: {first['value']:.2f} at CPT step {int(first['step'])} to {last['value']:.2f} at step "
                     f"{int(last['step'])} ({rel:+.1%}, n={int(last['n'])} tokens)")
    move = "lowered" if all(m < 0 for m in moves) else "raised" if all(m > 0 for m in moves) else None
    return move, parts


def cpt_helps(table: pd.DataFrame, pts: pd.DataFrame, info: pd.DataFrame, axes: list[str], run_dirs,
              metric: str) -> Finding:
    """CPT lowers held-out perplexity and makes later SFT / RL better, especially OOD: in every run with CPT
    and every matched pair (with CPT, without), with a perplexity change counted only past ``PPL_NOISE``."""
    title = "CPT lowers held-out perplexity and helps downstream, especially OOD"
    ppl = table[(table["split"] == "heldout") & (table["metric"] == "perplexity")].sort_values(["run_id", "step"])
    parts, runs, ppl_verdict, down_verdict = [], [], None, UNSURE
    if ppl.empty:
        parts.append("No run recorded CPT held-out perplexity.")
    else:
        move, per_run = perplexity_change(ppl)
        ppl_verdict = HOLDS if move == "lowered" else FAILS if move == "raised" else UNSURE
        parts.append("Held-out perplexity along CPT (no interval is recorded for perplexity, so a relative change "
                     f"under {PPL_NOISE:.0%} counts as noise): " + "; ".join(per_run) + ".")
        if ppl_verdict == UNSURE:
            parts.append("Perplexity did not move the same way beyond noise in every run.")
        runs += sorted(ppl["run_id"].unique())
    pairs = cpt_pairs(info, axes)
    if not pairs:
        parts.append("No run without CPT matches a run with it (same stages after CPT, same other axes), so its "
                     "downstream effect cannot be measured here.")
    else:
        down_verdict, text = within_groups([(without, with_cpt) for with_cpt, without in pairs], pts, run_dirs, metric,
                                           lambda r: f"{r} ({'with' if 'cpt' in info.loc[r, 'kinds'] else 'without'} CPT)")
        parts.append("At the end of the pipeline, with CPT against without. " + text)
        runs += [r for p in pairs for r in p]
    verdict = (FAILS if FAILS in (ppl_verdict, down_verdict) else
               HOLDS if down_verdict == HOLDS and ppl_verdict in (HOLDS, None) else UNSURE)
    return Finding(title, verdict, " ".join(parts), list(dict.fromkeys(runs)))


def cpt_pairs(info: pd.DataFrame, axes: list[str]) -> list[tuple[str, str]]:
    """(run with CPT, run without) pairs: the same stages after CPT and the same axes outside CPT's."""
    others = [a for a in axes if not a.startswith("stages.cpt.")]
    key = lambda r: (tuple(k for k in info.loc[r, "kinds"] if k != "cpt"),  # noqa: E731
                     *(d.fmt_value(info.loc[r, a]) for a in others), str(info.loc[r, "budget"]))
    without = {key(r): r for r in info.index if "cpt" not in info.loc[r, "kinds"]}
    return [(r, without[key(r)]) for r in info.index if "cpt" in info.loc[r, "kinds"] and key(r) in without]


# run_info's columns that describe a run's pipeline rather than set an axis of it
DERIVED = ("sft_steps", "sft_epochs", "rl_cold", "sft_share", "budget", "pipeline")


def matched_groups(info: pd.DataFrame, compared: list[str], skip=(), keep=()) -> list[pd.DataFrame]:
    """Runs equal on every varied column of ``info`` other than ``compared`` and ``skip`` (their stages included;
    of ``DERIVED``, only those in ``keep``), as groups with 2+ distinct values of ``compared``: a comparison within
    one changes only ``compared``."""
    ignored = {*compared, *skip, *(set(DERIVED) - set(keep))}
    other = [c for c in info.columns if c not in ignored and info[c].map(d.fmt_value).nunique() > 1]
    key = info[other].apply(lambda r: tuple(map(d.fmt_value, r)), axis=1) if other else pd.Series(0, index=info.index)
    return [g for _, g in info.groupby(key, sort=True) if len(g[compared].drop_duplicates()) > 1]


def within_groups(groups: list[tuple[str, str]], pts: pd.DataFrame, run_dirs, metric: str, describe) -> tuple[str, str]:
    """The verdict over matched (worse-by-the-statement, better) run pairs: it holds / does not hold only where
    it does so in every group; the text gives each group's numbers."""
    finals, parts, signs = d.final_points(pts), [], []
    for a_id, b_id in groups:
        a, b = finals.loc[a_id].copy(), finals.loc[b_id].copy()
        a["run_id"], b["run_id"] = a_id, b_id
        ood, idd = compare(run_dirs, a, b, d.OOD, metric), compare(run_dirs, a, b, d.ID, metric)
        signs.append(ood.sign)
        parts.append(f"{describe(b_id)} ends at OOD {value(b, d.OOD)}, ID {value(b, d.ID)}; {describe(a_id)} at OOD "
                     f"{value(a, d.OOD)}, ID {value(a, d.ID)}: OOD {ood.text()}, ID {idd.text()}.")
    verdict = HOLDS if all(x > 0 for x in signs) else FAILS if all(x < 0 for x in signs) else UNSURE
    scope = "" if len(groups) == 1 else f" In {len(groups)} groups of runs matched on every other axis:"
    text = scope + " " + " ".join(parts)
    if verdict == UNSURE:
        text += (" The OOD difference is within noise." if len(groups) == 1 else
                 " The groups do not agree beyond noise (" + ", ".join(f"{x:+d}" for x in signs) + ").")
    return verdict, text.strip()


def budget_split(pts: pd.DataFrame, info: pd.DataFrame, run_dirs, metric: str) -> Finding:
    """Under a fixed budget, the split with less SFT (more RL) ends with the higher OOD, within every group of
    runs equal on the other axes (stage lengths follow the split, so they are not other axes)."""
    title = "Under a fixed budget, brief SFT and a larger RL share win OOD"
    runs = info.dropna(subset=["sft_share"])
    if runs["sft_share"].nunique() < 2:
        return Finding(title, UNSURE, "The study does not split a fixed budget between SFT and RL in two ways or more.")
    lengths = [c for c in runs.columns if d.length_axis(c, "sft") or d.length_axis(c, "rl")]
    groups = matched_groups(runs, ["sft_share"], skip=lengths)
    if not groups:
        return Finding(title, UNSURE, "No two budget splits are otherwise the same run (every pair also differs in "
                                      "another axis), so the split's effect cannot be separated.", list(runs.index))
    pairs = [(g["sft_share"].idxmax(), g["sft_share"].idxmin()) for g in groups]
    label = lambda r: f"SFT share {runs.loc[r, 'sft_share']:.0%} (budget {runs.loc[r, 'budget']})"  # noqa: E731
    verdict, text = within_groups(pairs, pts, run_dirs, metric, label)
    return Finding(title, verdict, "Less SFT against more SFT. " + text, list(dict.fromkeys(r for p in pairs for r in p[::-1])))


def asymmetric_ranks(pts: pd.DataFrame, info: pd.DataFrame, run_dirs, metric: str) -> Finding:
    """High LoRA rank for SFT with a low one for RL beats the reverse, OOD, within every group of runs equal
    on the other axes."""
    title = "High SFT LoRA rank with a low RL rank beats the reverse"
    sft_axis, rl_axis = "stages.sft.lora.rank", "stages.rl.lora.rank"
    if sft_axis not in info or rl_axis not in info:
        return Finding(title, UNSURE, "The study does not vary the SFT and RL LoRA ranks.")
    runs = info.dropna(subset=[sft_axis, rl_axis]).copy()
    runs["ratio"] = runs[sft_axis].astype(float) / runs[rl_axis].astype(float)
    if not ((runs["ratio"] > 1).any() and (runs["ratio"] < 1).any()):
        return Finding(title, UNSURE, "No pair of runs with SFT rank above RL rank and the reverse.")
    groups = [g for g in matched_groups(runs, [sft_axis, rl_axis], skip=["ratio"], keep=["budget"])
              if (g["ratio"] > 1).any() and (g["ratio"] < 1).any()]
    if not groups:
        return Finding(title, UNSURE, "No run with SFT rank above RL rank is otherwise the same as one with the "
                                      "reverse (every such pair also differs in another axis).", list(runs.index))
    pairs = [(g["ratio"].idxmin(), g["ratio"].idxmax()) for g in groups]
    rank = lambda r: f"SFT rank {int(runs.loc[r, sft_axis])} / RL rank {int(runs.loc[r, rl_axis])}"  # noqa: E731
    verdict, text = within_groups(pairs, pts, run_dirs, metric, rank)
    return Finding(title, verdict, text, list(dict.fromkeys(r for p in pairs for r in p[::-1])))


def all_findings(report_data, task: str, metric: str) -> list[Finding]:
    pts = d.points(report_data, task, metric)
    info = d.run_info(report_data, pts)
    curve, how = d.sft_curve(report_data, pts, info)
    x, unit = d.x_of(curve) if len(curve) else (pd.Series(dtype=float), "")
    rd = report_data.run_dirs
    return [
        sft_peak(curve, x, unit, rd, metric, how),
        rl_recovers(d.rl_curves(report_data, pts, info), rd, metric),
        cpt_helps(report_data.table[report_data.table["run_id"].isin(info.index)], pts, info, report_data.axes, rd,
                  metric),
        budget_split(pts, info, rd, metric),
        asymmetric_ranks(pts, info, rd, metric),
    ]


__all__ = ["Finding", "Difference", "all_findings", "HOLDS", "FAILS", "UNSURE"]
