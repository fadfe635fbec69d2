"""Answer parsing shared by every task: a strict and a lenient mode, scored separately.

Strict: the whole completion is ``<think> ... </think>`` then one ``Answer:`` line and nothing after; the
answer is a label up to case, spacing, surrounding quotes or emphasis, and a final period.

Lenient forgives form, never content. On top of strict it forgives exactly: a missing or malformed think
block (any text before the one ``Answer:``), articles (a, an, the), the words "cell", "cells" and "type"
(also hyphenated: "B-cell"), and punctuation around the answer (quotes, emphasis, brackets, a final
``.,;:!``). Anything else is extra content and scores 0: an alternative ("X or Y"), a negation ("not X"),
a qualifier ("probably X"), another label, or any further non-blank line after the answer line.

Both modes refuse several ``Answer:`` lines, so repeating or hedging an answer never earns credit.
"""

from __future__ import annotations

import re

# Possessive quantifiers (*+) keep matching linear: a lazy answer before \s*\Z was quadratic on long blank runs.
STRICT = re.compile(r"\A\s*<think>(?P<think>.*?)</think>\s*Answer:[ \t]*+(?P<answer>[^\n]*+)\s*+\Z", re.DOTALL)
ANSWER = re.compile(r"answer:", re.IGNORECASE)
PARSE_MODES = ("strict", "lenient")


def parse_answer(completion: str, mode: str = "strict") -> str | None:
    """Return the answer text, or None when the completion has no single clean answer.

    >>> parse_answer("<think>\\nlines\\nof thought\\n</think>\\n\\nAnswer: CD19+ B")
    'CD19+ B'
    >>> parse_answer("Answer: CD19+ B") is None, parse_answer("Answer: CD19+ B", "lenient")
    (True, 'CD19+ B')
    >>> parse_answer("<think></think>Answer: a\\nAnswer: a", "lenient") is None
    True
    >>> parse_answer("<think></think>Answer: CD19+ B\\nor maybe Dendritic", "lenient") is None  # a further answer
    True
    >>> parse_answer("", "lenient") is None, parse_answer("<think>no answer</think>") is None
    (True, True)
    """
    if mode not in PARSE_MODES:
        raise ValueError(f"unknown parse mode {mode!r}; valid: {PARSE_MODES}")
    if len(ANSWER.findall(completion)) != 1:
        return None
    if mode == "strict":
        if completion.count("<think>") != 1 or completion.count("</think>") != 1:
            return None
        match = STRICT.match(completion)
        return match.group("answer").strip() or None if match else None
    line, _, rest = completion[ANSWER.search(completion).end():].strip().partition("\n")
    if rest.strip():  # text after the answer line is content lenient mode does not forgive
        return None
    return line.strip() or None


def normalize(text: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding quotes or a final period (strict form).

    >>> normalize('  "CD14+   Monocyte." ')
    'cd14+ monocyte'
    """
    text = " ".join(text.split()).strip().strip("\"'`*").rstrip(".").strip()
    return text.casefold()


ARTICLES = {"a", "an", "the"}
FORM_WORDS = ARTICLES | {"cell", "cells", "type"}
SURROUNDING = "\"'`*_()[]{}.,;:! "


def lenient_form(text: str, words: set[str] = FORM_WORDS) -> str:
    """The strict form without articles, "cell(s)" / "type", or punctuation around it (see the module doc);
    ``words=ARTICLES`` drops only articles and punctuation.

    >>> lenient_form("The CD8+ Cytotoxic T-cells.")
    'cd8+ cytotoxic t'
    >>> lenient_form("(Dendritic cell type)"), lenient_form("not a B cell"), lenient_form("The B cell.", ARTICLES)
    ('dendritic', 'not b', 'b cell')
    """
    kept = [w for w in normalize(text).strip(SURROUNDING).split() if w not in words]
    if words is FORM_WORDS:
        kept = [re.sub(r"-(cells?|type)$", "", w) for w in kept]
    return " ".join(kept)


def match_label(answer: str | None, labels: list[str], mode: str = "strict") -> str | None:
    """Map a parsed answer to exactly one label, or None.

    Strict: the answer is a label in strict form (:func:`normalize`). Lenient: the answer is a label in
    lenient form (:func:`lenient_form`): form is forgiven, nothing else. The closest match wins: the strict
    form, then without articles and punctuation, then without "cell(s)" / "type" too; so with labels "B"
    and "B cell", "the B cell" is "B cell" and "B" is "B", while "B cells", which fits both, matches none.

    >>> labels = ["CD4+/CD25 T Reg", "CD4+/CD45RO+ Memory", "CD14+ Monocyte", "CD19+ B", "Dendritic"]
    >>> match_label("dendritic.", labels)
    'Dendritic'
    >>> match_label("a dendritic cell", labels), match_label("a dendritic cell", labels, "lenient")
    (None, 'Dendritic')
    >>> match_label('"The CD19+ B-cells."', labels, "lenient")
    'CD19+ B'
    >>> [match_label(a, labels, "lenient") for a in ["CD4+/CD25 T Regulatory or CD4+/CD45RO+ Memory T",
    ...     "Dendritic or CD19+ B", "not CD14+ Monocyte", "probably Dendritic", "CD19+ B, Dendritic"]]
    [None, None, None, None, None]
    >>> [match_label(a, ["B", "B cell"], "lenient") for a in ["B cell", "b", "The B cell.", "B cells"]]
    ['B cell', 'B', 'B cell', None]
    """
    if answer is None:
        return None
    # Closest form first: a label matched as written wins over one that only matches once "cell" is dropped.
    forms = (normalize,) if mode == "strict" else (normalize, lambda text: lenient_form(text, ARTICLES), lenient_form)
    for form in forms:
        key = form(answer)
        matches = [label for label in labels if form(label) == key]
        if matches:
            return matches[0] if len(matches) == 1 else None
    return None
