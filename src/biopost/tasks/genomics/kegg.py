"""KEGG disease-pathway reasoning: which disease does a variant allele in a KEGG network contribute to?

Records follow the schema of the Hugging Face dataset ``wanglab/kegg`` (BioReason): ``question``,
``answer`` (a disease name), ``reference_sequence`` and ``variant_sequence`` (DNA windows around the
variant), ``reasoning`` (a written rationale) and, where present, ``ID``. They come from the hub
(``task.options.source: wanglab/kegg``, pin ``revision``) or from a local CSV / JSONL / Parquet file with
the same columns. Every split of the hub dataset is read; this task re-splits by network.

The question states the context in labelled lines::

    Chromosome Number: 20
    Network Definition of the pathway: PDYN* -> NMDAR -> Ca2+
    Genes in the pathway: PDYN; prodynorphin | GRIN1; glutamate ionotropic receptor NMDA type subunit 1 | ...

    Given this context, what is the biological effect of this PDYN allele, specifically what disease does
    this contribute to?

**How a record's network is determined.** The network is the text of the ``Network Definition of the
pathway:`` line (KEGG NETWORK's graph notation, e.g. ``PDYN* -> NMDAR -> Ca2+``) with the ``*`` marks
removed (they flag the variant's gene, so records of one network about different genes share a network)
and whitespace collapsed. A question without that line is an error naming the record. ``meta.network``
holds it; the default split holds out a seeded 20% of networks whole as ``ood_test``
(``task.split.seed`` picks them; ``splits.json`` publishes the groups), so no OOD network's definition,
gene list or variants are seen in training. ``meta`` also carries ``chromosome``, ``gene`` (the variant's
gene named in the question), ``disease`` and ``source_split`` (the hub's own split).

**Answers and the label set.** Answers are disease names, merged case- and punctuation-insensitively
(the most frequent spelling is kept). The label set used to parse and score answers is every disease in
the loaded data, not only the training diseases: diseases often belong to one network, so many OOD
networks' diseases never occur in training. A model can still name such a disease (a pretrained language
model knows disease names and may link the pathway's genes to them), and the scorer credits an exact
disease; a classifier trained on the training labels (the classical baseline) cannot, so its OOD accuracy
is bounded by the share of OOD examples whose disease also occurs in some training network (diseases
shared across networks, e.g. cancers reached through several signalling networks). ``list_choices`` puts
that whole label set in every prompt, which turns OOD into a closed-set choice among named diseases; it is
off by default (the research prompt lists none).

Prompt (as the research's text-only arm): the reference and variant windows, then the question. Each
window is shown through :meth:`Task.sequence_text` (text, or a ``<|dna|>`` placeholder for a fused DNA
encoder), optionally cut to ``window`` bases centred on the variant. SFT target: the record's
``reasoning`` in ``<think>`` and ``Answer: <disease>``. Records with identical inputs (question and both
windows) are kept once (the first), so a record never leaks into a test split through its duplicate.
"""

from __future__ import annotations

import re
from collections import Counter

from pydantic import Field, StrictBool

from biopost.data import Example
from biopost.registry import register_task
from biopost.tasks.base import LabelTask, TaskOptions
from biopost.tasks.genomics.dna import variant_example, variant_windows
from biopost.tasks.genomics.tables import read_records, record_id, unique_inputs
from biopost.tasks.parsing import normalize

COLUMNS = ["question", "answer", "reference_sequence", "variant_sequence", "reasoning"]
NETWORK_LINE = re.compile(r"^\s*Network Definition of the pathway\s*:(?P<network>.*)$", re.MULTILINE | re.IGNORECASE)
CHROMOSOME = re.compile(r"Chromosome Number\s*:\s*(?P<chromosome>\S+)", re.IGNORECASE)
VARIANT_GENE = re.compile(r"effect of this (?P<gene>\S+) allele", re.IGNORECASE)


class KeggOptions(TaskOptions):
    source: str = Field(..., description="hub dataset id (wanglab/kegg) or a local .csv / .jsonl / .parquet file")
    revision: str | None = Field(None, description="hub commit, tag or branch to pin (recommended)")
    window: int | None = Field(None, ge=1, description="bases of each DNA window kept, centred on the variant; None = all")
    list_choices: StrictBool = Field(False, description="list every disease of the data (the label set) in the prompt")


