"""Variant effect prediction: is a variant benign or pathogenic?

Two registered tasks read the schemas of the BioReason datasets on the Hugging Face hub (or local CSV /
JSONL / Parquet files with the same columns):

``variant_effect/coding`` (``wanglab/variant_effect_coding``; coding SNVs from ClinVar and gnomAD):
``ID``, ``question``, ``answer``, ``reference_sequence``, ``variant_sequence``. The answer is
``"<Pathogenic|Benign>; <free text>"``, the free text naming the disease ("not provided" / "not
specified" when none is known).

``variant_effect/non_snv`` (``wanglab/variant_effect_non_snv``; insertions, deletions and other non-SNV
ClinVar variants): ``question``, ``answer``, ``reference_sequence`` and ``mutated_sequence`` (the variant
window; ``variant_sequence`` is accepted too), sometimes more columns, which are ignored. The answer is
``"benign"``, ``"pathogenic"`` or ``"pathogenic; ['Disease_name', ...]"``.

The model answers ``benign`` or ``pathogenic`` (a two-label task); the disease on record, when there is
one, goes into the SFT rationale, with a description of the change computed from the two windows.

OOD: ``meta.chromosome`` is parsed from the question (``chromosome 8``, ``Chromosome Number: 8``,
``chr8``; ``unknown`` when the question names none). The default holds out chromosome 8 whole, as the
research's coding test split did. ``meta.disease`` (the disease on record, ``none`` for benign or
unannotated variants) allows a disease-disjoint split instead (``task.split: {ood_field: disease,
ood_test_groups: [...]}``); name the diseases explicitly: every benign variant sits in group ``none``,
so a held-out disease list makes an all-pathogenic OOD split. ``meta.source_split`` keeps the hub's own
split. Records with identical inputs (question and both windows; the coding data holds some, at times
with different disease text) are kept once, the first, so no input reaches both train and a test split.
"""

from __future__ import annotations

import ast
import re

from pydantic import Field, StrictBool

from biopost.data import Example
from biopost.registry import register_task
from biopost.tasks.base import LabelTask, TaskOptions
from biopost.tasks.genomics.dna import describe_variant, variant_example, variant_windows
from biopost.tasks.genomics.tables import read_records, record_id, unique_inputs

CHROMOSOME = re.compile(r"\b(?:chromosome(?:\s+number)?\s*:?\s*|chr)(?P<chromosome>[0-9]{1,2}|X|Y|MT|M)(?=[pq][0-9]|\b)",
                        re.IGNORECASE)  # a band (8q24.21) still names chromosome 8
NO_DISEASE = {"", "not provided", "not specified", "none"}
LABELS = ["benign", "pathogenic"]


class VariantEffectOptions(TaskOptions):
    source: str = Field(..., description="hub dataset id (wanglab/variant_effect_coding, wanglab/variant_effect_non_snv) "
                        "or a local .csv / .jsonl / .parquet file")
    revision: str | None = Field(None, description="hub commit, tag or branch to pin (recommended)")
    window: int | None = Field(None, ge=1, description="bases of each DNA window kept, centred on the variant; None = all")
    rationale: StrictBool = Field(True, description="describe the change and the disease on record in SFT targets")


def parse_effect(answer: str) -> tuple[str, str]:
    """(pathogenicity, disease or '') from a dataset answer in either schema.

    >>> parse_effect("Pathogenic; Renal tubular epithelial cell apoptosis")
    ('pathogenic', 'Renal tubular epithelial cell apoptosis')
    >>> parse_effect("pathogenic; ['Congenital_myasthenic_syndrome_8', 'Other']")
    ('pathogenic', 'Congenital myasthenic syndrome 8, Other')
    >>> parse_effect("Benign; not specified"), parse_effect("benign")
    (('benign', ''), ('benign', ''))
    """
    label, _, rest = answer.partition(";")
    label, rest = label.strip().lower(), rest.strip()
    if rest.startswith("["):
        try:
            items = ast.literal_eval(rest)
        except (SyntaxError, ValueError):
            items = [rest.strip("[]")]
        rest = ", ".join(str(i).replace("_", " ").strip() for i in items if str(i).strip())
    return label, "" if rest.lower() in NO_DISEASE else rest


