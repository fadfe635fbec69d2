"""The report's sections for one task, each drawn from the results table (and ``predictions/`` for flips).
A section whose axis the study did not vary is left out (``None``), never drawn empty."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from biopost.report import data as d
from biopost.report import figures
from biopost.report.examples import broken_and_fixed, flips, origin
from biopost.report.findings import Finding, all_findings, value


@dataclass
class Section:
    """Blocks in order: ``("text", str)``, ``("figure", name, png_bytes, alt)``, ``("table", DataFrame)``,
    ``("examples", list[dict])`` (completions shown verbatim, escaped by the renderer)."""

    key: str
    title: str
    blocks: list[tuple] = field(default_factory=list)


@dataclass
class TaskReport:
    task: str
    metric: str
    findings: list[Finding]
    sections: list[Section]


def ci(point, split: str) -> str:
    """A table cell: the point's value with its interval (see ``findings.value``), empty where it has none."""
    v = point.get(split)
    return "" if v is None or pd.isna(v) else value(point, split)


def task_report(data: d.ReportData, task: str) -> TaskReport:
    metric = data.primary_metric(task)
    pts = d.points(data, task, metric)
    if d.trained(pts).empty:
        raise ValueError(f"{data.directory}: no evaluation rows of {metric!r} on {task}; choose --metric among "
                         f"{sorted(set(data.table['metric']))}")
    info = d.run_info(data, pts)
    base = d.baseline(pts)
    builders = [sft_section, rl_section, arms_section, scatter_section, budget_section, rank_section, cpt_section,
                interpolation_section, baseline_section, runs_section, flips_section]
    sections = [s for s in (b(data, pts, info, base, metric) for b in builders) if s is not None]
    return TaskReport(task, metric, all_findings(data, task, metric), sections)


def spread(mean, sd, low, high) -> str:
    """``0.412 ± 0.051 [0.350, 0.470]``: mean ± sd across seeds [min, max]."""
    return "" if pd.isna(mean) else f"{mean:.3f} ± {sd:.3f} [{low:.3f}, {high:.3f}]"


def sft_section(data, pts, info, base, metric):
    curve, how = d.sft_curve(data, pts, info)
    if len(curve) < 2:
        return None
    x, unit = d.x_of(curve)
    table = pd.DataFrame({unit: x.map(lambda v: f"{v:g}"), "run": curve["run_id"], "step": curve["step"],
                          "ID": [ci(r, d.ID) for _, r in curve.iterrows()],
                          "OOD": [ci(r, d.OOD) for _, r in curve.iterrows()]})
    blocks = [("text", f"Points: {how}. Bands are bootstrap 95% intervals; the star marks OOD's highest point."),
              ("figure", "sft-length", figures.sft_length(curve, x, unit, metric, base), "ID and OOD against SFT length"),
              ("table", table)]
    seeds = d.sft_spread(data, pts, info)
    if seeds is not None:
        sx, sunit = d.x_of(seeds)
        blocks += [
            ("text", f"Over every seed ({int(seeds['seeds'].max())}): the same points for each seed, as the mean across "
                     f"seeds with its standard deviation and, as bands, the range from the lowest to the highest seed."),
            ("figure", "sft-length-seeds", figures.sft_length_seeds(seeds, sx, sunit, metric, base),
             "ID and OOD against SFT length, mean and range over seeds"),
            ("table", pd.DataFrame({sunit: sx.map(lambda v: f"{v:g}"), "seeds": seeds["seeds"],
                                    **{f"{name} mean ± sd [min, max]": [spread(*(r[f"{s}_{k}"] for k in ("mean", "std", "min", "max")))
                                                                        for _, r in seeds.iterrows()]
                                       for s, name in ((d.ID, "ID"), (d.OOD, "OOD"))}}))]
    return Section("sft", "ID and OOD against SFT length", blocks)


def rl_section(data, pts, info, base, metric):
    curves = d.rl_curves(data, pts, info)
    if not curves:
        return None
    rows = [{"start": label, "arm": c.iloc[0]["arm"], "run": c.iloc[0]["run_id"], "RL steps": int(c["step"].max()),
             "OOD at start": ci(c.iloc[0], d.OOD), "OOD at end": ci(c.iloc[-1], d.OOD),
             "ID at start": ci(c.iloc[0], d.ID), "ID at end": ci(c.iloc[-1], d.ID)} for label, c in curves.items()]
    return Section("rl", "OOD across RL steps, per starting point", [
        ("text", "Each line is one RL stage from its starting checkpoint (step 0): warm starts from SFT (solid), "
                 "starts after another stage such as CPT (solid, named), cold starts from the base model (dotted). "
                 "A start names its arm (text: the sequence as text; fused: read through an encoder; CPT: after "
                 "continued pretraining). Where a shorter RL is the prefix of a longer one, the longer is drawn."),
        ("figure", "rl-steps", figures.rl_steps(curves, metric, base), "OOD and ID across RL steps"),
        ("table", pd.DataFrame(rows))])


