"""Users' sequences, checked as they are read: FASTA files, residue and base alphabets, length limits.

Every refusal is one line naming the file (or table), the record and what to change, so a bad input never
reaches a model as a silently altered sequence.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

# IUPAC codes, upper case (inputs are upper-cased first). DNA: bases plus ambiguity codes; protein: the 20
# standard residues, selenocysteine U, pyrrolysine O and the ambiguity codes B, Z, J, X.
ALPHABETS = {"dna": "ACGTNRYKMSWBDHV", "protein": "ACDEFGHIKLMNPQRSTVWYUOBZJX"}
NAMES = {"dna": "DNA bases", "protein": "amino acids"}
Truncation = Literal["error", "truncate"]


def invalid_letters(sequence: str, modality: str) -> list[str]:
    """Letters of ``sequence`` outside the modality's IUPAC alphabet, in order of first appearance.

    >>> invalid_letters("ACGTN", "dna"), invalid_letters("ACGU-T", "dna"), invalid_letters("MKV1", "protein")
    ([], ['U', '-'], ['1'])
    """
    allowed = ALPHABETS[modality]
    return list(dict.fromkeys(c for c in sequence if c not in allowed))


def check_sequence(sequence: str, modality: str, where: str) -> str:
    """``sequence`` upper-cased, or a one-line error naming ``where`` (file and record) and the bad letters.

    >>> check_sequence("acgt", "dna", "x.csv: example 'e1'")
    'ACGT'
    >>> check_sequence("ACXT", "dna", "x.csv: example 'e1'")
    Traceback (most recent call last):
    ...
    ValueError: x.csv: example 'e1': 'X' at position 3 is not among the DNA bases (ACGTNRYKMSWBDHV); fix or drop this record
    >>> check_sequence("", "protein", "in.fasta: record 'P1'")
    Traceback (most recent call last):
    ...
    ValueError: in.fasta: record 'P1': empty protein sequence; fix or drop this record
    """
    text = re.sub(r"\s+", "", str(sequence)).upper()
    if not text:
        raise ValueError(f"{where}: empty {modality} sequence; fix or drop this record")
    bad = invalid_letters(text, modality)
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        raise ValueError(f"{where}: {shown} at position {text.index(bad[0]) + 1} is not among the {NAMES[modality]} "
                         f"({ALPHABETS[modality]}); fix or drop this record")
    return text


def fit_length(sequence: str, limit: int | None, policy: Truncation, where: str, key: str) -> str:
    """``sequence`` within ``limit`` letters: cut under ``truncate``, refused under ``error`` (``key`` names the
    option that sets the limit, for the fix).

    >>> fit_length("MKVLA", 3, "truncate", "f: record 'a'", "task.options.max_residues")
    'MKV'
    >>> fit_length("MKVLA", 3, "error", "f: record 'a'", "task.options.max_residues")
    Traceback (most recent call last):
    ...
    ValueError: f: record 'a': sequence of 5 exceeds task.options.max_residues (3); raise it, or set truncation: truncate to cut sequences to it
    """
    if limit is None or len(sequence) <= limit:
        return sequence
    if policy == "truncate":
        return sequence[:limit]
    raise ValueError(f"{where}: sequence of {len(sequence)} exceeds {key} ({limit}); raise it, or set "
                     "truncation: truncate to cut sequences to it")


def read_fasta(path: Path, modality: str) -> dict[str, tuple[str, str]]:
    """Record id -> (checked sequence, header line) from a FASTA file (``.gz`` too); a trailing stop ``*`` is
    dropped. Refuses text before the first header, records without a sequence, repeated ids and letters outside
    the alphabet, each in one line."""
    import gzip

    from Bio import SeqIO

    path = Path(path)
    out: dict[str, tuple[str, str]] = {}
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as handle:
        try:
            records = list(SeqIO.parse(handle, "fasta"))
        except (ValueError, OSError, EOFError) as err:  # Biopython explains over several lines; the first says what
            first = str(err).strip().splitlines()[0].rstrip(",.")
            raise ValueError(f"{path.name}: not a FASTA file ({first}); every record starts with a '>ID' "
                             "header line") from None
    if not records:
        raise ValueError(f"{path.name}: no FASTA records (expected '>ID' header lines, each followed by its "
                         "sequence)")
    for number, record in enumerate(records, 1):
        where = f"{path.name}: record {number} ({record.id!r})"
        if not record.id:
            raise ValueError(f"{path.name}: record {number} has an empty header; give it an id after '>'")
        if record.id in out:
            raise ValueError(f"{where}: id repeated; give every record its own id")
        out[record.id] = check_sequence(str(record.seq).rstrip("*"), modality, where), record.description
    return out