def network_of(question: str) -> str | None:
    """The KEGG network of a question: its network definition without variant marks, whitespace collapsed.

    >>> network_of("Chromosome Number: 20\\nNetwork Definition of the pathway: PDYN* ->  NMDAR -> Ca2+\\nGenes ...")
    'PDYN -> NMDAR -> Ca2+'
    >>> a = network_of("Network Definition of the pathway: (PSEN1*,PSEN2) -> NOTCH")
    >>> a, a == network_of("Network Definition of the pathway: (PSEN1,PSEN2*) -> NOTCH")
    ('(PSEN1,PSEN2) -> NOTCH', True)
    >>> network_of("no network here") is None
    True
    """
    match = NETWORK_LINE.search(question)
    if not match:
        return None
    # the mark is deleted, not spaced: "(A*,B)" and "(A,B*)" are one network, whichever gene is varied
    return " ".join(match.group("network").replace("*", "").split()) or None


def canonical_answers(answers: list[str]) -> dict[str, str]:
    """Map each normalised answer to its most frequent spelling (ties: alphabetical first).

    >>> canonical_answers(["Parkinson disease", "parkinson disease", "Parkinson disease."])["parkinson disease"]
    'Parkinson disease'
    """
    counts = Counter(a.strip() for a in answers)
    best: dict[str, str] = {}
    for spelling in sorted(counts, key=lambda s: (-counts[s], s)):
        best.setdefault(normalize(spelling), spelling)
    return best


@register_task
class KeggDisease(LabelTask):
    name = "kegg/disease"
    version = "1"
    domain = "genomics"
    Options = KeggOptions
    default_ood_field = "network"
    default_ood_test_groups = 0.2
    system_prompt = (
        "You are an expert in human genetics and KEGG pathways. Think step by step inside <think> </think>, "
        "then reply with one line 'Answer: <disease>'."
    )

    def __init__(self, options=None):
        super().__init__(options)
        self.labels: list[str] = []
        self.dropped_duplicates = 0

    def load(self) -> list[Example]:
        rows = read_records(self.options.source, self.options.revision, COLUMNS, "wanglab/kegg")
        canon = canonical_answers([r["answer"] for r in rows])
        examples, self.dropped_duplicates = unique_inputs([self.example_from_row(r, canon[normalize(r["answer"])])
                                                           for r in rows], self.name)
        self.labels = sorted({e.answer for e in examples})
        return examples

    def example_from_row(self, row: dict, answer: str) -> Example:
        question = row["question"].strip()
        network = network_of(question)
        if network is None:
            raise ValueError(f"record {record_id(row)}: question has no 'Network Definition of the pathway:' line, "
                             "so its KEGG network (the OOD group) is unknown")
        ref, alt = variant_windows(row["reference_sequence"].strip().upper(), row["variant_sequence"].strip().upper(),
                                   self.options.window)
        chromosome, gene = CHROMOSOME.search(question), VARIANT_GENE.search(question)
        return Example(
            id=record_id(row),
            fields={"question": question},
            answer=answer,
            reasoning=row["reasoning"].strip(),
            dna=(ref, alt),
            meta={"network": network, "disease": answer, "source_split": row["source_split"],
                  "chromosome": chromosome.group("chromosome") if chromosome else "unknown",
                  "gene": gene.group("gene") if gene else "unknown"},
        )

    def user_prompt(self, example: Example) -> str:
        ref, alt = example.dna
        text = (f"Reference sequence: {self.sequence_text('dna', ref)}\n"
                f"Variant sequence: {self.sequence_text('dna', alt)}\n"
                f"Question: {example.fields['question']}")
        if self.options.list_choices:
            text += f"\nChoose one of: {'; '.join(self.labels)}."
        return text

    def leak_keys(self, example: Example) -> list[str]:
        return [example.fields["question"], example.dna[1]]

    def example_from_input(self, record: dict, where: str) -> Example:
        """A user's record: ``{"id", "question", "reference_sequence", "variant_sequence"}``."""
        return variant_example(record, where, self.options.window, "KEGG")