def arms_section(data, pts, info, base, metric):
    """Fused encoder against DNA / protein / cells as text, at the same SFT length: after SFT and after RL."""
    rows = d.arm_comparison(data, pts, info)
    if rows.empty:
        return None
    several = rows["seeds"].max() > 1
    cell = ((lambda r, s: f"{r[s]:.3f} ± {r[f'{s}_sd']:.3f}") if several else (lambda r, s: ci(r, s)))
    table = pd.DataFrame({"SFT steps": rows["sft_steps"], "checkpoint": rows["checkpoint"], "arm": rows["arm"],
                          "seeds": rows["seeds"], "ID": [cell(r, d.ID) for _, r in rows.iterrows()],
                          "OOD": [cell(r, d.OOD) for _, r in rows.iterrows()], "runs": rows["runs"]})
    spread_text = "mean ± sd across seeds" if several else "value [bootstrap 95% interval]"
    return Section("arms", "Fused encoder against text, at equal SFT length", [
        ("text", f"Runs of the fused arm (a frozen encoder read through a projector) and of the text arm (the sequence "
                 f"as text) that trained SFT for the same number of steps, after SFT and at the run's end. Values: "
                 f"{metric}, {spread_text}."),
        ("figure", "arms", figures.arms(rows, metric, base), "fused against text at equal SFT length"),
        ("table", table)])


def scatter_section(data, pts, info, base, metric):
    every = d.trained(pts).dropna(subset=[d.ID, d.OOD])
    # a checkpoint copied into several runs (shared prefixes) is one point, naming every run
    same = ["stage_index", "stage", "step", "val", d.ID, d.OOD]
    runs = every.groupby(same, dropna=False, sort=False)["run_id"].agg(", ".join)
    every = every.drop_duplicates(same).set_index(same).assign(run_id=runs).reset_index()
    if len(every) < 2:
        return None
    front = d.pareto_front(every)
    table = pd.DataFrame({"runs": front["run_id"], "checkpoint": [f"{r.stage}@{int(r.step)}" for r in front.itertuples()],
                          "ID": [ci(r, d.ID) for _, r in front.iterrows()],
                          "OOD": [ci(r, d.OOD) for _, r in front.iterrows()]})
    return Section("scatter", "ID against OOD: every checkpoint, and the Pareto front", [
        ("text", f"{len(every)} distinct checkpoints of {d.trained(pts)['run_id'].nunique()} run(s); the front holds "
                 f"the checkpoints no other beats on both ID and OOD."),
        ("figure", "id-ood-scatter", figures.id_ood_scatter(every, front, metric, base), "ID against OOD scatter"),
        ("table", table)])


def budget_section(data, pts, info, base, metric):
    runs = info.dropna(subset=["sft_share"])
    if runs["sft_share"].nunique() < 2:
        return None
    finals = d.final_points(pts).loc[runs.index]
    rows = finals.assign(sft_share=runs["sft_share"])
    table = pd.DataFrame({"run": runs.index, "budget": runs["budget"], "SFT share": runs["sft_share"].map("{:.0%}".format),
                          "ID": [ci(r, d.ID) for _, r in finals.iterrows()],
                          "OOD": [ci(r, d.OOD) for _, r in finals.iterrows()]})
    return Section("budget", "Fixed budget: share given to SFT", [
        ("text", "Each point is a run's final evaluation; the rest of the budget went to RL."),
        ("figure", "budget", figures.budget(rows, metric, base), "budget split curves"), ("table", table)])


def rank_section(data, pts, info, base, metric):
    sft_axis, rl_axis = "stages.sft.lora.rank", "stages.rl.lora.rank"
    if sft_axis not in info or rl_axis not in info:
        return None
    runs = info.dropna(subset=[sft_axis, rl_axis])
    if len(runs[[sft_axis, rl_axis]].drop_duplicates()) < 2:
        return None
    finals = d.final_points(pts).loc[runs.index].assign(sft_rank=runs[sft_axis].astype(int),
                                                        rl_rank=runs[rl_axis].astype(int))
    matrices = {s: finals.pivot_table(index="sft_rank", columns="rl_rank", values=s, aggfunc="mean")
                for s in (d.ID, d.OOD)}
    table = pd.DataFrame({"run": runs.index, "SFT rank": finals["sft_rank"], "RL rank": finals["rl_rank"],
                          "ID": [ci(r, d.ID) for _, r in finals.iterrows()],
                          "OOD": [ci(r, d.OOD) for _, r in finals.iterrows()]})
    return Section("lora", "LoRA rank: SFT rank x RL rank", [
        ("figure", "lora-ranks", figures.rank_matrix(matrices, metric), "LoRA rank matrix"), ("table", table)])


