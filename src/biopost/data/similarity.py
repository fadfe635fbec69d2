"""Sequence-similarity clusters, the groups a similarity split holds out whole.

``kmer``: single-linkage clusters over shared k-mers. Two sequences are linked when the distinct k-mers
they share cover at least ``threshold`` of the shorter one's k-mers; clusters are the connected
components, so no sequence outside a held-out cluster reaches the threshold with any sequence inside it.
(Written here because no installed library clusters by k-mer containment; scikit-learn counts the k-mers
and scipy finds the components.)

``mmseqs``: MMseqs2 ``easy-cluster`` at ``threshold`` sequence identity and 80% coverage (its greedy
set-cover clustering, the field's standard; the binary must be on PATH, e.g. Debian's ``mmseqs2``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np


def sequence_clusters(sequences: list[str], method: str = "kmer", threshold: float = 0.5, k: int = 5) -> list[int]:
    """One cluster index per sequence (identical sequences always share a cluster)."""
    if method == "kmer":
        return kmer_clusters(sequences, k, threshold)
    if method == "mmseqs":
        return mmseqs_clusters(sequences, threshold)
    raise ValueError(f"unknown clustering method {method!r}; valid: kmer, mmseqs")


def kmer_profiles(sequences: list[str], k: int, vocabulary=None):
    """Binary sparse matrix (sequences x distinct k-mers) and the fitted vectorizer."""
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(analyzer="char", ngram_range=(k, k), lowercase=False, binary=True,
                                 vocabulary=vocabulary, dtype=np.int32)
    padded = [s if len(s) >= k else s + "#" * (k - len(s)) for s in sequences]  # short peptides keep one k-mer
    matrix = vectorizer.fit_transform(padded) if vocabulary is None else vectorizer.transform(padded)
    return matrix.tocsr(), vectorizer


def kmer_clusters(sequences: list[str], k: int = 5, threshold: float = 0.5) -> list[int]:
    """Connected components of the graph linking sequences that share >= ``threshold`` of their k-mers.

    >>> kmer_clusters(["MKTAYIAKQRQISFVKSHFSRQ", "MKTAYIAKQRQISFVKSHFSRA", "GLFDIVKKVVGALGSL"], k=3)
    [0, 0, 1]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not 0 < threshold <= 1:
        raise ValueError(f"k-mer similarity threshold must be in (0, 1], got {threshold}")
    profiles, _ = kmer_profiles(sequences, k)
    sizes = np.asarray(profiles.sum(axis=1)).ravel()
    shared = (profiles @ profiles.T).tocoo()
    smaller = np.minimum(sizes[shared.row], sizes[shared.col])
    keep = shared.data >= threshold * np.maximum(smaller, 1)
    n = len(sequences)
    graph = coo_matrix((np.ones(keep.sum()), (shared.row[keep], shared.col[keep])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return _first_seen_order(labels)


def mmseqs_clusters(sequences: list[str], min_seq_id: float = 0.5, coverage: float = 0.8) -> list[int]:
    """MMseqs2 ``easy-cluster`` clusters (one thread, so results do not depend on the machine)."""
    from Bio.Seq import Seq
    from Bio.SeqIO import write
    from Bio.SeqRecord import SeqRecord

    binary = shutil.which("mmseqs")
    if binary is None:
        raise FileNotFoundError("similarity clustering with mmseqs needs the MMseqs2 binary on PATH "
                                "(apt-get install mmseqs2); or set task.options.similarity_method: kmer")
    with tempfile.TemporaryDirectory() as tmp:
        fasta = Path(tmp) / "in.fasta"
        write([SeqRecord(Seq(s), id=f"s{i}", description="") for i, s in enumerate(sequences)], fasta, "fasta")
        cmd = [binary, "easy-cluster", str(fasta), str(Path(tmp) / "out"), str(Path(tmp) / "work"),
               "--min-seq-id", str(min_seq_id), "-c", str(coverage), "--threads", "1", "-v", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mmseqs easy-cluster failed: {done.stderr.strip()[-500:]}")
        rep = {}
        for line in (Path(tmp) / "out_cluster.tsv").read_text().splitlines():
            head, member = line.split("\t")
            rep[int(member[1:])] = int(head[1:])
    missing = [i for i in range(len(sequences)) if i not in rep]
    if missing:
        raise RuntimeError(f"mmseqs left {len(missing)} sequences unclustered (e.g. index {missing[0]})")
    return _first_seen_order(np.array([rep[i] for i in range(len(sequences))]))


def _first_seen_order(labels) -> list[int]:
    """Relabel clusters 0, 1, 2... in order of first appearance, so labels do not depend on the algorithm's."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(x), len(seen)) for x in labels]
