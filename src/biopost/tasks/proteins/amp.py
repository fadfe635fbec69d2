"""Antimicrobial peptide recognition, with an out-of-domain shift in the negatives.

``amp/modlamp`` (embedded, offline): real peptide sequences shipped in the ``modlamp`` package (BSD-3).
In-domain: antimicrobial peptides (AMPs) against peptides cut from UniProt proteins with no known
antimicrobial activity (``load_AMPvsUniProt``). OOD: AMPs against transmembrane helices
(``load_AMPvsTM``). Both negative sets are non-antimicrobial, but TM helices are hydrophobic like the
amphipathic AMPs, so a classifier that learned "hydrophobic and cationic" from the UniProt negatives is
tested on a real covariate shift of the negative class. The answer is ``antimicrobial`` or ``inactive``
(no antimicrobial activity): neither label contains the other, so lenient matching cannot read a negated
answer ("non-antimicrobial", "not an antimicrobial peptide") as the positive one; such answers, like any
label after a negation, match no label.

Sequences are deduplicated: a sequence in both sets (205 of the 206 AMPs of the TM set are also in the
UniProt set) is kept once, in the OOD set, so it can never be in training and in a test split; the 22
sequences labelled both ways inside the UniProt set are dropped. Result: 4,415 ID peptides (2,335 AMPs,
2,080 others) and 412 OOD peptides (206 / 206); default split: train 3,090, val 442, id_test 883.

Rationale in SFT targets: net charge at pH 7.4 and hydrophobic share (modlamp's GlobalDescriptor),
set against the medians of each class in the *training split only*.

Classical baseline (``biopost baseline configs/demo/protein-text-tiny.yaml --output-dir X
eval.max_examples=null``: 1-3-mer counts, logistic regression fitted on train, C = 100 picked on val, default
split seed 0): val accuracy 0.882 (n = 442), ID accuracy 0.845 (id_test, n = 883), OOD accuracy 0.684
(ood_test, n = 412). The k-mer features lose 0.16 on the transmembrane negatives.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydantic import Field, StrictBool

from biopost.data import Example
from biopost.data.sequences import check_sequence
from biopost.data.splits import subset
from biopost.registry import register_task
from biopost.tasks.base import LabelTask, TaskOptions

AMP, INACTIVE = "antimicrobial", "inactive"


class AMPOptions(TaskOptions):
    rationale: StrictBool = Field(True, description="write a charge / hydrophobicity rationale into SFT targets")
    list_choices: StrictBool = Field(True, description="name the two answers in the prompt")
    max_peptides: int | None = Field(None, ge=1, description="seeded subsample of the in-domain peptides")
    seed: int = 0


@register_task
class ModlampAMP(LabelTask):
    name = "amp/modlamp"
    domain = "proteins"
    version = "2"  # 2: negatives answer "inactive" (was "not antimicrobial")
    Options = AMPOptions
    default_ood_field = "negatives"
    default_ood_test_groups = ["transmembrane"]
    system_prompt = (
        "You are an expert in peptide biology. Think step by step inside <think> </think>, then reply with "
        "one line 'Answer: antimicrobial' or 'Answer: inactive' (no antimicrobial activity)."
    )

    def __init__(self, options=None):
        super().__init__(options)
        self.labels = [AMP, INACTIVE]
        self.medians: dict[str, dict[str, float]] = {}
        self._features: dict[str, dict[str, float]] = {}  # per sequence; modlamp is slow one sequence at a time

    # ---- data
    def load(self) -> list[Example]:
        from modlamp.datasets import load_AMPvsTM, load_AMPvsUniProt

        tm, uniprot = load_AMPvsTM(), load_AMPvsUniProt()
        ood, ood_clash = _labelled(tm.sequences, tm.target)
        pool, clash = _labelled(uniprot.sequences, uniprot.target)
        in_domain = {s: label for s, label in pool.items() if s not in ood}
        in_domain = dict(subset(sorted(in_domain.items()), self.options.max_peptides, self.options.seed))
        print(f"{self.name}: {len(in_domain)} in-domain and {len(ood)} OOD peptides; dropped {clash + ood_clash} "
              f"labelled both ways and {sum(s in ood for s in pool)} in-domain ones also in the OOD set")
        return ([self.example(s, label, "uniprot") for s, label in sorted(in_domain.items())]
                + [self.example(s, label, "transmembrane") for s, label in sorted(ood.items())])

    def example(self, sequence: str, label: int, negatives: str) -> Example:
        answer = AMP if label == 1 else INACTIVE
        digest = hashlib.sha1(sequence.encode()).hexdigest()[:12]
        return Example(id=f"pep-{digest}", fields={}, answer=answer, protein=sequence,
                       meta={"negatives": negatives, "label": answer})

    # ---- rationale statistics, from training peptides only
    def fit(self, train) -> None:
        if not self.options.rationale:
            return
        features = peptide_features([e.protein for e in train])
        self._features.update({e.protein: {name: float(v[i]) for name, v in features.items()} for i, e in enumerate(train)})
        answers = np.array([e.answer for e in train])
        self.medians = {label: {name: float(np.median(values[answers == label])) for name, values in features.items()}
                        for label in self.labels if (answers == label).any()}

    def reasoning(self, example: Example) -> str:
        if not self.options.rationale:
            return example.reasoning
        if not self.medians:
            raise RuntimeError("call task.fit(train) before building rationale targets")
        f = self._features.get(example.protein)
        if f is None:
            f = self._features[example.protein] = {name: float(v[0]) for name, v in peptide_features([example.protein]).items()}
        amp, inactive = self.medians.get(AMP, {}), self.medians.get(INACTIVE, {})
        return (f"Net charge {f['charge']:+.0f} (training medians: antimicrobial {amp.get('charge', 0):+.0f}, inactive "
                f"{inactive.get('charge', 0):+.0f}); hydrophobic share {f['hydrophobic']:.0%} (antimicrobial "
                f"{amp.get('hydrophobic', 0):.0%}, inactive {inactive.get('hydrophobic', 0):.0%}).")

    # ---- prompt
    def user_prompt(self, example: Example) -> str:
        text = f"Peptide sequence: {self.sequence_text('protein', example.protein)}\nIs this peptide antimicrobial?"
        if self.options.list_choices:
            text += f" Choose one of: {AMP}; {INACTIVE} (no antimicrobial activity)."
        return text

    def leak_keys(self, example: Example) -> list[str]:
        return [example.protein]

    def example_from_input(self, record: dict, where: str) -> Example:
        """A user's peptide: ``{"id": ..., "sequence": "GLFDIVKKVV..."}``."""
        if not str(record.get("sequence") or "").strip():
            raise ValueError(f"{where}: a peptide needs 'sequence' (amino acids)")
        sequence = check_sequence(str(record["sequence"]), "protein", where)
        return Example(id=str(record.get("id", where)), fields={}, answer=str(record.get("label", "")), protein=sequence)


def _labelled(sequences, targets) -> tuple[dict[str, int], int]:
    """Each distinct sequence with its label; sequences labelled both ways are dropped (and counted)."""
    labels: dict[str, set[int]] = {}
    for seq, label in zip(sequences, targets):
        labels.setdefault(str(seq), set()).add(int(label))
    kept = {s: next(iter(ls)) for s, ls in labels.items() if len(ls) == 1}
    return kept, len(labels) - len(kept)


def peptide_features(sequences: list[str]) -> dict[str, np.ndarray]:
    """Net charge at pH 7.4 and the share of hydrophobic residues (A, C, F, I, L, M, V), from modlamp.

    >>> f = peptide_features(["KKKKLL"])
    >>> round(float(f["charge"][0])), round(float(f["hydrophobic"][0]), 2)
    (4, 0.33)
    """
    from modlamp.descriptors import GlobalDescriptor

    desc = GlobalDescriptor(list(sequences))
    desc.calculate_charge(ph=7.4, amide=False)
    charge = desc.descriptor[:, 0].copy()
    desc.hydrophobic_ratio()
    return {"charge": charge, "hydrophobic": desc.descriptor[:, 0].copy()}
