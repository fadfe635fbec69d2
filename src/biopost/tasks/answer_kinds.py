"""How a table task scores an answer: one label of a set, a set of labels (F1), a number within a tolerance,
or an exact string. Each kind scores a strict parse and a lenient one (parsing.py) separately.

A completion that hedges earns nothing: a label answer naming two labels, a number answer with two numbers
and several ``Answer:`` lines all score 0. A set answer is scored by F1, so naming extra labels costs
precision rather than everything.
"""

from __future__ import annotations

import re
from decimal import Decimal

from biopost.tasks.parsing import SURROUNDING, match_label, normalize

# A decimal number; thousands separators only in groups of three ("1,500", "12,345.6"; "1,5" is no number).
NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# Lenient: one number, then at most one unit word ("kb", "mg/mL", "%", "°C"), and nothing else.
LENIENT_NUMBER = re.compile(rf"(?P<number>{NUMBER})(?:\s?(?P<unit>(?:[^\W\d_]|[%°µ])[\w/·^°µ%.\-]*))?")
# Words that turn a number into a hedge or a range, never a unit.
NOT_UNITS = {"or", "and", "to", "not", "nor", "maybe", "perhaps", "probably", "possibly", "about", "approx",
             "approximately", "around", "roughly", "nearly", "almost", "ish", "more", "less", "fewer", "plus",
             "minus", "max", "min", "at", "least", "most", "over", "under", "above", "below", "than", "up"}


def parse_number(text: str | None, mode: str = "strict") -> Decimal | None:
    """The number an answer gives, exactly as written (a :class:`~decimal.Decimal`, never rounded), or None.

    Strict: the answer is a number. Lenient forgives form only: quotes, emphasis or brackets around it, a
    final period, and one unit word after it. A hedge, a negation, an inequality, a question, a range or a
    second number is content, not form: no number. Thousands separators must group three digits.

    >>> parse_number("3.5"), parse_number("3.5 kb"), parse_number("**3.5 kb.**", "lenient")
    (Decimal('3.5'), None, Decimal('3.5'))
    >>> parse_number("1,200", "lenient"), parse_number("-2e-3"), parse_number("0.1000000000000000001")
    (Decimal('1200'), Decimal('-0.002'), Decimal('0.1000000000000000001'))
    >>> [parse_number(a, "lenient") for a in ["not 3.5", "< 3.5", "~3.5", "3.5?", "about 3.5", "3.5 or 4",
    ...     "3 to 4 kb", "3.5 maybe", "1,5", "1,5000", "1 500"]]
    [None, None, None, None, None, None, None, None, None, None, None]
    >>> parse_number(None) is None, parse_number("nan") is None, parse_number("1e999") is None
    (True, True, True)
    """
    if text is None:
        return None
    text = normalize(text)
    if mode == "strict":
        number = text if re.fullmatch(NUMBER, text) else None
    else:
        # Not "." on the left: it may start the number (".5").
        match = LENIENT_NUMBER.fullmatch(text.lstrip(SURROUNDING.replace(".", "")).rstrip(SURROUNDING))
        ok = match is not None and (match["unit"] or "").rstrip(SURROUNDING) not in NOT_UNITS
        number = match["number"] if ok else None
    if number is None:
        return None
    value = Decimal(number.replace(",", ""))
    return value if abs(value) <= Decimal(1.7976931348623157e308) else None  # no overflow in later arithmetic


def within(predicted: Decimal | None, gold: Decimal, tolerance: float, relative_tolerance: float) -> bool:
    """``|predicted - gold| <= tolerance + relative_tolerance * |gold|``, in decimal arithmetic: the
    tolerances mean what the config writes (0.1 is one tenth), and tolerance 0 is exact equality.

    >>> d = Decimal
    >>> within(d("10.4"), d("10"), 0.5, 0.0), within(d("10.6"), d("10"), 0.5, 0.0), within(d("105"), d("100"), 0, 0.05)
    (True, False, True)
    >>> within(d("3.6"), d("3.5"), 0.1, 0.0), within(d("3.5000000000001"), d("3.5"), 0.0, 0.0), within(None, d(1), 1, 1)
    (True, False, False)
    """
    if predicted is None:
        return False
    if tolerance == 0 and relative_tolerance == 0:
        return predicted == gold
    return abs(predicted - gold) <= Decimal(repr(tolerance)) + Decimal(repr(relative_tolerance)) * abs(gold)


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
    Two empty sets agree perfectly (the table task refuses empty gold sets at load, since no answer is empty).

    >>> set_scores({"a", "b"}, {"a", "c"})
    {'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'exact_match': 0.0}
    >>> set_scores(set(), {"a"})["f1"], set_scores({"a"}, {"a"})["f1"], set_scores({"a"}, set())["f1"]
    (0.0, 1.0, 0.0)
    >>> set_scores(set(), set())
    {'precision': 1.0, 'recall': 1.0, 'f1': 1.0, 'exact_match': 1.0}
    """
    if not predicted and not gold:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0, "exact_match": 1.0}
    hits = len(predicted & gold)
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "exact_match": float(predicted == gold)}


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