def chromosome_of(question: str) -> str:
    """The chromosome a question names, or ``unknown``.

    >>> chromosome_of("a variant on chromosome 8 at position 1000"), chromosome_of("Chromosome Number: X")
    ('8', 'X')
    >>> chromosome_of("in the 8q24.21 band of chromosome 8q24.21"), chromosome_of("chromosome 1p36")
    ('8', '1')
    >>> chromosome_of("located at chr17:43106528"), chromosome_of("no location")
    ('17', 'unknown')
    """
    match = CHROMOSOME.search(question)
    return match.group("chromosome").upper() if match else "unknown"


class VariantEffectTask(LabelTask):
    domain = "genomics"
    version = "1"
    Options = VariantEffectOptions
    default_ood_field = "chromosome"
    default_ood_test_groups = ["8"]
    schema: str
    variant_columns: tuple[str, ...]
    system_prompt = (
        "You are an expert in clinical genetics. Think step by step inside <think> </think>, "
        "then reply with one line 'Answer: benign' or 'Answer: pathogenic'."
    )

    def __init__(self, options=None):
        super().__init__(options)
        self.labels = list(LABELS)
        self.dropped_duplicates = 0

    def load(self) -> list[Example]:
        rows = read_records(self.options.source, self.options.revision, ["question", "answer", "reference_sequence"],
                            self.schema)
        column = next((c for c in self.variant_columns if c in rows[0]), None)
        if column is None:
            raise ValueError(f"{self.options.source} has no variant window column; the {self.schema} schema names it "
                             f"{' or '.join(self.variant_columns)}")
        examples, self.dropped_duplicates = unique_inputs([self.example_from_row(r, column) for r in rows], self.name)
        return examples

    def example_from_row(self, row: dict, column: str) -> Example:
        label, disease = parse_effect(row["answer"])
        if label not in LABELS:
            raise ValueError(f"record {record_id(row)}: answer {row['answer']!r} is neither benign nor pathogenic")
        ref, alt = variant_windows(row["reference_sequence"].strip().upper(), row[column].strip().upper(),
                                   self.options.window)
        return Example(
            id=record_id(row),
            fields={"question": row["question"].strip()},
            answer=label,
            reasoning=_rationale(ref, alt, label, disease),
            dna=(ref, alt),
            meta={"chromosome": chromosome_of(row["question"]), "disease": disease or "none", "label": label,
                  "source_split": row["source_split"]},
        )

    def reasoning(self, example: Example) -> str:
        return example.reasoning if self.options.rationale else ""

    def user_prompt(self, example: Example) -> str:
        ref, alt = example.dna
        return (f"Reference sequence: {self.sequence_text('dna', ref)}\n"
                f"Variant sequence: {self.sequence_text('dna', alt)}\n"
                f"Question: {example.fields['question']}\nIs this variant benign or pathogenic?")

    def leak_keys(self, example: Example) -> list[str]:
        return [example.dna[1]]

    def example_from_input(self, record: dict, where: str) -> Example:
        """A user's record: ``{"id", "question", "reference_sequence", "variant_sequence"}``."""
        return variant_example(record, where, self.options.window, "variant")


def _rationale(ref: str, alt: str, label: str, disease: str) -> str:
    text = describe_variant(ref, alt)
    if label == "pathogenic" and disease:
        return f"{text} Variants like this are recorded as disease-causing: {disease}."
    if label == "pathogenic":
        return f"{text} Variants like this are recorded as disease-causing."
    return f"{text} Variants like this are recorded as tolerated, with no disease association."


@register_task
class CodingVariantEffect(VariantEffectTask):
    name = "variant_effect/coding"
    schema = "wanglab/variant_effect_coding"
    variant_columns = ("variant_sequence",)


@register_task
class NonSNVVariantEffect(VariantEffectTask):
    name = "variant_effect/non_snv"
    schema = "wanglab/variant_effect_non_snv"
    variant_columns = ("mutated_sequence", "variant_sequence")
