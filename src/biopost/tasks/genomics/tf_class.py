"""Which structural class of transcription factor binds a DNA site? Embedded, offline, real data.

Sites come from JASPAR CORE (shipped as SQLite inside the ``pyjaspar`` package; release pinned by
``release``): each single-class profile of the chosen TF structural classes (JASPAR's ``tf_class``) gives
``sites_per_motif`` binding sites drawn base by base from its position frequency matrix (counts plus 0.25
per base, seeded per profile), each shown on a seeded random strand (JASPAR's orientation is arbitrary;
a genome offers both). A site that repeats an earlier one on either strand is redrawn (up to 20 times,
then skipped) so no input occurs twice. Profiles with two classes (dimers) are left out. Sites of one
profile are near copies (same matrix, often the same core), so they are split as one block: every
``matrix_id`` lies in one split (``split_group_field``), and the leakage check refuses one in two splits.

OOD = whole taxa held out: ``meta.taxon`` is the profile's JASPAR taxonomic group; by default plants are
held out (``ood_test``); training and in-domain tests hold the animal, fungal (and one diatom) profiles. Plant sites
shift in two ways over the same five labels: the class mix (bZIP and bHLH make up 64% of plant sites, 24%
of the others) and the sites within a class (an ACGT core in 66% of plant bZIP sites, 38% of the others;
TAAT/ATTA in 63% of plant homeodomain sites, 38% of the others). Holding out insects, nematodes and
urochordates instead (``task.split.ood_test_groups``) gives no measurable shift for the baseline.

Default data (JASPAR2024, one site per profile, split seed 0): 1,128 sites; train 665, val 95, id_test 190,
ood_test 178. Classical baseline (``biopost baseline`` on full splits; logistic regression on 1-4-mer
frequencies of both strands, C = 1 chosen on val): id_test accuracy 0.758 (95% CI 0.695-0.816), ood_test
0.612 (0.534-0.680); always answering the training majority (Homeo domain factors) scores 0.295 / 0.197.
On the frozen encoder of ``configs/demo/genomics-fused-tiny.yaml`` (``--features encoder``: ``tiny-dna``'s last
layer mean-pooled over each site, C = 10): id_test 0.568 (0.500-0.637), ood_test 0.281 (0.219-0.343); k-mers and
encoder together (``kmer+encoder``, C = 0.1): 0.753 / 0.562. The E. coli-pretrained encoder's pooled features carry
the class in-domain, below k-mers, and hardly transfer to plant sites. ``sites_per_motif: 3`` (matrices split
whole): k-mer baseline id_test 0.729 (n 543), ood_test 0.578 (n 514).

Rationale in SFT targets (``<think>``): the k-mers most enriched in each class's *training* sites
(``kmer``-long, both strands, log-ratio against the other classes, at least 3 sites) are the class's
markers; a site's rationale names the markers of its class that it contains, or says that none does.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from pydantic import Field, StrictBool

from biopost.data import Example
from biopost.registry import register_task
from biopost.tasks.base import LabelTask, TaskOptions
from biopost.tasks.genomics.dna import reverse_complement

DEFAULT_CLASSES = [
    "Basic helix-loop-helix factors (bHLH)",
    "Basic leucine zipper factors (bZIP)",
    "C2H2 zinc finger factors",
    "Fork head/winged helix factors",
    "Homeo domain factors",
]
BASES = "ACGT"


class TFClassOptions(TaskOptions):
    release: str = Field("JASPAR2024", description="JASPAR release shipped in pyjaspar")
    classes: list[str] = Field(default_factory=lambda: list(DEFAULT_CLASSES), min_length=2,
                               description="JASPAR tf_class names kept as labels")
    sites_per_motif: int = Field(1, ge=1, description="sites drawn from each profile")
    list_choices: StrictBool = Field(True, description="list the classes in the prompt")
    spaced: StrictBool = Field(False, description="show the site's bases separated by spaces (in text: one token per base "
                         "for tokenizers that split on spaces)")
    rationale: StrictBool = Field(True, description="name the site's class-enriched k-mers in SFT targets")
    kmer: int = Field(4, ge=2, le=8, description="length of the marker k-mers of rationales")
    markers_per_class: int = Field(8, ge=1)
    seed: int = Field(0, description="seed of site sampling and strands")


@register_task
class TFClassJaspar(LabelTask):
    name = "tf_class/jaspar"
    version = "1"
    domain = "genomics"
    Options = TFClassOptions
    default_ood_field = "taxon"
    default_ood_test_groups = ["plants"]
    split_group_field = "matrix_id"  # sites of one matrix are near copies: they share a split
    system_prompt = (
        "You are an expert in gene regulation. Think step by step inside <think> </think>, "
        "then reply with one line 'Answer: <transcription factor class>'."
    )

    def __init__(self, options=None):
        super().__init__(options)
        self.labels = sorted(self.options.classes)
        self.markers: dict[str, list[str]] = {}

    # ---- data
    def load(self) -> list[Example]:
        opts = self.options
        profiles = [p for p in jaspar_profiles(opts.release) if len(p["tf_class"]) == 1 and p["tf_class"][0] in opts.classes]
        missing = sorted(set(opts.classes) - {p["tf_class"][0] for p in profiles})
        if missing:
            raise ValueError(f"no single-class {opts.release} CORE profiles of {missing}; check task.options.classes")
        examples, seen = [], set()
        for p in sorted(profiles, key=lambda p: p["matrix_id"]):
            probs = frequency_matrix(p["counts"])
            base, version = p["matrix_id"].split(".")
            rng = np.random.default_rng([opts.seed, int(base[2:]), int(version)])
            for i in range(opts.sites_per_motif):
                site = next((s for s in (draw_site(probs, rng) for _ in range(20))
                             if min(s, reverse_complement(s)) not in seen), None)
                if site is None:
                    continue
                seen.add(min(site, reverse_complement(site)))
                examples.append(Example(
                    id=f"{p['matrix_id']}-{i}", fields={"site": site}, answer=p["tf_class"][0], dna=site,
                    meta={"taxon": p["tax_group"], "matrix_id": p["matrix_id"], "tf": p["name"],
                          "family": "; ".join(p["tf_family"]), "label": p["tf_class"][0]},
                ))
        return examples

    # ---- rationale statistics, from training sites only
    def fit(self, train) -> None:
        if self.options.rationale:
            self.markers = enriched_kmers([e.dna for e in train], [e.answer for e in train], self.options.kmer,
                                          self.options.markers_per_class)

    def reasoning(self, example: Example) -> str:
        if not self.options.rationale:
            return ""
        if not self.markers:
            raise RuntimeError("call task.fit(train) before building rationale targets")
        site = example.dna
        found = [k if k in site else reverse_complement(k) for k in self.markers.get(example.answer, [])
                 if k in site or reverse_complement(k) in site]
        if not found:
            return f"No k-mer enriched in one class stands out in this site; it fits {example.answer}."
        shown = [" ".join(k) for k in found[:3]] if self.options.spaced else found[:3]
        return f"The site contains {', '.join(shown)}: k-mers enriched in sites of {example.answer}."

    # ---- prompt
    def user_prompt(self, example: Example) -> str:
        site = " ".join(example.dna) if self.options.spaced else example.dna
        text = (f"DNA site: {self.sequence_text('dna', site)}\n"
                "Which structural class of transcription factor binds this site?")
        if self.options.list_choices:
            text += f" Choose one of: {'; '.join(self.labels)}."
        return text

    def leak_keys(self, example: Example) -> list[str]:
        return [example.dna, reverse_complement(example.dna)]

    def example_from_input(self, record: dict, where: str) -> Example:
        """A user's site: ``{"id": ..., "sequence": "ACGT..."}``."""
        seq = str(record.get("sequence", "")).strip().upper()
        if not seq or set(seq) - set(BASES + "N"):
            raise ValueError(f"{where}: a site needs 'sequence' made of A, C, G, T (N allowed)")
        return Example(id=str(record.get("id", where)), fields={"site": seq}, answer=str(record.get("answer", "")),
                       dna=seq)


