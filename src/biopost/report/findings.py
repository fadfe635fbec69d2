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
    """``0.812 [0.750, 0.870]``: a point's value with its bootstrap 95% interval."""
    v, lo, hi = point[split], point.get(f"{split}_lo"), point.get(f"{split}_hi")
    if lo is None or pd.isna(lo):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def sft_peak(curve: pd.DataFrame, x: pd.Series, unit: str, run_dirs, metric: str, how: str) -> Finding:
    """SFT raises ID while OOD peaks early and then falls."""
    title = "SFT raises ID while OOD peaks early, then falls"
    runs = list(dict.fromkeys(curve["run_id"])) if len(curve) else []
    if len(curve) < 3:
        return Finding(title, UNSURE, f"The SFT curve has {len(curve)} evaluation point(s); a peak and a fall need "
                                      f"at least 3 (start, peak, end).", runs)
    curve, x = curve.reset_index(drop=True), x.reset_index(drop=True)
    first, last = curve.iloc[0], curve.iloc[-1]
    at = lambda i: f"{x[i]:g} {unit.removeprefix('SFT ')}"  # noqa: E731
    id_rise = compare(run_dirs, first, last, d.ID, metric)
    peak_i = int(curve[d.OOD].to_numpy().argmax())
    peak = curve.iloc[peak_i]
    head = (f"Drawn from {how}. ID {metric} went from {value(first, d.ID)} at {at(0)} to {value(last, d.ID)} at "
            f"{at(len(curve) - 1)}: {id_rise.text()}. ")
    if peak_i == len(curve) - 1:
        rise = compare(run_dirs, first, last, d.OOD, metric)
        text = (f"OOD was highest at the longest SFT, {value(last, d.OOD)} at {at(peak_i)}, from {value(first, d.OOD)} "
                f"at {at(0)}: {rise.text()}; it did not fall after a peak.")
        return Finding(title, FAILS if rise.sign > 0 else UNSURE,
                       head + text + ("" if rise.sign > 0 else " Its rise is within noise, so neither shape is shown."),
                       runs)
    fall = compare(run_dirs, peak, last, d.OOD, metric)
    text = (f"OOD peaked at {value(peak, d.OOD)} at {at(peak_i)} and ended at {value(last, d.OOD)} at "
            f"{at(len(curve) - 1)}: {fall.text()}.")
    if peak_i == 0:
        verdict = FAILS if fall.sign < 0 else UNSURE
        text += " OOD was highest before any SFT: SFT never raised it."
    elif fall.sign < 0 and id_rise.sign > 0:
        verdict = HOLDS
    elif id_rise.sign < 0:
        verdict = FAILS
        text += " ID fell, so SFT did not raise ID."
    else:
        verdict = UNSURE
        text += (" The fall from the peak is within noise." if fall.sign == 0 else " The rise of ID is within noise.")
    return Finding(title, verdict, head + text, runs)


def rl_recovers(curves: dict[str, pd.DataFrame], run_dirs, metric: str) -> Finding:
    """RL from a strong SFT checkpoint raises OOD (warm start); the cold start is reported beside it."""
    title = "RL from a strong SFT checkpoint raises OOD"
    warm = {k: c for k, c in curves.items() if k.startswith("warm") and len(c) >= 2}
    if not warm:
        return Finding(title, UNSURE, "No run has an RL stage started from SFT with at least two evaluations.")
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


def cpt_helps(table: pd.DataFrame, pts: pd.DataFrame, info: pd.DataFrame, axes: list[str], run_dirs,
              metric: str) -> Finding:
    """CPT lowers held-out perplexity and makes later SFT / RL better, especially OOD."""
    title = "CPT lowers held-out perplexity and helps downstream, especially OOD"
    ppl = table[(table["split"] == "heldout") & (table["metric"] == "perplexity")].sort_values(["run_id", "step"])
    parts, runs, verdict = [], [], UNSURE
    if ppl.empty:
        parts.append("No run recorded CPT held-out perplexity.")
    else:
        run_id, rows = next(iter(ppl.groupby("run_id")))
        first, last = rows.iloc[0], rows.iloc[-1]
        parts.append(f"Held-out perplexity went from {first['value']:.2f} at CPT step {int(first['step'])} to "
                     f"{last['value']:.2f} at step {int(last['step'])} (n={int(last['n'])} tokens; no interval is "
                     f"recorded for perplexity).")
        runs.append(run_id)
        if last["value"] >= first["value"]:
            verdict = FAILS
    pairs = cpt_pairs(info, axes)
    if not pairs:
        parts.append("No run without CPT matches a run with it (same stages after CPT, same other axes), so its "
                     "downstream effect cannot be measured here.")
    else:
        finals = d.final_points(pts)
        with_cpt, without = pairs[0]
        a, b = finals.loc[without].copy(), finals.loc[with_cpt].copy()
        a["run_id"], b["run_id"] = without, with_cpt
        ood, idd = compare(run_dirs, a, b, d.OOD, metric), compare(run_dirs, a, b, d.ID, metric)
        parts.append(f"At the end of the pipeline, with CPT minus without: OOD {ood.text()}, ID {idd.text()} "
                     f"(OOD {value(b, d.OOD)} vs {value(a, d.OOD)}).")
        runs += [with_cpt, without]
        if verdict != FAILS:
            verdict = HOLDS if ood.sign > 0 else FAILS if ood.sign < 0 else UNSURE
        if ood.sign == 0:
            parts.append("The OOD difference is within noise.")
    return Finding(title, verdict, " ".join(parts), list(dict.fromkeys(runs)))