def cpt_section(data, pts, info, base, metric):
    t = data.table[data.table["run_id"].isin(info.index)]
    ppl_rows = t[(t["split"] == "heldout") & (t["metric"] == "perplexity")]
    if ppl_rows.empty:
        return None
    ppl = {}
    for run_id, rows in ppl_rows.sort_values("step").groupby("run_id"):
        key = tuple(rows["value"].round(6))
        if key not in {tuple(v["value"].round(6)) for v in ppl.values()}:  # shared prefixes draw once
            ppl[run_id] = rows
    from biopost.report.findings import cpt_pairs

    pairs = cpt_pairs(info, data.axes)
    downstream = None
    if pairs:
        finals = d.final_points(pts)
        with_cpt, without = pairs[0]
        downstream = pd.concat([finals.loc[[without]].assign(label=f"without CPT\n{without}"),
                                finals.loc[[with_cpt]].assign(label=f"with CPT\n{with_cpt}")])
    table = pd.DataFrame([{"run": r, "CPT step": int(s), "held-out perplexity": f"{v:.2f}", "tokens": int(n)}
                          for r, rows in ppl.items() for s, v, n in zip(rows["step"], rows["value"], rows["n"])])
    text = ("Held-out perplexity of the CPT corpus's held-out documents along CPT. "
            + ("Right: the final point of a run with CPT and of the matching run without it." if pairs else
               "No run without CPT matches a run with it, so downstream accuracy with and without CPT is not drawn."))
    return Section("cpt", "CPT: held-out perplexity, and downstream with and without CPT", [
        ("text", text), ("figure", "cpt", figures.cpt(ppl, downstream, metric), "CPT perplexity"), ("table", table)])


def interpolation_section(data, pts, info, base, metric):
    rows = d.trained(pts).dropna(subset=["alpha"])
    if rows.empty:
        return None
    curves = {f"{r} {s}": g.sort_values("alpha") for (r, s), g in rows.groupby(["run_id", "stage"])}
    t = data.table[data.table["run_id"].isin(info.index)]
    general = t[t["split"].str.startswith("general/") & (t["metric"] == "perplexity") & t["alpha"].notna()]
    ppl = {f"{r} {stage} {s}" if len(curves) > 1 else s: g.sort_values("alpha")
           for (r, stage, s), g in general.groupby(["run_id", "stage", "split"])}
    table = pd.DataFrame([{"run, stage": k, "a": f"{p['alpha']:g}", "val": ci(p, "val"), "ID": ci(p, d.ID),
                           "OOD": ci(p, d.OOD)} for k, c in curves.items() for _, p in c.iterrows()])
    return Section("interpolation", "Weight interpolation: ID and OOD against a", [
        ("text", "a = 0 is the model before the interpolated stage, a = 1 the model after it"
                 + ("; grey dashed: perplexity on the forgetting corpora (right axis)." if ppl else ".")),
        ("figure", "interpolation", figures.interpolation(curves, ppl, metric, base), "interpolation curve"),
        ("table", table)])


def baseline_section(data, pts, info, base, metric):
    if base is None:
        return None
    return Section("baseline", "Classical baseline", [
        ("text", "A logistic regression on task features (`biopost baseline`), drawn as dashed reference lines in the "
                 "other figures."),
        ("table", pd.DataFrame([{"split": s, metric: ci(base, s)} for s in d.SPLITS if not pd.isna(base.get(s))]))])


def runs_section(data, pts, info, base, metric):
    finals, best = d.final_points(pts), d.best_on_val(pts)
    varied = data.varied_axes()
    rows = []
    for run_id in info.index:
        f, b = finals.loc[run_id], best.loc[run_id] if run_id in best.index else None
        row = {"run": run_id, "pipeline": info.loc[run_id, "pipeline"]}
        row.update({a.removeprefix("stages."): "" if d.is_missing(info.loc[run_id, a]) else d.fmt_value(info.loc[run_id, a])
                    for a in varied})
        if "budget" in info and isinstance(info.loc[run_id, "budget"], str):
            row["budget"] = info.loc[run_id, "budget"]
        row.update({"final": f"{f['stage']}@{int(f['step'])}", "final ID": ci(f, d.ID), "final OOD": ci(f, d.OOD),
                    "best on val": "" if b is None else f"{b['stage']}@{int(b['step'])}",
                    "its ID": "" if b is None else ci(b, d.ID), "its OOD": "" if b is None else ci(b, d.OOD)})
        rows.append(row)
    return Section("runs", "Every run", [
        ("text", f"Final: the run's last evaluation. Best on val: its checkpoint with the highest val {metric} (ties: "
                 f"the earliest), the way stages select. Values: {metric} [bootstrap 95% interval]."),
        ("table", pd.DataFrame(rows).fillna(""))])