def jaspar_profiles(release: str) -> list[dict]:
    """CORE profiles of one JASPAR release (latest versions): id, name, class, family, taxon and counts.

    Read from pyjaspar's SQLite once and kept as JSON in the user cache (reading takes seconds).
    """
    import pyjaspar
    from pyjaspar import jaspardb

    from biopost.data.corpus import cached_documents

    def read() -> list[dict]:
        if release not in jaspardb().get_releases():
            raise ValueError(f"JASPAR release {release!r} is not in pyjaspar {pyjaspar.__version__}; available: "
                             f"{', '.join(jaspardb().get_releases())}")
        return [{"matrix_id": m.matrix_id, "name": m.name, "tf_class": list(m.tf_class or []),
                 "tf_family": list(m.tf_family or []), "tax_group": m.tax_group or "unknown",
                 "counts": {b: [float(x) for x in m.counts[b]] for b in BASES}}
                for m in jaspardb(release=release).fetch_motifs(collection="CORE", all_versions=False)]

    return cached_documents(f"jaspar-profiles-{release}-pyjaspar{pyjaspar.__version__}", read)


def frequency_matrix(counts) -> np.ndarray:
    """Per-position base probabilities (4 x length) from JASPAR counts, 0.25 pseudocount per base.

    >>> frequency_matrix({"A": [3, 0], "C": [1, 0], "G": [0, 0], "T": [0, 4]}).round(3)[:, 0].tolist()
    [0.65, 0.25, 0.05, 0.05]
    """
    matrix = np.array([list(counts[b]) for b in BASES], dtype=float) + 0.25
    return matrix / matrix.sum(axis=0, keepdims=True)