def cpt_pairs(info: pd.DataFrame, axes: list[str]) -> list[tuple[str, str]]:
    """(run with CPT, run without) pairs: the same stages after CPT and the same axes outside CPT's."""
    others = [a for a in axes if not a.startswith("stages.cpt.")]
    key = lambda r: (tuple(k for k in info.loc[r, "kinds"] if k != "cpt"),  # noqa: E731
                     *(d.fmt_value(info.loc[r, a]) for a in others), str(info.loc[r, "budget"]))
    without = {key(r): r for r in info.index if "cpt" not in info.loc[r, "kinds"]}
    return [(r, without[key(r)]) for r in info.index if "cpt" in info.loc[r, "kinds"] and key(r) in without]


def budget_split(pts: pd.DataFrame, info: pd.DataFrame, run_dirs, metric: str) -> Finding:
    """Under a fixed budget, the split with less SFT (more RL) ends with the higher OOD."""
    title = "Under a fixed budget, brief SFT and a larger RL share win OOD"
    runs = info.dropna(subset=["sft_share"])
    if runs["sft_share"].nunique() < 2:
        return Finding(title, UNSURE, "The study does not split a fixed budget between SFT and RL in two ways or more.")
    finals = d.final_points(pts)
    low, high = runs["sft_share"].idxmin(), runs["sft_share"].idxmax()
    a, b = finals.loc[high].copy(), finals.loc[low].copy()
    a["run_id"], b["run_id"] = high, low
    ood, idd = compare(run_dirs, a, b, d.OOD, metric), compare(run_dirs, a, b, d.ID, metric)
    text = (f"SFT share {runs.loc[low, 'sft_share']:.0%} (budget {runs.loc[low, 'budget']}) ends at OOD "
            f"{value(b, d.OOD)}, ID {value(b, d.ID)}; SFT share {runs.loc[high, 'sft_share']:.0%} (budget "
            f"{runs.loc[high, 'budget']}) at OOD {value(a, d.OOD)}, ID {value(a, d.ID)}. Less SFT minus more SFT: "
            f"OOD {ood.text()}, ID {idd.text()}.")
    verdict = HOLDS if ood.sign > 0 else FAILS if ood.sign < 0 else UNSURE
    if verdict == UNSURE:
        text += " The OOD difference is within noise."
    return Finding(title, verdict, text, [low, high])


def asymmetric_ranks(pts: pd.DataFrame, info: pd.DataFrame, run_dirs, metric: str) -> Finding:
    """High LoRA rank for SFT with a low one for RL beats the reverse, OOD."""
    title = "High SFT LoRA rank with a low RL rank beats the reverse"
    sft_axis, rl_axis = "stages.sft.lora.rank", "stages.rl.lora.rank"
    if sft_axis not in info or rl_axis not in info:
        return Finding(title, UNSURE, "The study does not vary the SFT and RL LoRA ranks.")
    runs = info.dropna(subset=[sft_axis, rl_axis])
    ratio = runs[sft_axis].astype(float) / runs[rl_axis].astype(float)
    if not ((ratio > 1).any() and (ratio < 1).any()):
        return Finding(title, UNSURE, "No pair of runs with SFT rank above RL rank and the reverse.")
    finals = d.final_points(pts)
    hi_lo, lo_hi = ratio.idxmax(), ratio.idxmin()
    a, b = finals.loc[lo_hi].copy(), finals.loc[hi_lo].copy()
    a["run_id"], b["run_id"] = lo_hi, hi_lo
    ood, idd = compare(run_dirs, a, b, d.OOD, metric), compare(run_dirs, a, b, d.ID, metric)
    rank = lambda r: f"SFT rank {int(runs.loc[r, sft_axis])} / RL rank {int(runs.loc[r, rl_axis])}"  # noqa: E731
    text = (f"{rank(hi_lo)} ends at OOD {value(b, d.OOD)}, ID {value(b, d.ID)}; {rank(lo_hi)} at OOD "
            f"{value(a, d.OOD)}, ID {value(a, d.ID)}. Difference: OOD {ood.text()}, ID {idd.text()}.")
    verdict = HOLDS if ood.sign > 0 else FAILS if ood.sign < 0 else UNSURE
    if verdict == UNSURE:
        text += " The OOD difference is within noise."
    return Finding(title, verdict, text, [hi_lo, lo_hi])


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
