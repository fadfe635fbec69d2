"""Example-level evidence from ``predictions/``: per-example scores of an evaluation point, a paired bootstrap
of the difference between two points scored on the same examples, and flips between consecutive points."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from biopost.study.branch import MARKER

RESAMPLES = 2000
SEED = 0


def predictions_path(run_dir: Path, stage: str, step: int, split: str) -> Path:
    """Where the evaluator wrote a point's records (``stages/context.py``)."""
    return Path(run_dir) / "predictions" / f"{stage}-step{int(step):06d}-{split.replace('/', '_')}.jsonl"


def read_records(path: Path) -> tuple[dict, ...]:
    """A predictions file's records (none when the file is missing); read once per version of the file."""
    if not path.is_file():
        return ()
    stat = path.stat()
    return parse_records(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=512)
def parse_records(path: Path, mtime_ns: int, size: int) -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in path.read_text().splitlines() if line.strip())


def scores(run_dir: Path, point, split: str, metric: str) -> pd.Series | None:
    """Per-example ``metric`` (mean over samples) of one evaluation point, by example id; None without records."""
    records = read_records(predictions_path(run_dir, point["stage"], point["step"], split))
    if not records or metric not in records[0].get("mean", {}):
        return None
    return pd.Series({r["id"]: r["mean"][metric] for r in records}, dtype=float)


@dataclass
class Difference:
    """``b - a`` on the examples both points scored, with a 95% interval."""

    value: float
    low: float
    high: float
    n: int
    method: str  # "paired bootstrap" or "interval overlap"
    level: float = 0.95

    @property
    def sign(self) -> int:
        """+1 / -1 when the interval excludes 0, else 0 (within noise)."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def text(self) -> str:
        """The difference with its interval; ``CI n/a`` where a point had none (one example): then no sign."""
        level = f"{100 * self.level:.3g}% CI"
        interval = f"{level} n/a" if np.isnan([self.low, self.high]).any() else f"{level} {self.low:+.3f} to {self.high:+.3f}"
        return f"{self.value:+.3f} ({interval}, {self.method}, n={self.n})"


def paired_bootstrap(a: pd.Series, b: pd.Series, resamples: int = RESAMPLES, seed: int = SEED,
                     level: float = 0.95) -> Difference:
    """Mean of ``b - a`` over the shared example ids, percentile ``level`` interval from resampling examples.

    >>> a = pd.Series([0.0] * 50 + [1.0] * 50, index=range(100))
    >>> d = paired_bootstrap(a, a.copy())
    >>> (d.value, d.low, d.high, d.sign)
    (0.0, 0.0, 0.0, 0)
    >>> paired_bootstrap(a, pd.Series(1.0, index=range(100))).sign
    1
    """
    ids = a.index.intersection(b.index)
    if len(ids) < 2:
        raise ValueError(f"paired bootstrap needs at least 2 shared examples, got {len(ids)}")
    diff = (b[ids] - a[ids]).to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return Difference(float(diff.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)),
                      len(ids), "paired bootstrap", level)


def interval_difference(a, b, split: str) -> Difference:
    """Without per-example records: ``b - a`` from the table, its sign only where the two 95% intervals are
    disjoint (a conservative test), its bounds the farthest ends of the two intervals."""
    lo, hi = b[f"{split}_lo"] - a[f"{split}_hi"], b[f"{split}_hi"] - a[f"{split}_lo"]
    if np.isnan(lo) or np.isnan(hi):
        lo = hi = float("nan")
    n = min(a[f"{split}_n"], b[f"{split}_n"])
    return Difference(float(b[split] - a[split]), float(lo), float(hi), 0 if pd.isna(n) else int(n), "interval overlap")


def compare(run_dirs: dict[str, Path], a, b, split: str, metric: str, level: float = 0.95) -> Difference:
    """``b - a`` on ``split``: paired over the same test examples where both points' records exist (a ``level``
    interval); else the table's 95% intervals, which cannot be widened."""
    sa = scores(run_dirs[a["run_id"]], a, split, metric)
    sb = scores(run_dirs[b["run_id"]], b, split, metric)
    if sa is not None and sb is not None and len(sa.index.intersection(sb.index)) >= 2:
        return paired_bootstrap(sa, sb, level=level)
    return interval_difference(a, b, split)


def right(values: pd.Series) -> pd.Series:
    """An example is right when its primary score is at least 0.5 (accuracy: correct; F1: more right than not)."""
    return values >= 0.5


def flips(run_dir: Path, run_points: pd.DataFrame, split: str, metric: str) -> pd.DataFrame:
    """For consecutive evaluation points of one run: examples right->wrong and wrong->right on ``split``."""
    rows, previous = [], None
    for _, point in run_points.iterrows():
        current = scores(run_dir, point, split, metric)
        if current is None:
            continue
        if previous is not None:
            before, after = right(previous[1]), right(current)
            ids = before.index.intersection(after.index)
            rows.append({"from": label(previous[0]), "to": label(point), "split": split, "n": len(ids),
                         "right_to_wrong": int((before[ids] & ~after[ids]).sum()),
                         "wrong_to_right": int((~before[ids] & after[ids]).sum()),
                         "to_index": int(point["stage_index"]), "to_step": int(point["step"])})
        previous = (point, current)
    return pd.DataFrame(rows, columns=["from", "to", "split", "n", "right_to_wrong", "wrong_to_right", "to_index",
                                       "to_step"])


def origin(run_dirs: dict[str, Path], run_id: str, stage_index: int, step: int) -> str:
    """The run that computed a point: a branched run's prefix up to its branch point was copied from its donor
    (``branched_from.json``), so its points there are the donor's (or the donor's donor's)."""
    marker = Path(run_dirs[run_id]) / MARKER
    if marker.is_file():
        branch = json.loads(marker.read_text())
        if branch["donor"] in run_dirs and (stage_index, step) <= (branch["stage_index"], branch["step"]):
            return origin(run_dirs, branch["donor"], stage_index, step)
    return run_id


def label(point) -> str:
    return f"{point['stage']}@{int(point['step'])}"


def broken_and_fixed(run_dir: Path, peak, end, rl_end, metric: str, split: str = "ood_test") -> dict | None:
    """Examples right at ``peak`` and wrong at ``end`` (what SFT broke after its OOD peak), and which of those
    are right again at ``rl_end`` (what RL fixed; None without RL), with their records."""
    at_peak, at_end = scores(run_dir, peak, split, metric), scores(run_dir, end, split, metric)
    if at_peak is None or at_end is None:
        return None
    ids = at_peak.index.intersection(at_end.index)
    broken = [i for i in ids if right(at_peak)[i] and not right(at_end)[i]]
    fixed = None
    if rl_end is not None:
        at_rl = scores(run_dir, rl_end, split, metric)
        fixed = [i for i in broken if at_rl is not None and i in at_rl.index and right(at_rl)[i]]
    records = {name: {r["id"]: r for r in read_records(predictions_path(run_dir, p["stage"], p["step"], split))}
               for name, p in (("peak", peak), ("end", end), ("rl_end", rl_end)) if p is not None}
    return {"n": len(ids), "broken": broken, "fixed": fixed, "records": records}