def flips_section(data, pts, info, base, metric, shown: int = 3):
    """Flips between consecutive checkpoints of each run, and what SFT broke OOD and whether RL fixed it."""
    blocks, seen, rows = [], {}, []
    for run_id, run_pts in d.trained(pts).groupby("run_id", sort=True):
        for split in (d.ID, d.OOD):
            for _, f in flips(data.run_dirs[run_id], run_pts, split, metric).iterrows():
                # a prefix one run copied from another (the study's branching): one row naming both
                key = (origin(data.run_dirs, run_id, f["to_index"], f["to_step"]), split, f["from"], f["to"])
                if key in seen:
                    rows[seen[key]]["runs"] += f", {run_id}"
                    continue
                seen[key] = len(rows)
                rows.append({"runs": run_id, "split": split, "from": f["from"], "to": f["to"], "n": f["n"],
                             "right to wrong": f["right_to_wrong"], "wrong to right": f["wrong_to_right"]})
    if not rows:
        return None
    blocks.append(("text", "An example is right when its per-example score is at least 0.5 (accuracy: correct). "
                           "Counts between consecutive evaluations of each run, on the same test examples; the "
                           "rows of a prefix one run copied from another (the study's branching) are listed once."))
    blocks.append(("table", pd.DataFrame(rows)))
    blocks += broken_blocks(data, pts, info, metric, shown)
    return Section("flips", "Example-level flips: what each stage broke and fixed", blocks)


def broken_blocks(data, pts, info, metric, shown):
    """Per SFT run (one per distinct SFT): OOD examples right at SFT's OOD peak and wrong where SFT handed over
    (RL's step 0, else SFT's last point), and which of them RL's last point has right again."""
    blocks, done = [], set()
    lines = []
    for run_id in info.index:
        run_pts = d.trained(pts)[d.trained(pts)["run_id"] == run_id]
        sft, rl = run_pts[run_pts["stage_kind"] == "sft"], run_pts[run_pts["stage_kind"] == "rl"]
        if len(sft) < 2 or sft[d.OOD].isna().all():
            continue
        peak = sft.loc[sft[d.OOD].idxmax()]
        end = rl.iloc[0] if len(rl) else sft.iloc[-1]
        rl_end = rl.iloc[-1] if len(rl) > 1 else None
        result = broken_and_fixed(data.run_dirs[run_id], peak, end, rl_end, metric)
        if result is None:
            continue
        key = (tuple(result["broken"]), None if result["fixed"] is None else tuple(result["fixed"]))
        if key in done:
            continue
        done.add(key)
        fixed = ("no RL stage follows" if result["fixed"] is None else
                 f"RL fixed {len(result['fixed'])} of them by {rl_end['stage']}@{int(rl_end['step'])}")
        lines.append(f"Run {run_id}: {len(result['broken'])} of {result['n']} OOD examples were right at SFT's OOD peak "
                     f"({peak['stage']}@{int(peak['step'])}) and wrong at {end['stage']}@{int(end['step'])}; {fixed}.")
        examples = []
        fixed_first = sorted(result["broken"], key=lambda i: i not in (result["fixed"] or []))
        for example_id in fixed_first[:shown]:
            recs = result["records"]
            examples.append({"id": example_id, "answer": recs["peak"][example_id]["answer"],
                             "completions": [(f"{p['stage']}@{int(p['step'])}", recs[name][example_id]["completions"][0],
                                              "right" if recs[name][example_id]["mean"][metric] >= 0.5 else "wrong")
                                             for name, p in (("peak", peak), ("end", end), ("rl_end", rl_end))
                                             if p is not None and example_id in recs.get(name, {})]})
        if examples:
            blocks.append(("text", lines[-1]))
            blocks.append(("examples", examples))
            lines.pop()
    return ([("text", " ".join(lines))] if lines else []) + blocks


def overview(data: d.ReportData) -> pd.DataFrame:
    """Runs and rows behind the report."""
    t = data.table
    return pd.DataFrame([{"source": "study" if data.kind == "study" else "run", "directory": str(data.directory),
                          "runs": t["run_id"].nunique(), "rows": len(t), "tasks": ", ".join(data.tasks),
                          "varied axes": ", ".join(data.varied_axes()) or "none",
                          "unfinished runs left out": len(data.unfinished)}])


