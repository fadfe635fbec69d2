"""k-mer similarity clustering (biopost.data.similarity.kmer_clusters): time and memory at a given size.

Synthetic proteome: ``--n`` sequences of ``--length`` residues, drawn as families of ``--family`` members
at ~``--identity`` pairwise identity (point substitutions of a random ancestor), so the graph has real
links. Memory is the peak of Python / NumPy / SciPy allocations during the call (tracemalloc) and the
process's peak resident size; ``profiles_*`` measure building the k-mer profiles alone (the rest of a
call is the pairwise graph). Prints one JSON line.

    python benchmarks/kmer_clusters.py [--n 4000] [--length 450] [--k 5] [--share 0.03125]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import tracemalloc

import numpy as np

from biopost.data.similarity import kmer_clusters, kmer_profiles

AMINO_ACIDS = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def synthetic_proteome(n: int, length: int, family: int, identity: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    keep = np.sqrt(identity)  # two members each keep sqrt(identity) of the ancestor: ~identity to each other
    out = []
    while len(out) < n:
        ancestor = rng.choice(AMINO_ACIDS, length)
        for _ in range(min(family, n - len(out))):
            member = np.where(rng.random(length) < keep, ancestor, rng.choice(AMINO_ACIDS, length))
            out.append("".join(member))
    return out


def measured(function, *args):
    """Seconds, peak traced allocation (bytes) and result of one call."""
    tracemalloc.start()
    start = time.perf_counter()
    result = function(*args)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak, result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--length", type=int, default=450)
    p.add_argument("--family", type=int, default=4)
    p.add_argument("--identity", type=float, default=0.6, help="pairwise identity inside a family")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--share", type=float, default=0.5 ** 5, help="k-mer share threshold (0.5**5: ~50%% identity)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sequences = synthetic_proteome(args.n, args.length, args.family, args.identity, args.seed)
    import scipy.sparse.csgraph  # noqa: F401  (imports are not what is measured)
    import sklearn.feature_extraction.text  # noqa: F401
    profile_seconds, profile_peak, _ = measured(kmer_profiles, sequences, args.k)
    seconds, peak, labels = measured(kmer_clusters, sequences, args.k, args.share)
    print(json.dumps({"benchmark": "kmer_clusters", "n": args.n, "length": args.length, "k": args.k,
                      "share": args.share, "clusters": len(set(labels)), "seconds": round(seconds, 2),
                      "peak_alloc_mb": round(peak / 2**20, 1), "profiles_seconds": round(profile_seconds, 2),
                      "profiles_peak_alloc_mb": round(profile_peak / 2**20, 1),
                      "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "machine": platform.machine()}))


if __name__ == "__main__":
    main()