def draw_site(probs: np.ndarray, rng: np.random.Generator) -> str:
    """One site drawn base by base from a frequency matrix, then put on a random strand.

    >>> draw_site(np.eye(4), np.random.default_rng(0)) in {"ACGT", "ACGT"[::-1].translate(str.maketrans("ACGT", "TGCA"))}
    True
    """
    cumulative = probs.cumsum(axis=0)
    picks = (rng.random(probs.shape[1])[None, :] > cumulative).sum(axis=0).clip(max=3)
    site = "".join(BASES[i] for i in picks)
    return reverse_complement(site) if rng.random() < 0.5 else site


def enriched_kmers(sites: list[str], labels: list[str], k: int, top: int, min_sites: int = 3) -> dict[str, list[str]]:
    """Per label, the ``top`` k-mers (strand-merged) whose share of sites is highest relative to other labels.

    >>> out = enriched_kmers(["TAATTA", "CTAATG", "ATTAGC", "CACGTG", "GCACGT", "ACACGT"], list("hhhbbb"), 4, 2, 2)
    >>> out["b"], out["h"]  # ATTA stands for TAAT too (its reverse complement)
    (['ACGT', 'CACG'], ['ATTA', 'CTAA'])
    """
    canonical = lambda s: min(s, reverse_complement(s))  # noqa: E731
    present = [{canonical(s[i : i + k]) for i in range(len(s) - k + 1)} for s in sites]
    total = Counter(kmer for p in present for kmer in p)  # sites holding each k-mer, over all labels
    out = {}
    for label in sorted(set(labels)):
        mine = [p for p, y in zip(present, labels) if y == label]
        n_others = len(present) - len(mine)
        counts = Counter(kmer for p in mine for kmer in p)
        score = {}
        for kmer, n in counts.items():
            if n >= min_sites:
                score[kmer] = np.log((n + 1) / (len(mine) + 2)) - np.log((total[kmer] - n + 1) / (n_others + 2))
        ranked = sorted((kmer for kmer in score if score[kmer] > 0), key=lambda x: (-score[x], x))
        out[label] = ranked[:top]
    return out
