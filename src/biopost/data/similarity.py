"""Sequence-similarity clusters, the groups a similarity split holds out whole.

Both methods take a sequence ``identity`` (a fraction) that links two sequences:

``mmseqs``: MMseqs2 ``easy-cluster`` with ``--min-seq-id identity`` and 80% coverage of the member
(``-c 0.8 --cov-mode 1``: the alignment must span 80% of the target, the sequence joining a cluster), with its
greedy set-cover clustering, the field's standard; the binary must be on PATH, e.g. Debian's ``mmseqs2``.
Target coverage puts a fragment in its parent's cluster (the default ``--cov-mode 0`` asks 80% of both, so an
exact 80-residue piece of a 300-residue training protein would be its own cluster and could be tested OOD).

``kmer``: single-linkage clusters over shared k-mers, no alignment. Two sequences are linked when the
distinct k-mers they share cover at least ``identity ** k`` of the shorter one's k-mers: the share a
pair at that identity keeps when substitutions fall at random (a k-mer survives when its k residues all
do). Clusters are the connected components, so no sequence outside a held-out cluster is linked to one
inside it. Measured with ``benchmarks/kmer_identity.py`` (random sequences mutated to an exact identity,
k = 5, identity 0.5): of 300-residue pairs at 40 / 45 / 50 / 55 / 60% identity, 2 / 9 / 37 / 79 / 99% are
linked, all from 70% up, no unrelated pair (100 residues: 50% -> 53%, 60% -> 92%; 1000 residues: 50% ->
37%, 55% -> 100%; one indel per 30 residues: 50% -> 27%, 60% -> 98%). So identity 0.5 splits at about
50-55% identity. Real homologs cluster their substitutions outside conserved blocks, which should keep
more k-mers than random substitutions do (not measured here: no real families ship offline). Below ~0.4,
chance 5-mer matches link unrelated proteins (identity 0.3: 1.5% of unrelated 300-residue pairs), which
single linkage chains into giant clusters; use ``mmseqs`` for remote homology. (Written here because no
installed library clusters by k-mer containment; scipy finds the components.)
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

# Rows of the pairwise k-mer product computed at once: each block holds at most this many pairs, so memory
# grows with the number of sequences, not with its square (CAFA's ~142k proteins: ~10^10 pairs).
BLOCK_PAIRS = 2**22


def sequence_clusters(sequences: list[str], method: str = "kmer", identity: float = 0.5, k: int = 5) -> list[int]:
    """One cluster index per sequence (identical sequences always share a cluster)."""
    if not 0 < identity <= 1:
        raise ValueError(f"sequence identity must be in (0, 1], got {identity}")
    if method == "kmer":
        return kmer_clusters(sequences, k, identity**k)
    if method == "mmseqs":
        return mmseqs_clusters(sequences, identity)
    raise ValueError(f"unknown clustering method {method!r}; valid: kmer, mmseqs")


def kmer_codes(sequence: str, k: int) -> np.ndarray:
    """Sorted distinct k-mers of a sequence as integers (7 bits a residue); shorter ones are padded with '#'.

    >>> kmer_codes("ABAB", 2).tolist() == sorted({ord("A") * 128 + ord("B"), ord("B") * 128 + ord("A")})
    True
    """
    if not 1 <= k <= 8:
        raise ValueError(f"k must be 1 to 8 (k-mers are coded in 7 * k bits of an int64), got {k}")
    residues = np.frombuffer(sequence.ljust(k, "#").encode("ascii", "replace"), dtype=np.uint8).astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(residues, k)
    return np.unique(windows @ (128 ** np.arange(k - 1, -1, -1, dtype=np.int64)))


def kmer_profiles(sequences: list[str], k: int, vocabulary: np.ndarray | None = None):
    """Binary sparse matrix (sequences x distinct k-mers) and its vocabulary (sorted k-mer codes).

    With a ``vocabulary``, columns are its k-mers and others are left out (to compare new sequences with
    fitted ones). Integer codes rather than scikit-learn's CountVectorizer, whose Python string per k-mer
    (~180 bytes) would need >10 GB for CAFA's ~70M k-mers.
    """
    from scipy.sparse import csr_matrix

    codes = [kmer_codes(s, k) for s in sequences]  # each sorted, so each row's columns come out sorted
    flat = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)
    ends = np.cumsum([len(c) for c in codes], dtype=np.int64)
    if vocabulary is None:
        vocabulary, columns = np.unique(flat, return_inverse=True)
    else:  # keep the k-mers the vocabulary has
        columns = np.searchsorted(vocabulary, flat)
        known = columns < len(vocabulary)
        known[known] = vocabulary[columns[known]] == flat[known]
        columns = columns[known]
        ends = np.cumsum(known)[ends - 1] if len(flat) else ends
    indptr = np.concatenate([[0], ends])
    shape = (len(sequences), len(vocabulary))
    return csr_matrix((np.ones(len(columns), dtype=np.int32), columns, indptr), shape=shape), vocabulary


def kmer_clusters(sequences: list[str], k: int = 5, threshold: float = 0.5**5,
                  block_pairs: int = BLOCK_PAIRS) -> list[int]:
    """Connected components of the graph linking sequences that share >= ``threshold`` of their k-mers.

    >>> kmer_clusters(["MKTAYIAKQRQISFVKSHFSRQ", "MKTAYIAKQRQISFVKSHFSRA", "GLFDIVKKVVGALGSL"], k=3)
    [0, 0, 1]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not 0 < threshold <= 1:
        raise ValueError(f"k-mer share threshold must be in (0, 1], got {threshold}")
    profiles, _ = kmer_profiles(sequences, k)
    rows, cols = linked_pairs(profiles, threshold, block_pairs)
    n = len(sequences)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return _first_seen_order(labels)


