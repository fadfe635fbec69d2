"""CAFA scoring of GO predictions: answer parsing, propagated precision / recall / F1, Fmax over thresholds.

Answer format: the ``Answer:`` line lists GO IDs separated by commas (``Answer: GO:0005515, GO:0005739``).
Strict parsing accepts only that (commas, semicolons or spaces between IDs, an optional final period);
lenient parsing takes every ``GO:nnnnnnn`` (or ``GO_nnnnnnn``, any case) on the answer line. Repeats
count once. Both sets, predicted and gold, are propagated to all ancestors over is_a and part_of before
comparing, and the three roots are left out, so naming a root or a repeat earns nothing and listing many
terms costs precision.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

STRICT_LIST = re.compile(r"\A\s*GO:\d{7}(?:\s*[,;]?\s*GO:\d{7})*\s*\.?\s*\Z")
STRICT_ID = re.compile(r"GO:\d{7}")
LENIENT_ID = re.compile(r"(?<![A-Za-z0-9])GO[:_](\d{7})(?!\d)", re.IGNORECASE)
THRESHOLDS = np.round(np.arange(0.01, 1.001, 0.01), 2)  # CAFA's threshold grid


def parse_go_terms(answer: str | None, mode: str = "strict") -> list[str] | None:
    """GO IDs of an answer line, in order of first mention, or None when the line is not a GO list.

    >>> parse_go_terms("GO:0005515, GO:0005739; GO:0005515.")
    ['GO:0005515', 'GO:0005739']
    >>> parse_go_terms("binds proteins (GO:0005515)") is None
    True
    >>> parse_go_terms("binds proteins (go_0005515), in GO:0005739", "lenient")
    ['GO:0005515', 'GO:0005739']
    >>> parse_go_terms("no GO term here", "lenient") is None
    True
    """
    if answer is None:
        return None
    if mode == "strict":
        found = STRICT_ID.findall(answer) if STRICT_LIST.match(answer) else []
    elif mode == "lenient":
        found = [f"GO:{digits}" for digits in LENIENT_ID.findall(answer)]
    else:
        raise ValueError(f"unknown parse mode {mode!r}; valid: strict, lenient")
    return list(dict.fromkeys(found)) or None


def precision_recall_f1(predicted: Iterable[str], gold: Iterable[str],
                        weights: Mapping[str, float] | None = None) -> tuple[float, float, float]:
    """Precision, recall and F1 of two (already propagated) term sets, optionally IA-weighted.

    An empty prediction has precision 0; a term missing from ``weights`` weighs 0.

    >>> [round(x, 4) for x in precision_recall_f1({"a", "b", "c", "d"}, {"a", "b", "e"})]
    [0.5, 0.6667, 0.5714]
    >>> precision_recall_f1({"a", "x"}, {"a", "b"}, weights={"a": 3.0, "b": 1.0, "x": 1.0})
    (0.75, 0.75, 0.75)
    >>> precision_recall_f1(set(), {"a"})
    (0.0, 0.0, 0.0)
    """
    def mass(terms) -> float:
        return float(len(terms)) if weights is None else float(sum(weights.get(t, 0.0) for t in terms))

    predicted, gold = set(predicted), set(gold)
    hit, pred, true = mass(predicted & gold), mass(predicted), mass(gold)
    precision = hit / pred if pred > 0 else 0.0
    recall = hit / true if true > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def fmax(scores: Sequence[Mapping[str, float]], golds: Sequence[Iterable[str]],
         weights: Mapping[str, float] | None = None, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
    """CAFA's protein-centric Fmax: the best F over score thresholds.

    ``scores[i]`` maps terms to a score in [0, 1] for protein i (already propagated: an ancestor scores
    at least as high as its descendants); ``golds[i]`` is its propagated gold set. Proteins without gold
    terms are not part of the benchmark. At threshold t, precision is averaged over proteins with at least
    one term scoring >= t (weighted: positive predicted weight), recall over every benchmark protein.

    >>> fmax([{"a": 1.0, "b": 0.5}, {"c": 0.5}], [{"a", "b"}, {"d"}])  # t <= .5: p = (1 + 0)/2, r = (1 + 0)/2
    {'fmax': 0.5, 'threshold': 0.01, 'coverage': 1.0, 'n': 2}
    """
    pairs = [(s, set(g)) for s, g in zip(scores, golds) if g]
    best = {"fmax": 0.0, "threshold": float("nan"), "coverage": 0.0, "n": len(pairs)}
    if not pairs:
        return best
    thresholds = np.sort(np.asarray(thresholds, dtype=float))

    def mass_above(values, terms) -> np.ndarray:
        """Summed weight of the terms scoring >= each threshold (a missing score is NaN: never above)."""
        weight = np.array([1.0 if weights is None else weights.get(t, 0.0) for t in terms])
        return (np.asarray(values, dtype=float)[None, :] >= thresholds[:, None]) @ weight

    hit, predicted = np.zeros((2, len(pairs), len(thresholds)))
    true = np.zeros(len(pairs))
    predicted_by_scores: dict[int, np.ndarray] = {}  # once per distinct mapping: the naive predictor shares one
    for i, (score, gold) in enumerate(pairs):
        if id(score) not in predicted_by_scores:
            predicted_by_scores[id(score)] = mass_above(list(score.values()), list(score))
        predicted[i] = predicted_by_scores[id(score)]
        in_gold = list(gold)
        hit[i] = mass_above([score.get(t, np.nan) for t in in_gold], in_gold)
        true[i] = len(gold) if weights is None else sum(weights.get(t, 0.0) for t in gold)
    covered = predicted > 0  # precision is averaged over proteins with a (positive-weight) prediction
    precision = np.divide(hit, predicted, out=np.zeros_like(hit), where=covered)
    recall = np.divide(hit, true[:, None], out=np.zeros_like(hit), where=true[:, None] > 0)
    n_covered = covered.sum(axis=0)
    p = np.divide(precision.sum(axis=0), n_covered, out=np.zeros(len(thresholds)), where=n_covered > 0)
    r = recall.mean(axis=0)
    f = np.divide(2 * p * r, p + r, out=np.zeros(len(thresholds)), where=(p + r > 0) & (n_covered > 0))
    t = int(np.argmax(f))  # the lowest threshold among ties
    if f[t] > 0:
        best = {"fmax": float(f[t]), "threshold": float(thresholds[t]), "coverage": float(n_covered[t] / len(pairs)),
                "n": len(pairs)}
    return best
