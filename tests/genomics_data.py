"""Small files in the schemas of the BioReason hub datasets, written by the tests themselves (no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

BASES = "ACGT"


def random_dna(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(BASES) for _ in range(n))


def substitute(seq: str, at: int, base: str) -> str:
    return seq[:at] + base + seq[at + 1 :]


def kegg_rows(networks: int = 10, per_network: int = 4, seed: int = 0) -> list[dict]:
    """wanglab/kegg-style records; the variant gene's ``*`` moves between genes of one network."""
    rng = random.Random(seed)
    rows = []
    for j in range(networks):
        a, b = f"G{j}A", f"G{j}B"
        disease = f"disease {j % 6}"  # some diseases occur in several networks
        for i in range(per_network):
            star_a = i % 2 == 0
            network = f"{a}{'*' if star_a else ''} -> {b}{'' if star_a else '*'} -> Ca2+"
            gene = a if star_a else b
            ref = random_dna(rng, 80)
            rows.append({
                "ID": f"k{j}-{i}",
                "question": (f"Chromosome Number: {j % 22 + 1}\nNetwork Definition of the pathway: {network}\n"
                             f"Genes in the pathway: {a}; gene {a} | {b}; gene {b}\n\nGiven this context, what is the "
                             f"biological effect of this {gene} allele, specifically what disease does this contribute to?"),
                "answer": disease if i else disease.upper(),  # spellings differ only in case
                "reference_sequence": ref,
                "variant_sequence": substitute(ref, 40, "T" if ref[40] != "T" else "A"),
                "reasoning": f"Step 1: {gene} is altered.\nStep 2: the {a} pathway is disrupted, causing {disease}.",
            })
    return rows


def coding_rows(n: int = 80, seed: int = 0) -> list[dict]:
    """wanglab/variant_effect_coding-style records: pathogenic = C>T at the centre, benign = A>G."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pathogenic = i % 2 == 0
        ref = substitute(random_dna(rng, 64), 32, "C" if pathogenic else "A")
        alt = substitute(ref, 32, "T" if pathogenic else "G")
        chromosome = ["8", "1", "2", "X"][i % 4]
        answer = f"Pathogenic; disease {i % 3}" if pathogenic else "Benign; not specified"
        rows.append({"ID": f"v{i}", "question": f"This variant lies on chromosome {chromosome} in gene GENE{i % 5}. "
                     "What is its clinical effect?", "answer": answer, "reference_sequence": ref, "variant_sequence": alt})
    return rows


def non_snv_rows(n: int = 40, seed: int = 1) -> list[dict]:
    """wanglab/variant_effect_non_snv-style records (variant window in ``mutated_sequence``)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ref = random_dna(rng, 64)
        alt = ref[:30] + ref[33:] + "NNN"  # a 3-base deletion, padded
        answer = "benign" if i % 2 else f"pathogenic; ['Disease_{i % 4}']"
        rows.append({"question": f"Variant at chromosome {i % 3 + 1}, position {1000 + i}.", "answer": answer,
                     "reference_sequence": ref, "mutated_sequence": alt, "cleaned_pathogenicity": answer.split(";")[0]})
    return rows


def write(rows: list[dict], path: Path) -> Path:
    """JSONL or CSV by suffix."""
    path = Path(path)
    if path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
