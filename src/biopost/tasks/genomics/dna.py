"""Small DNA helpers shared by the genomics tasks: strands, variant windows, users' variant records and plain-language
variant descriptions."""

from __future__ import annotations

COMPLEMENT = str.maketrans("ACGTNacgtn", "TGCANtgcan")


def reverse_complement(seq: str) -> str:
    """The other strand, read 5' to 3'.

    >>> reverse_complement("AACGTN")
    'NACGTT'
    """
    return seq.translate(COMPLEMENT)[::-1]


def first_difference(ref: str, alt: str) -> int:
    """Index of the first base where two windows differ (the shorter length if one is a prefix of the other).

    >>> first_difference("ACGTA", "ACCTA"), first_difference("ACG", "ACGTT")
    (2, 3)
    """
    return next((i for i, (a, b) in enumerate(zip(ref, alt)) if a != b), min(len(ref), len(alt)))


def variant_windows(ref: str, alt: str, size: int | None) -> tuple[str, str]:
    """Both windows cut to ``size`` bases at the same offsets, centred on the first difference (None keeps all).

    >>> variant_windows("AAAACAAAA", "AAAAGAAAA", 3)
    ('ACA', 'AGA')
    >>> variant_windows("ACGT", "ACTT", None)
    ('ACGT', 'ACTT')
    """
    if size is None or max(len(ref), len(alt)) <= size:
        return ref, alt
    start = max(0, first_difference(ref, alt) - size // 2)
    start = min(start, max(0, min(len(ref), len(alt)) - size))
    return ref[start : start + size], alt[start : start + size]


def variant_example(record: dict, where: str, window: int | None, what: str):
    """A user's variant record (``id``, ``question``, ``reference_sequence``, ``variant_sequence``, optional
    ``answer``) as an Example: both sequences checked, then cut by :func:`variant_windows`. ``what`` names the
    record kind in the error for a missing field."""
    from biopost.data import Example
    from biopost.data.sequences import check_sequence

    missing = [k for k in ("question", "reference_sequence", "variant_sequence") if not record.get(k)]
    if missing:
        raise ValueError(f"{where}: a {what} record needs {missing}")
    ref, alt = variant_windows(check_sequence(str(record["reference_sequence"]), "dna", f"{where}: reference_sequence"),
                               check_sequence(str(record["variant_sequence"]), "dna", f"{where}: variant_sequence"),
                               window)
    return Example(id=str(record.get("id", where)), fields={"question": str(record["question"]).strip()},
                   answer=str(record.get("answer", "")), dna=(ref, alt))


def describe_variant(ref: str, alt: str) -> str:
    """One sentence on how the variant window differs from the reference window.

    >>> describe_variant("ACGTA", "ACCTA")
    'The variant window carries a single-base substitution G>C at position 3 of 5.'
    >>> describe_variant("ACGTA", "ACTAA")
    'The variant window differs from the reference from position 3 on (an insertion, deletion or complex change).'
    >>> describe_variant("ACG", "ACG")
    'The variant window is identical to the reference window.'
    """
    if ref == alt:
        return "The variant window is identical to the reference window."
    p = first_difference(ref, alt)
    if len(ref) == len(alt) and sum(a != b for a, b in zip(ref, alt)) == 1:
        return f"The variant window carries a single-base substitution {ref[p]}>{alt[p]} at position {p + 1} of {len(ref)}."
    return (f"The variant window differs from the reference from position {p + 1} on "
            "(an insertion, deletion or complex change).")
