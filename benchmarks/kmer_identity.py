"""What sequence identity the k-mer similarity rule corresponds to (biopost.data.similarity, method kmer).

For each true identity, ``--pairs`` random sequences of ``--length`` residues are each paired with a copy
whose residues are substituted at random until exactly that share is identical (optionally with one
single-residue insertion or deletion per ``--indel-every`` residues), and the share of pairs the rule
links at ``--identity`` is counted. Unrelated random pairs give the false-link rate. Prints one JSON line.

    python benchmarks/kmer_identity.py [--identity 0.5] [--k 5] [--length 300] [--indel-every 0]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from biopost.data.similarity import kmer_profiles, linked_pairs

AMINO_ACIDS = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def mutated(rng, sequence: np.ndarray, identity: float, indel_every: int) -> np.ndarray:
    out = sequence.copy()
    changed = rng.choice(len(out), round((1 - identity) * len(out)), replace=False)
    for i in changed:  # a different residue, so identity is exact
        out[i] = rng.choice(AMINO_ACIDS[AMINO_ACIDS != out[i]])
    for _ in range(len(out) // indel_every if indel_every else 0):
        i = rng.integers(len(out))
        out = np.insert(out, i, rng.choice(AMINO_ACIDS)) if rng.random() < 0.5 else np.delete(out, i)
    return out


def link_rate(pairs: list[tuple[str, str]], k: int, threshold: float) -> float:
    linked = 0
    for a, b in pairs:
        rows, _ = linked_pairs(kmer_profiles([a, b], k)[0], threshold)
        linked += len(rows)
    return linked / len(pairs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--identity", type=float, default=0.5, help="the rule's identity (threshold identity**k)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--length", type=int, default=300)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--indel-every", type=int, default=0, help="one indel per this many residues (0: none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    threshold = args.identity**args.k
    rates = {}
    for true in (0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9):
        pairs = []
        for _ in range(args.pairs):
            base = rng.choice(AMINO_ACIDS, args.length)
            pairs.append(("".join(base), "".join(mutated(rng, base, true, args.indel_every))))
        rates[f"{true:.2f}"] = round(link_rate(pairs, args.k, threshold), 3)
    unrelated = [("".join(rng.choice(AMINO_ACIDS, args.length)), "".join(rng.choice(AMINO_ACIDS, args.length)))
                 for _ in range(args.pairs)]
    print(json.dumps({"benchmark": "kmer_identity", "identity": args.identity, "k": args.k, "threshold": threshold,
                      "length": args.length, "indel_every": args.indel_every, "pairs": args.pairs,
                      "linked_by_true_identity": rates, "linked_unrelated": link_rate(unrelated, args.k, threshold)}))


if __name__ == "__main__":
    main()
