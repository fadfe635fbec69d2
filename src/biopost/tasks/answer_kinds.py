"""How a table task scores an answer: one label of a set, a set of labels (F1), a number within a tolerance,
or an exact string. Each kind scores a strict parse and a lenient one (parsing.py) separately.

A completion that hedges earns nothing: a label answer naming two labels, a number answer with two numbers
and several ``Answer:`` lines all score 0. A set answer is scored by F1, so naming extra labels costs
precision rather than everything.
"""

from __future__ import annotations

import math
import re

from biopost.tasks.parsing import match_label, normalize

NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: str | None, mode: str = "strict") -> float | None:
    """The one number an answer gives. Strict: the answer is a number. Lenient: it contains exactly one
    number (units and words around it are forgiven). Thousands separators are read as such.

    >>> parse_number("3.5"), parse_number("about 3.5 kb"), parse_number("about 3.5 kb", "lenient")
    (3.5, None, 3.5)
    >>> parse_number("1,200", "lenient"), parse_number("-2e-3"), parse_number("3 or 4", "lenient")
    (1200.0, -0.002, None)
    >>> parse_number(None) is None, parse_number("nan") is None
    (True, True)
    """
    if text is None:
        return None
    text = normalize(text)
    if mode == "strict":
        found = [text] if NUMBER.fullmatch(text) else []
    else:
        found = NUMBER.findall(text)
    if len(found) != 1:
        return None
    value = float(found[0].replace(",", ""))
    return value if math.isfinite(value) else None


def within(predicted: float | None, gold: float, tolerance: float, relative_tolerance: float) -> bool:
    """``|predicted - gold| <= tolerance + relative_tolerance * |gold|``.

    >>> within(10.4, 10.0, 0.5, 0.0), within(10.6, 10.0, 0.5, 0.0), within(105.0, 100.0, 0.0, 0.05)
    (True, False, True)
    >>> within(None, 1.0, 1.0, 1.0)
    False
    """
    return predicted is not None and abs(predicted - gold) <= tolerance + relative_tolerance * abs(gold) + 1e-12


def split_labels(text: str | None, separator: str) -> list[str]:
    """Items of a set answer, stripped, empty ones dropped, first occurrence kept.

    >>> split_labels("T cell; B cell ;; T cell", ";")
    ['T cell', 'B cell']
    """
    if text is None:
        return []
    out: list[str] = []
    for item in (part.strip() for part in text.split(separator)):
        if item and item not in out:
            out.append(item)
    return out


def set_scores(predicted: set[str], gold: set[str]) -> dict[str, float]:
    """Precision, recall, F1 and exact match of a predicted set against the gold set (empty prediction: 0).

    >>> set_scores({"a", "b"}, {"a", "c"})
    {'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'exact_match': 0.0}
    >>> set_scores(set(), {"a"})["f1"], set_scores({"a"}, {"a"})["f1"]
    (0.0, 1.0)
    """
    hits = len(predicted & gold)
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "exact_match": float(bool(predicted) and predicted == gold)}


def label_set(answer: str | None, labels: list[str], separator: str, mode: str) -> set[str]:
    """A set answer mapped onto the label set; an item that matches no label stays in (a false positive).

    >>> sorted(label_set("t cell; B cell; Platelet", ["T cell", "B cell"], ";", "strict"))
    ['B cell', 'T cell', 'platelet']
    """
    out = set()
    for item in split_labels(answer, separator):
        out.add(match_label(item, labels, mode) or normalize(item))
    return out


def exact(answer: str | None, gold: str) -> bool:
    """Equal after normalisation (case, whitespace, quotes, a final period).

    >>> exact(' "TATA box." ', "TATA box"), exact(None, "x")
    (True, False)
    """
    return answer is not None and normalize(answer) == normalize(gold)