def linked_pairs(profiles, threshold: float, block_pairs: int = BLOCK_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) whose shared k-mers cover >= ``threshold`` of the smaller profile, one block of rows at a
    time: each block's products are thresholded before the next, so only links are kept."""
    n = profiles.shape[0]
    sizes = np.maximum(np.asarray(profiles.sum(axis=1)).ravel(), 1).astype(np.int32)
    columns = profiles.T.tocsr()  # once: a CSC right operand would be converted again for every block
    step = max(1, block_pairs // max(n, 1))
    rows, cols = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for start in range(0, n, step):
        shared = (profiles[start : start + step] @ columns).tocoo()
        row = shared.row + start
        keep = (row < shared.col) & (shared.data >= threshold * np.minimum(sizes[row], sizes[shared.col]))
        rows.append(row[keep].astype(np.int64))
        cols.append(shared.col[keep].astype(np.int64))
    return np.concatenate(rows), np.concatenate(cols)


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
        done = subprocess.run(mmseqs_command(binary, Path(tmp), min_seq_id, coverage), capture_output=True, text=True)
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


def mmseqs_command(binary: str, tmp: Path, min_seq_id: float, coverage: float) -> list[str]:
    """The ``easy-cluster`` command line; ``--cov-mode 1`` (coverage of the target, the joining member) so that
    fragments join their parents' clusters.

    >>> " ".join(mmseqs_command("mmseqs", Path("t"), 0.5, 0.8)[5:])
    '--min-seq-id 0.5 -c 0.8 --cov-mode 1 --threads 1 -v 1'
    """
    return [binary, "easy-cluster", str(tmp / "in.fasta"), str(tmp / "out"), str(tmp / "work"),
            "--min-seq-id", str(min_seq_id), "-c", str(coverage), "--cov-mode", "1", "--threads", "1", "-v", "1"]


def _first_seen_order(labels) -> list[int]:
    """Relabel clusters 0, 1, 2... in order of first appearance, so labels do not depend on the algorithm's."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(x), len(seen)) for x in labels]
