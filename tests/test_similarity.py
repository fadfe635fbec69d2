"""k-mer similarity clusters: profiles against scikit-learn's k-mer counts, blocked links against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from biopost.data.similarity import kmer_clusters, kmer_profiles, linked_pairs, sequence_clusters

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
