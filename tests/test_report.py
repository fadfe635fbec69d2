"""The report on small synthetic run directories: verdicts both ways, flips, section omission, a self-contained
HTML file. Each run directory is written here (config.yaml, metrics.jsonl, predictions/) as a run writes it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from biopost.cli import main
from biopost.config import yaml12
from biopost.evaluation import bootstrap_ci
from biopost.report import write_report
from biopost.report import data as d
from biopost.report import findings
from biopost.report.examples import flips
from biopost.report.findings import FAILS, HOLDS, UNSURE, all_findings
from biopost.report.sections import task_report
from biopost.study.results import run_table

TASK = "cell_type/pbmc68k"


def right(n: int, k: int, offset: int = 0) -> list[float]:
    """``k`` of ``n`` examples right, starting at ``offset`` (cyclically): overlapping sets move together."""
    out = [0.0] * n
    for i in range(k):
        out[(offset + i) % n] = 1.0
    return out


def write_run(run_dir: Path, points: list[dict], kinds=("sft",), run_id: str = "run0", completion: str = "Answer: x"):
    """A run directory. ``points``: stage, step, optional epoch / alpha, and ``splits``: split -> 0/1 per example."""
    run_dir.mkdir(parents=True)
    yaml12().dump({"name": "synthetic", "task": {"name": TASK}, "stages": [{"kind": k} for k in kinds]},
                  run_dir / "config.yaml")
    index = {k: i for i, k in enumerate(kinds)}
    rows = []
    for p in points:
        for split, values in p["splits"].items():
            values = np.asarray(values, dtype=float)
            lo, hi = bootstrap_ci(values, 200, 0)
            where = {"stage": p["stage"], "stage_index": index.get(p["stage"], -1), "step": p["step"],
                     "epoch": p.get("epoch"), **({"alpha": p["alpha"]} if "alpha" in p else {})}
            rows.append({"run_id": run_id, "task": TASK, **where, "split": split, "metric": "accuracy",
                         "value": float(values.mean()), "n": len(values), "ci_low": lo, "ci_high": hi})
            records = [{"id": f"ex{i}", "answer": "T cell", "completions": [f"{completion} {i}"],
                        "mean": {"accuracy": v}} for i, v in enumerate(values)]
            pred = run_dir / "predictions" / f"{p['stage']}-step{p['step']:06d}-{split}.jsonl"
            pred.parent.mkdir(exist_ok=True)
            pred.write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def sft_points(ood: list[int], idd: list[int], n: int = 60) -> list[dict]:
    return [{"stage": "sft", "step": 10 * i, "epoch": float(i),
             "splits": {"val": right(n, b), "id_test": right(n, b), "ood_test": right(n, a)}}
            for i, (a, b) in enumerate(zip(ood, idd))]


def findings_of(run_dir: Path) -> dict:
    data = d.load(run_dir)
    return {f.title.split()[0]: f for f in all_findings(data, TASK, "accuracy")}


def test_ood_peak_then_fall_holds(tmp_path):
    run = write_run(tmp_path / "r", sft_points(ood=[0, 40, 30, 12], idd=[0, 30, 45, 58]))
    finding = findings_of(run)["SFT"]
    assert finding.verdict == HOLDS, finding.paragraph()
    assert "peaked at 0.667" in finding.text and "paired bootstrap" in finding.text and "run0" in finding.paragraph()


def test_ood_rising_monotonically_does_not_hold(tmp_path):
    run = write_run(tmp_path / "r", sft_points(ood=[0, 15, 30, 50], idd=[0, 30, 45, 58]))
    finding = findings_of(run)["SFT"]
    assert finding.verdict == FAILS, finding.paragraph()
    assert "did not fall after a peak" in finding.text


def test_too_few_points_or_a_fall_within_noise_cannot_tell(tmp_path):
    assert findings_of(write_run(tmp_path / "two", sft_points(ood=[0, 40], idd=[0, 30])))["SFT"].verdict == UNSURE
    # one example apart: the fall from the peak is within the paired interval
    noisy = findings_of(write_run(tmp_path / "noise", sft_points(ood=[0, 31, 30], idd=[0, 30, 58])))["SFT"]
    assert noisy.verdict == UNSURE and "within noise" in noisy.text


def test_a_one_example_rise_is_no_peak(tmp_path):
    # OOD 30 -> 31 -> 18 -> 12 of 60: the "peak" is one example above the start, then a real fall
    run = write_run(tmp_path / "r", sft_points(ood=[30, 31, 18, 12], idd=[0, 30, 45, 58]))
    finding = findings_of(run)["SFT"]
    assert finding.verdict == FAILS and "SFT never raised it" in finding.text, finding.paragraph()


def test_the_peak_is_chosen_on_ood_val_else_tests_are_widened(tmp_path):
    points = sft_points(ood=[0, 40, 30, 12], idd=[0, 30, 45, 58])
    for p, k in zip(points, [0, 10, 35, 5]):  # ood_val peaks at the third point, ood_test at the second
        p["splits"]["ood_val"] = right(60, k)
    finding = findings_of(write_run(tmp_path / "val", points))["SFT"]
    assert "chosen on ood_val" in finding.text and "peaked at 0.500" in finding.text, finding.paragraph()
    assert finding.verdict == HOLDS and "95% CI" in finding.text
    # without ood_val the peak is picked on the test split: both OOD tests at 1 - 0.05 / 4
    alone = findings_of(write_run(tmp_path / "test", sft_points(ood=[0, 40, 30, 12], idd=[0, 30, 45, 58])))["SFT"]
    assert "Bonferroni over 4 checkpoints" in alone.text and "98.8% CI" in alone.text and "peaked at 0.667" in alone.text


def test_budget_and_rank_findings_compare_only_matched_runs():
    # within each backbone more SFT (and the high-SFT/low-RL rank pair) wins OOD by 0.1; the big backbone
    # is better overall, so comparing across backbones would say the reverse
    runs = {"a1": ("big", 0.25, 4, 32, 0.70), "b2": ("tiny", 0.75, 32, 4, 0.40),
            "c3": ("tiny", 0.25, 4, 32, 0.30), "d4": ("big", 0.75, 32, 4, 0.80)}
    pts = pd.DataFrame([{"run_id": r, "stage_index": 1, "stage": "rl", "stage_kind": "rl", "step": 10, "val": 0.5,
                         "id_test": 0.5, "id_test_lo": 0.48, "id_test_hi": 0.52, "id_test_n": 500,
                         "ood_test": o, "ood_test_lo": o - 0.02, "ood_test_hi": o + 0.02, "ood_test_n": 500}
                        for r, (*_, o) in runs.items()])
    backbone = {"model.backbone": {r: v[0] for r, v in runs.items()}}
    budget = pd.DataFrame({**backbone, "sft_share": {r: v[1] for r, v in runs.items()},
                           "budget": {r: "3:1" if v[1] == 0.75 else "1:3" for r, v in runs.items()}})
    ranks = pd.DataFrame({**backbone, "stages.sft.lora.rank": {r: v[2] for r, v in runs.items()},
                          "stages.rl.lora.rank": {r: v[3] for r, v in runs.items()}})
    dirs = {r: Path("/nonexistent") / r for r in runs}
    split = findings.budget_split(pts, budget, dirs, "accuracy")
    assert split.verdict == FAILS and "2 groups" in split.text and sorted(split.runs) == sorted(runs)
    assert findings.asymmetric_ranks(pts, ranks, dirs, "accuracy").verdict == HOLDS
    # the groups disagree: cannot tell
    pts.loc[pts["run_id"] == "c3", ["ood_test", "ood_test_lo", "ood_test_hi"]] = [0.5, 0.48, 0.52]
    assert findings.budget_split(pts, budget, dirs, "accuracy").verdict == UNSURE


def test_rl_after_cpt_is_not_a_warm_start(tmp_path):
    points = [{"stage": stage, "step": 5 * i, "splits": {"val": right(60, k), "id_test": right(60, k),
                                                         "ood_test": right(60, k)}}
              for stage, steps in (("cpt", (10, 10)), ("rl", (10, 40))) for i, k in enumerate(steps)]
    finding = findings_of(write_run(tmp_path / "r", points, kinds=("cpt", "rl")))["RL"]
    assert finding.verdict == UNSURE and "No RL started from SFT" in finding.text


def test_cpt_perplexity_is_read_in_every_run_and_small_changes_are_noise():
    def verdict(*runs):
        table = pd.DataFrame([{"run_id": r, "split": "heldout", "metric": "perplexity", "step": s, "value": v, "n": 900}
                              for r, values in runs for s, v in zip((0, 40), values)])
        info = pd.DataFrame({"kinds": {r: ("cpt", "sft") for r, _ in runs}, "budget": None})
        return findings.cpt_helps(table, pd.DataFrame(), info, [], {}, "accuracy")

    mixed = verdict(("0aa", (50.0, 60.0)), ("fff", (100.0, 20.0)))  # the first run id rose, the other fell
    assert mixed.verdict == UNSURE and "0aa" in mixed.text and "fff" in mixed.text
    assert verdict(("a", (50.0, 60.0)), ("b", (50.0, 70.0))).verdict == FAILS
    assert verdict(("a", (50.0, 51.0)), ("b", (50.0, 52.0))).verdict == UNSURE  # +2%, +4%: under 5%


def test_rl_verdict_both_ways(tmp_path):
    def rl_run(name, ood_at_rl):
        points = sft_points(ood=[0, 20], idd=[0, 40]) + [
            {"stage": "rl", "step": 5 * i, "splits": {"val": right(60, 40), "id_test": right(60, 40),
                                                     "ood_test": right(60, k)}} for i, k in enumerate(ood_at_rl)]
        return findings_of(write_run(tmp_path / name, points, kinds=("sft", "rl")))["RL"]

    assert rl_run("up", [20, 35, 40]).verdict == HOLDS
    assert rl_run("down", [20, 10, 5]).verdict == FAILS
    assert "75%" in rl_run("up2", [20, 35, 40]).text  # 15 of the 20-example gain by the first evaluation


def test_flip_counts_between_consecutive_checkpoints(tmp_path):
    a, b, c = [1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 1, 1]
    run = write_run(tmp_path / "r", [{"stage": "sft", "step": s, "splits": {"ood_test": v}}
                                     for s, v in ((0, a), (5, b), (10, c))])
    pts = d.points(d.load(run), TASK, "accuracy")
    table = flips(run, pts, "ood_test", "accuracy")
    assert table[["from", "to", "right_to_wrong", "wrong_to_right"]].values.tolist() == [
        ["sft@0", "sft@5", 1, 2], ["sft@5", "sft@10", 2, 0]]


def test_what_sft_broke_and_rl_fixed(tmp_path):
    # OOD: 0..3 right at the peak (sft@10); sft@20 keeps only 0; RL ends with 1 and 2 right again
    n = 8
    peak, end, rl_end = right(n, 4), right(n, 1), right(n, 3)
    points = [{"stage": "sft", "step": 0, "splits": {"ood_test": [0] * n}},
              {"stage": "sft", "step": 10, "splits": {"ood_test": peak}},
              {"stage": "sft", "step": 20, "splits": {"ood_test": end}},
              {"stage": "rl", "step": 0, "splits": {"ood_test": end}},
              {"stage": "rl", "step": 5, "splits": {"ood_test": rl_end}}]
    run = write_run(tmp_path / "r", points, kinds=("sft", "rl"), completion="<b>Answer</b>: x")
    section = {s.key: s for s in task_report(d.load(run), TASK).sections}["flips"]
    text = " ".join(b[1] for b in section.blocks if b[0] == "text")
    assert "3 of 8 OOD examples were right at SFT's OOD peak (sft@10) and wrong at rl@0; RL fixed 2 of them" in text
    shown = [b for b in section.blocks if b[0] == "examples"][0][1]
    assert [e["id"] for e in shown] == ["ex1", "ex2", "ex3"]
    assert [(w, m) for w, _, m in shown[0]["completions"]] == [("sft@10", "right"), ("rl@0", "wrong"), ("rl@5", "right")]


def test_sections_without_a_varied_axis_are_left_out(tmp_path):
    sft_only = task_report(d.load(write_run(tmp_path / "a", sft_points([0, 20, 10], [0, 30, 50]))), TASK)
    assert {s.key for s in sft_only.sections} == {"sft", "scatter", "runs", "flips"}
    points = sft_points([0, 20], [0, 30]) + [
        {"stage": "rl", "step": s, "splits": {"val": right(60, 30), "id_test": right(60, 30), "ood_test": right(60, 25)}}
        for s in (0, 5)] + [{"stage": "baseline", "step": 0, "splits": {"id_test": right(60, 20), "ood_test": right(60, 9)}}]
    with_rl = task_report(d.load(write_run(tmp_path / "b", points, kinds=("sft", "rl"))), TASK)
    assert {s.key for s in with_rl.sections} == {"sft", "rl", "scatter", "runs", "flips", "baseline"}


def test_interpolation_curve_is_drawn_against_alpha(tmp_path):
    points = sft_points([0, 20], [0, 30]) + [
        {"stage": "interpolate", "step": i, "alpha": a, "splits": {"val": right(60, 10 + i), "id_test": right(60, 30),
                                                                  "ood_test": right(60, 20 + i)}}
        for i, a in enumerate((0.0, 0.5, 1.0))]
    report = task_report(d.load(write_run(tmp_path / "r", points, kinds=("sft", "interpolate"))), TASK)
    section = {s.key: s for s in report.sections}["interpolation"]
    table = [b[1] for b in section.blocks if b[0] == "table"][0]
    assert table["a"].tolist() == ["0", "0.5", "1"]


def study_data(tmp_path: Path) -> d.ReportData:
    """Two budget splits and two LoRA-rank pairs as a study table (axes as collect writes them)."""
    runs = {"less-sft": ([0, 20, 40], "1:1", 0.5, 32, 4), "more-sft": ([0, 20, 25], "3:1", 0.75, 4, 32)}
    tables, dirs = [], {}
    for run_id, (ood, budget, share, sft_rank, rl_rank) in runs.items():
        points = sft_points(ood[:2], [0, 30]) + [{"stage": "rl", "step": 5, "splits": {
            "val": right(60, 30), "id_test": right(60, 35), "ood_test": right(60, ood[2])}}]
        dirs[run_id] = write_run(tmp_path / run_id, points, kinds=("sft", "rl"), run_id=run_id)
        table = run_table(dirs[run_id]).assign(**{"stages.sft.lora.rank": sft_rank, "stages.rl.lora.rank": rl_rank,
                                                  "pipeline": "sft-rl", "budget": budget,
                                                  "budget.sft": 960 * share, "budget.rl": 960 * (1 - share)})
        tables.append(table)
    return d.ReportData(tmp_path, "study", pd.concat(tables, ignore_index=True),
                        ["stages.sft.lora.rank", "stages.rl.lora.rank"], dirs, {r: TASK for r in runs})


def test_budget_and_rank_findings_from_a_study_table(tmp_path):
    data = study_data(tmp_path)
    found = {f.title.split()[0]: f for f in all_findings(data, TASK, "accuracy")}
    # the two runs differ in both the budget split and the ranks: neither effect can be separated
    for key in ("Under", "High"):
        assert found[key].verdict == UNSURE and "also differs in another axis" in found[key].text
    sections = {s.key: s for s in task_report(data, TASK).sections}
    assert {"budget", "lora", "rl"} <= set(sections) and "cpt" not in sections

    def ood_flips():
        flips_section = {s.key: s for s in task_report(data, TASK).sections}["flips"]
        flip_rows = [b[1] for b in flips_section.blocks if b[0] == "table"][0]
        return flip_rows[flip_rows["split"] == "ood_test"][["runs", "from", "to"]].values.tolist()

    # equal SFT flips by coincidence are each run's own rows
    assert ood_flips() == [["less-sft", "sft@0", "sft@10"], ["less-sft", "sft@10", "rl@5"],
                           ["more-sft", "sft@0", "sft@10"], ["more-sft", "sft@10", "rl@5"]]
    # more-sft copied SFT up to step 10 from less-sft (the study's branching): one row naming both; RL's stay apart
    (data.run_dirs["more-sft"] / "branched_from.json").write_text(
        json.dumps({"donor": "less-sft", "stage_index": 0, "step": 10}))
    assert ood_flips() == [["less-sft, more-sft", "sft@0", "sft@10"], ["less-sft", "sft@10", "rl@5"],
                           ["more-sft", "sft@10", "rl@5"]]


def test_without_predictions_the_table_intervals_are_compared(tmp_path):
    run = write_run(tmp_path / "r", sft_points(ood=[0, 40, 30, 12], idd=[0, 30, 45, 58]))
    shutil.rmtree(run / "predictions")
    finding = findings_of(run)["SFT"]
    assert finding.verdict == HOLDS and "interval overlap" in finding.text and "paired" not in finding.text


def test_points_scored_on_one_example_show_no_interval_and_no_nan(tmp_path):
    """``eval.max_examples: 1``: tables say ``n/a: n=1`` where the interval goes, comparisons have no sign, and
    no NaN reaches the report, the table or the findings."""
    points = [{"stage": "sft", "step": s, "epoch": float(s), "splits": {"val": [v], "id_test": [v], "ood_test": [o]}}
              for s, v, o in ((0, 0, 0), (1, 1, 1), (2, 1, 0))]
    run = write_run(tmp_path / "r", points)
    table = run_table(run)
    assert table["ci_low"].dtype == float and table["ci_low"].isna().all()  # empty, not None objects
    write_report(run, tmp_path / "out" / "report.html")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "1.000 [n/a: n=1]" in md and not re.search(r"\bnan\b", md, re.I)
    finding = findings_of(run)["SFT"]
    assert finding.verdict != HOLDS and "CI n/a" in finding.text and "nan" not in finding.text.lower()


def test_html_is_self_contained_and_escapes_completions(tmp_path):
    points = [{"stage": "sft", "step": s, "epoch": float(s), "splits": {"val": v, "id_test": v, "ood_test": o}}
              for s, v, o in ((0, [0, 0, 0, 0], [0, 0, 0, 0]), (1, [1, 1, 0, 0], [1, 1, 1, 0]),
                              (2, [1, 1, 1, 0], [0, 0, 0, 0]))]
    run = write_run(tmp_path / "r", points, completion="<script>alert(1)</script>")
    html_path = write_report(run, tmp_path / "out" / "report.html")
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 2  # SFT length, ID-OOD scatter
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:|#)|<script|<link|@import|url\(", page, re.I)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    md = (tmp_path / "out" / "report.md").read_text()
    assert "](report-figures/cell_type_pbmc68k-sft-length.png)" in md
    assert (tmp_path / "out" / "report-figures" / "cell_type_pbmc68k-sft-length.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_report_and_its_one_line_error(tmp_path, capsys):
    run = write_run(tmp_path / "r", sft_points([0, 20, 10], [0, 30, 50]))
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("biopost report:") and "\n" not in err


def arms_data(tmp_path: Path) -> d.ReportData:
    """A text and a fused arm, each SFT for 1 or 2 epochs then RL, over seeds 0 and 1 (axes as collect writes
    them). RL raises OOD in the text arm and lowers it in the fused arm, whose starts are stronger on val."""
    tables, dirs, fused = [], {}, set()
    for arm in ("text", "fused"):
        for epochs in (1, 2):
            for seed in (0, 1):
                run_id = f"{arm}-{epochs}-s{seed}"
                ood = [0, 10 + 5 * seed, 20 + 5 * seed][: epochs + 1]
                points = sft_points(ood, [0, 30, 40][: epochs + 1])
                val_start = 20 if arm == "text" else 50
                rl_ood = ood[-1] + 30 if arm == "text" else 0
                points[-1]["splits"]["val"] = right(60, val_start)
                points += [{"stage": "rl", "step": 0, "splits": {**points[-1]["splits"]}},
                           {"stage": "rl", "step": 5, "splits": {
                               "val": right(60, 30), "id_test": right(60, 35), "ood_test": right(60, rl_ood, 40)}}]
                dirs[run_id] = write_run(tmp_path / run_id, points, kinds=("sft", "rl"), run_id=run_id)
                tables.append(run_table(dirs[run_id]).assign(
                    **{"seed": seed, "stages.sft.epochs": epochs, "pipeline": f"{arm}-sft-rl"}))
                fused |= {run_id} if arm == "fused" else set()
    return d.ReportData(tmp_path, "study", pd.concat(tables, ignore_index=True), ["seed", "stages.sft.epochs"], dirs,
                        {r: TASK for r in dirs}, fused=fused)


def test_rl_curves_of_each_arm_and_seed_are_drawn_and_the_finding_uses_the_text_arm(tmp_path):
    data = arms_data(tmp_path)
    pts = d.points(data, TASK, "accuracy")
    curves = d.rl_curves(data, pts, d.run_info(data, pts))
    assert len(curves) == 8  # 2 arms x 2 SFT lengths x 2 seeds: none replaces another
    assert {c["run_id"].iloc[0] for c in curves.values()} == set(data.run_dirs)
    assert all(f"{c['arm'].iloc[0]} arm" in label for label, c in curves.items())
    rl = {f.title.split()[0]: f for f in all_findings(data, TASK, "accuracy")}["RL"]
    assert rl.verdict == HOLDS and "text arm" in rl.text.split("Other RL curves")[0], rl.paragraph()


def test_sft_length_shows_the_spread_over_seeds_and_arms_are_compared(tmp_path):
    data = arms_data(tmp_path)
    pts = d.points(data, TASK, "accuracy")
    info = d.run_info(data, pts)
    curve, how = d.sft_curve(data, pts, info)
    assert set(curve["run_id"]) <= {"text-1-s0", "text-2-s0"} and "text arm" in how and "seed=0" in how
    spread = d.sft_spread(data, pts, info)
    assert spread["seeds"].tolist() == [2, 2, 2]
    # OOD after 2 epochs: 20/60 (seed 0) and 25/60 (seed 1)
    last = spread.iloc[-1]
    assert last["ood_test_mean"] == pytest.approx(22.5 / 60) and last["ood_test_min"] == pytest.approx(20 / 60)
    assert last["ood_test_max"] == pytest.approx(25 / 60) and last["ood_test_std"] == pytest.approx(np.std([20, 25], ddof=1) / 60)
    sections = {s.key: s for s in task_report(data, TASK).sections}
    seeds_table = [b[1] for b in sections["sft"].blocks if b[0] == "table"][-1]
    assert seeds_table["OOD mean ± sd [min, max]"].iloc[-1].startswith("0.375 ± 0.059 [0.333, 0.417]")
    arms = [b[1] for b in sections["arms"].blocks if b[0] == "table"][0]
    after_rl = arms[(arms["checkpoint"] == "after rl") & (arms["SFT steps"] == 20)].set_index("arm")
    assert after_rl.loc["fused", "OOD"].startswith("0.000") and after_rl.loc["text", "seeds"] == 2
    assert after_rl.loc["text", "OOD"].startswith(f"{(50 + 55) / 2 / 60:.3f} ± ")


def test_a_study_with_one_arm_and_one_seed_has_no_arm_or_seed_section(tmp_path):
    data = study_data(tmp_path)
    pts = d.points(data, TASK, "accuracy")
    assert d.sft_spread(data, pts, d.run_info(data, pts)) is None
    sections = {s.key: s for s in task_report(data, TASK).sections}
    assert "arms" not in sections and "sft-length-seeds" not in [b[1] for b in sections["sft"].blocks if b[0] == "figure"]
