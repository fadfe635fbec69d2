"""k-mer similarity clusters: profiles against scikit-learn's k-mer counts, blocked links against brute force."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from biopost.data.similarity import kmer_clusters, kmer_profiles, linked_pairs, mmseqs_command, sequence_clusters

AA = list("ACDEFGHIKLMNPQRSTVWY")


def proteome(seed: int = 0, families: int = 12, size: int = 3, length: int = 60) -> list[str]:
    """Families of point-mutated copies (15% of residues redrawn), a few short peptides and a repeat."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(families):
        ancestor = rng.choice(AA, length)
        out += ["".join(np.where(rng.random(length) < 0.15, rng.choice(AA, length), ancestor)) for _ in range(size)]
    return out + ["KKLL", "GLF", out[0]]


def test_profiles_are_scikit_learns_binary_kmer_counts():
    from sklearn.feature_extraction.text import CountVectorizer

    sequences, k = proteome(), 4
    profiles, vocabulary = kmer_profiles(sequences, k)
    padded = [s.ljust(k, "#") for s in sequences]
    reference = CountVectorizer(analyzer="char", ngram_range=(k, k), lowercase=False, binary=True)
    expected = reference.fit_transform(padded)
    assert len(vocabulary) == len(reference.vocabulary_)  # same k-mers, in the same (sorted) order
    assert (profiles != expected).nnz == 0
    query, _ = kmer_profiles(["KKLLW", "WWWWW"], k, vocabulary)  # unseen k-mers are left out
    assert (query != reference.transform(["KKLLW", "WWWWW"])).nnz == 0


@pytest.mark.parametrize("threshold", [0.5**5, 0.2])
def test_blocked_links_are_the_brute_force_links(threshold):
    sequences, k = proteome(1), 5
    kmers = [{s.ljust(k, "#")[i : i + k] for i in range(max(len(s) - k + 1, 1))} for s in sequences]
    expected = {(i, j) for i, j in itertools.combinations(range(len(sequences)), 2)
                if len(kmers[i] & kmers[j]) >= threshold * min(len(kmers[i]), len(kmers[j]))}
    assert len(expected) >= 12  # the families are linked
    profiles, _ = kmer_profiles(sequences, k)
    for block_pairs in (1, 7 * len(sequences), 10**9):  # one row a block, several rows, everything at once
        rows, cols = linked_pairs(profiles, threshold, block_pairs)
        assert set(zip(rows.tolist(), cols.tolist())) == expected
    assert kmer_clusters(sequences, k, threshold, block_pairs=1) == kmer_clusters(sequences, k, threshold)


def test_identity_is_a_fraction():
    with pytest.raises(ValueError, match="identity must be in"):
        sequence_clusters(["MKT"], identity=50)


def test_mmseqs_asks_for_the_coverage_of_the_joining_sequence():
    cmd = mmseqs_command("mmseqs", Path("tmp"), 0.5, 0.8)
    assert cmd[cmd.index("--cov-mode") + 1] == "1" and cmd[cmd.index("-c") + 1] == "0.8"


def test_mmseqs_puts_a_fragment_in_its_parents_cluster():
    """An exact 80-residue piece of a 300-residue protein covers 27% of it: coverage of both sequences
    (MMseqs2's default mode) would leave it alone, out of its parent's cluster. Without the binary, choosing
    mmseqs is a clear error instead."""
    import shutil

    rng = np.random.default_rng(0)
    parents = ["".join(rng.choice(AA, 300)) for _ in range(3)]
    sequences = parents + [parents[0][100:180], parents[1][:60]]
    if shutil.which("mmseqs") is None:
        with pytest.raises(FileNotFoundError, match="needs the MMseqs2 binary on PATH"):
            sequence_clusters(sequences, "mmseqs", 0.5)
        return
    assert sequence_clusters(sequences, "mmseqs", 0.5) == [0, 1, 2, 0, 1]
