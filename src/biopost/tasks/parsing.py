"""Answer parsing shared by every task: a strict and a lenient mode, scored separately.

Strict: the whole completion is ``<think> ... </think>`` then one ``Answer:`` line and nothing after.
Lenient: exactly one ``Answer:`` anywhere; its line is the answer. Both refuse several ``Answer:`` lines,
so repeating or hedging an answer never earns credit.
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
    tail = completion[ANSWER.search(completion).end():]
    answer = tail.strip().split("\n", 1)[0].strip()
    return answer or None


def normalize(text: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding quotes or a final period.

    >>> normalize('  "CD14+   Monocyte." ')
    'cd14+ monocyte'
    """
    text = " ".join(text.split()).strip().strip("\"'`*").rstrip(".").strip()
    return text.casefold()


def match_label(answer: str | None, labels: list[str], mode: str = "strict") -> str | None:
    """Map a parsed answer to exactly one label, or None.

    Strict: the answer is a label. Lenient: the answer mentions exactly one label (longest labels claim
    their text first); naming two or more labels is no answer.

    >>> labels = ["CD8+ Cytotoxic T", "CD8+/CD45RA+ Naive Cytotoxic", "Dendritic"]
    >>> match_label("dendritic.", labels)
    'Dendritic'
    >>> match_label("a dendritic cell", labels), match_label("a dendritic cell", labels, "lenient")
    (None, 'Dendritic')
    >>> match_label("Dendritic or CD8+ Cytotoxic T", labels, "lenient") is None
    True
    """
    if answer is None:
        return None
    norm = normalize(answer)
    by_norm = {normalize(label): label for label in labels}
    if mode == "strict":
        return by_norm.get(norm)
    found: set[str] = set()
    remaining = norm
    for key in sorted(by_norm, key=len, reverse=True):
        pattern = r"(?<![\w+])" + re.escape(key) + r"(?![\w+])"
        if re.search(pattern, remaining):
            found.add(by_norm[key])
            remaining = re.sub(pattern, " ", remaining)
    return found.pop() if len(found) == 1 else None
