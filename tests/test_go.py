"""Gene Ontology task on the shipped go-basic.obo: closure, alt_ids, IA, CAFA scores, splits, reward gaming.

Every expected number is worked out by hand from the OBO text (quoted in comments), not by the code.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from biopost.config import ConfigError
from biopost.data import SplitRule, make_splits
from biopost.registry import get_task
from biopost.tasks.proteins.go_scoring import fmax, parse_go_terms, precision_recall_f1
from biopost.tasks.proteins.ontology import default_obo_path, information_accretion, load_ontology, read_ia_table
from conftest import assert_prompt_shows_placeholder

MITO, CYTO, INTRA, CELL_ENTITY = "GO:0005739", "GO:0005737", "GO:0005622", "GO:0110165"
MEMBRANE, PROTEIN_BINDING, BINDING = "GO:0016020", "GO:0005515", "GO:0005488"
# mitochondrion: is_a GO:0043231 (intracellular membrane-bounded organelle), part_of GO:0005737 (cytoplasm);
# GO:0043231 is_a GO:0043227, GO:0043229; both is_a GO:0043226 (organelle); GO:0043229 part_of GO:0005622;
# cytoplasm is_a GO:0110165, part_of GO:0005622; GO:0005622 and GO:0043226 is_a GO:0110165, is_a GO:0005575.
MITO_CLOSURE = {MITO, "GO:0043231", CYTO, "GO:0043227", "GO:0043229", "GO:0043226", INTRA, CELL_ENTITY}
CC_ROOT, MF_ROOT, BP_ROOT = "GO:0005575", "GO:0003674", "GO:0008150"


@pytest.fixture(scope="module")
def onto():
    return load_ontology()


# ---------------------------------------------------------------- ontology
def test_closure_of_hand_checked_terms(onto):
    assert onto.ancestors(MITO) == MITO_CLOSURE | {CC_ROOT}
    assert onto.propagate([MITO]) == MITO_CLOSURE  # roots left out by default
    assert onto.propagate([PROTEIN_BINDING], roots=True) == {PROTEIN_BINDING, BINDING, MF_ROOT}
    # GO:0042981 regulation of apoptotic process: is_a GO:0043067, regulates GO:0006915 (not followed)
    up = onto.ancestors("GO:0042981")
    assert "GO:0043067" in up and "GO:0006915" not in up and BP_ROOT in up
    assert onto.aspects[MITO] == "CC" and onto.aspects[PROTEIN_BINDING] == "MF"


def test_alt_ids_map_to_primary_and_obsolete_terms_are_dropped(onto, capsys):
    # protein binding lists alt_id GO:0001948 and GO:0045308; GO:0000005 is obsolete
    assert onto.canonical("GO:0001948") == onto.canonical("GO:0045308") == PROTEIN_BINDING
    assert onto.propagate(["GO:0001948"]) == onto.propagate([PROTEIN_BINDING])
    assert onto.canonical("GO:0000005") is None and "GO:0000005" in onto.obsolete
    assert onto.propagate(["GO:0000005", "GO:9999999"]) == frozenset()
    text = default_obo_path().read_text()
    assert len(onto.obsolete) == text.count("\nis_obsolete: true")
    assert len(onto) + len(onto.obsolete) == text.count("\n[Term]")
    assert onto.leaves([MITO, CYTO, INTRA, "GO:0001948"]) == [PROTEIN_BINDING, MITO]  # sorted by ID


def test_any_obo_file_with_the_message_counting_obsolete_terms(tmp_path, capsys):
    obo = tmp_path / "mini.obo"
    obo.write_text(
        "format-version: 1.2\ndata-version: mini/1\n\n"
        "[Term]\nid: GO:0008150\nname: biological_process\nnamespace: biological_process\n\n"
        "[Term]\nid: GO:0000001\nname: a\nnamespace: biological_process\nalt_id: GO:0000009\nis_a: GO:0008150\n\n"
        "[Term]\nid: GO:0000002\nname: b\nnamespace: biological_process\nrelationship: part_of GO:0000001\n\n"
        "[Term]\nid: GO:0000003\nname: c\nnamespace: biological_process\nis_obsolete: true\n"
    )
    mini = load_ontology(obo, cache=False)
    assert "mini/1: 3 terms; 1 obsolete terms dropped, 1 alt_ids" in capsys.readouterr().out
    assert mini.propagate(["GO:0000002"]) == {"GO:0000001", "GO:0000002"}
    assert mini.canonical("GO:0000009") == "GO:0000001" and mini.canonical("GO:0000003") is None
    with pytest.raises(FileNotFoundError, match="task.options.obo"):
        load_ontology(tmp_path / "missing.obo")


def test_closure_stays_inside_an_aspect_as_in_cafa(tmp_path, capsys):
    # full go.obo links aspects, e.g. a molecular function part_of a biological process; CAFA scores each
    # aspect on its own graph, so such an edge propagates nothing
    obo = tmp_path / "go-full.obo"
    obo.write_text(
        "format-version: 1.2\ndata-version: full/1\n\n"
        "[Term]\nid: GO:0008150\nname: biological_process\nnamespace: biological_process\n\n"
        "[Term]\nid: GO:0003674\nname: molecular_function\nnamespace: molecular_function\n\n"
        "[Term]\nid: GO:0000001\nname: p\nnamespace: biological_process\nis_a: GO:0008150\n\n"
        "[Term]\nid: GO:0000002\nname: f\nnamespace: molecular_function\nis_a: GO:0003674\n"
        "relationship: part_of GO:0000001\n\n"
        "[Term]\nid: GO:0000004\nname: g\nnamespace: molecular_function\nis_a: GO:0000002\nis_a: GO:0000001\n"
    )
    full = load_ontology(obo, cache=False)
    assert "2 edges between aspects dropped" in capsys.readouterr().out
    assert full.ancestors("GO:0000002") == {"GO:0000002", MF_ROOT}
    assert full.propagate(["GO:0000004"]) == {"GO:0000004", "GO:0000002"}
    assert full.propagate(["GO:0000001"]) == {"GO:0000001"}
    assert all(full.aspects[a] == full.aspects[t] for t in full.names for a in full.ancestors(t))


def test_information_accretion_on_a_small_table(onto):
    table = {"a": [MITO], "b": ["GO:0043231"], "c": [CYTO], "d": [INTRA], "e": [MEMBRANE]}
    ia = information_accretion(onto, table)
    # holders after propagation: GO:0110165 all 5; GO:0005622 a,b,c,d; cytoplasm a,c; GO:0043231 a,b; mito a
    assert ia[CELL_ENTITY] == pytest.approx(-math.log2(5 / 5))
    assert ia[INTRA] == pytest.approx(-math.log2(4 / 5))  # parent GO:0110165
    assert ia[CYTO] == pytest.approx(-math.log2(2 / 4))  # parents GO:0110165 and GO:0005622: a,b,c,d
    assert ia[MITO] == pytest.approx(-math.log2(1 / 1))  # parents GO:0043231 and cytoplasm: only a
    assert ia["GO:0043231"] == pytest.approx(0.0)  # parents GO:0043227, GO:0043229: a, b
    assert ia[MEMBRANE] == pytest.approx(-math.log2(1 / 5))
    assert ia[CC_ROOT] == 0.0 and PROTEIN_BINDING not in ia


# ---------------------------------------------------------------- scores
def test_propagated_precision_recall_f1_by_hand(onto):
    gold = onto.propagate([MITO])  # 8 terms
    p, r, f = precision_recall_f1(onto.propagate([CYTO]), gold)  # cytoplasm -> {cytoplasm, 0110165, 0005622}
    assert (p, r) == (1.0, 3 / 8) and f == pytest.approx(2 * 1 * 0.375 / 1.375)
    p, r, f = precision_recall_f1(onto.propagate([MITO, PROTEIN_BINDING]), gold)  # 8 right + 2 wrong
    assert (p, r) == (0.8, 1.0) and f == pytest.approx(2 * 0.8 / 1.8)
    weights = {t: 1.0 for t in gold} | {CYTO: 4.0, PROTEIN_BINDING: 2.0, BINDING: 0.0}
    p, r, _ = precision_recall_f1(onto.propagate([CYTO, PROTEIN_BINDING]), gold, weights)
    assert p == pytest.approx(6 / 8) and r == pytest.approx(6 / 11)  # hits 4+1+1, predicted 6+2+0, gold 7+4


def test_fmax_by_hand(onto):
    cc = lambda terms: {t for t in onto.propagate(terms) if onto.aspects[t] == "CC"}  # noqa: E731
    # protein A, gold mitochondrion; samples predict mitochondrion and cytoplasm: cytoplasm's 3 terms score 1,
    # the 5 others 0.5. Protein B, gold cytoplasm; both samples predict membrane: {membrane, 0110165} score 1.
    a = {t: (1.0 if t in cc([CYTO]) else 0.5) for t in cc([MITO])}
    b = {t: 1.0 for t in cc([MEMBRANE])}
    golds = [cc([MITO]), cc([CYTO])]
    low = (np.mean([1.0, 0.5]), np.mean([1.0, 1 / 3]))  # t <= .5: A all 8 right; B 1 of 2 right, 1 of 3 found
    high = (np.mean([1.0, 0.5]), np.mean([3 / 8, 1 / 3]))  # t > .5: A keeps 3 of 8
    f = lambda p, r: 2 * p * r / (p + r)  # noqa: E731
    result = fmax([a, b], golds)
    assert result["fmax"] == pytest.approx(max(f(*low), f(*high))) == pytest.approx(f(*low))
    assert result["threshold"] == 0.01 and result["coverage"] == 1.0 and result["n"] == 2
    assert fmax([{}, {}], golds)["fmax"] == 0.0  # nothing predicted at any threshold


def test_answer_format_strict_and_lenient():
    assert parse_go_terms("GO:0005739, GO:0005737") == [MITO, CYTO]
    assert parse_go_terms("GO:0005739 GO:0005737.") == [MITO, CYTO]
    assert parse_go_terms("mitochondrion (GO:0005739)") is None
    assert parse_go_terms("mitochondrion (GO:0005739), go_0005737", "lenient") == [MITO, CYTO]
    assert parse_go_terms("GO:00057391", "lenient") is None  # eight digits is no GO ID


# ---------------------------------------------------------------- task on CAFA-style files
AA = "ACDEFGHIKLMNPQRSTVWY"


def random_protein(rng, n=90) -> str:
    return "M" + "".join(rng.choice(list(AA), n - 1))


def mutate(rng, seq: str, rate=0.04) -> str:
    return "".join(rng.choice(list(AA)) if rng.random() < rate and i else c for i, c in enumerate(seq))


@pytest.fixture(scope="module")
def cafa_files(tmp_path_factory):
    """12 proteins in 3 taxa; two families of near copies across taxa; dated, mostly experimental annotations."""
    rng = np.random.default_rng(7)
    fam_a, fam_b = random_protein(rng), random_protein(rng)
    seqs = {f"P{i:02d}": random_protein(rng) for i in range(1, 13)}
    for members, base in ((("P01", "P05", "P09"), fam_a), (("P02", "P06", "P10"), fam_b)):
        for m in members:
            seqs[m] = mutate(rng, base)
    seqs["P12"] = seqs["P11"]  # identical sequences: merged into P11
    taxa = {p: ("9606" if i <= 4 else "10090" if i <= 8 else "559292") for i, p in enumerate(sorted(seqs), 1)}
    rows = [("P01", MITO, "IDA", "20190105"), ("P02", CYTO, "IMP", "20190301"), ("P03", MEMBRANE, "IDA", "20180101"),
            ("P03", "GO:0005634", "IDA", "20210101"), ("P04", PROTEIN_BINDING, "IPI", "20190101"),
            ("P04", "GO:0003677", "IEA", "20190101"), ("P05", MITO, "EXP", "20190101"), ("P06", CYTO, "IDA", "20190101"),
            ("P07", "GO:0001948", "IPI", "20190101"), ("P08", "GO:0000005", "IDA", "20190101"),
            ("P08", "GO:0006915", "IMP", "20190101"), ("P09", MITO, "IDA", "20210101"), ("P10", CYTO, "IDA", "20210202"),
            ("P11", "GO:0003677", "IDA", "20210303"), ("P12", "GO:0005634", "IDA", "20210303"),
            ("P13", MITO, "IDA", "20190101")]  # P13 has no sequence
    root = tmp_path_factory.mktemp("cafa")
    (root / "seqs.fasta").write_text("".join(f">{p} {taxa[p]}\n{s}\n" for p, s in seqs.items()))
    (root / "terms.tsv").write_text("EntryID\tterm\tevidence\tdate\n" + "".join("\t".join(r) + "\n" for r in rows))
    (root / "context.tsv").write_text("protein\tterm\nP01\tGO:0005515\nP01\tGO:0016020\n")
    return root


def cafa_task(files, **options):
    return get_task("go/cafa", {"fasta": str(files / "seqs.fasta"), "annotations": str(files / "terms.tsv"),
                                "columns": {"protein": "EntryID"}, **options})


def test_cafa_loader_filters_maps_and_merges(cafa_files, capsys):
    task = cafa_task(cafa_files, context=str(cafa_files / "context.tsv"))
    examples = {e.id: e for e in task.load()}
    out = capsys.readouterr().out
    assert "merged 1 proteins" in out and "1 annotated proteins have no sequence" in out
    assert "kept 15 of 16 annotations" in out and "dropped 1 annotations to obsolete or unknown terms" in out
    assert sorted(examples) == [f"P{i:02d}" for i in range(1, 12)]  # P12 merged into P11, P13 has no sequence
    assert examples["P04"].answer == PROTEIN_BINDING  # the IEA annotation is left out
    assert examples["P07"].answer == PROTEIN_BINDING  # alt_id GO:0001948
    assert examples["P08"].answer == "GO:0006915"  # the obsolete term is gone
    assert examples["P11"].answer == "GO:0003677, GO:0005634"  # united with its identical twin P12
    assert examples["P01"].meta["taxon"] == "9606" and examples["P01"].fields["context"] == [PROTEIN_BINDING, MEMBRANE]
    prompt = task.user_prompt(examples["P01"])
    assert examples["P01"].protein in prompt and "GO:0005515 protein binding" in prompt


def test_taxon_split_holds_out_whole_species(cafa_files):
    task = cafa_task(cafa_files)
    rule = SplitRule(ood_field=task.default_ood_field, ood_test_groups=("559292",), val_fraction=0.2, id_test_fraction=0.2)
    splits = make_splits(task.load(), rule, task.input_key)
    assert {e.meta["taxon"] for e in splits.ood_test} == {"559292"}
    assert {e.id for e in splits.ood_test} == {"P09", "P10", "P11"}
    assert all(e.meta["taxon"] != "559292" for n in ("train", "val", "id_test") for e in splits[n])


def test_time_split_is_a_snapshot_at_the_cutoff(cafa_files):
    task = cafa_task(cafa_files, ood="time", cutoff_date="2020-01-01")
    rule = SplitRule(task.default_ood_field, tuple(task.default_ood_test_groups))
    splits = make_splits(task.load(), rule, task.input_key)
    assert {e.id for e in splits.ood_test} == {"P09", "P10", "P11"}  # first annotated after the cutoff
    in_domain = {e.id: e for n in ("train", "val", "id_test") for e in splits[n]}
    assert in_domain["P03"].answer == MEMBRANE  # its 2021 nucleus annotation is after t0
    assert all(e.meta["period"] == "before" for e in in_domain.values())
    with pytest.raises(ConfigError, match="cutoff_date"):
        cafa_task(cafa_files, ood="time")


def test_time_split_treats_a_root_only_past_as_no_knowledge(tmp_path):
    rng = np.random.default_rng(3)
    seqs = {f"P{i}": random_protein(rng) for i in range(4)}
    rows = [("P0", CC_ROOT, "20180101"), ("P0", MITO, "20210101"),  # before t0: only the (unscored) CC root
            ("P1", MF_ROOT, "20180101"), ("P2", CYTO, "20180101"), ("P3", MEMBRANE, "20210101")]
    (tmp_path / "s.fasta").write_text("".join(f">{p} 9606\n{s}\n" for p, s in seqs.items()))
    (tmp_path / "t.tsv").write_text("protein\tterm\tevidence\tdate\n"
                                    + "".join(f"{p}\t{t}\tIDA\t{d}\n" for p, t, d in rows))
    options = {"fasta": str(tmp_path / "s.fasta"), "annotations": str(tmp_path / "t.tsv"), "ood": "time",
               "cutoff_date": "2020-01-01", "rationale": "none"}
    examples = {e.id: e for e in get_task("go/cafa", options).load()}
    assert examples["P0"].meta["period"] == "after" and examples["P0"].answer == MITO
    assert examples["P2"].meta["period"] == "before" and examples["P3"].meta["period"] == "after"
    assert "P1" not in examples  # nothing but a root, ever: no scored term
    with_roots = {e.id: e for e in get_task("go/cafa", {**options, "score_roots": True}).load()}
    assert with_roots["P0"].meta["period"] == "before" and with_roots["P0"].answer == CC_ROOT


def load_or_refuse_without_mmseqs(task, method):
    """The task's examples; without the MMseqs2 binary, choosing mmseqs must be a clear error instead (None)."""
    if method == "mmseqs" and shutil.which("mmseqs") is None:
        with pytest.raises(FileNotFoundError, match="needs the MMseqs2 binary on PATH"):
            task.load()
        return None
    return task.load()


@pytest.mark.parametrize("method", ["kmer", "mmseqs"])
def test_similarity_split_keeps_families_together(cafa_files, method):
    task = cafa_task(cafa_files, ood="similarity", similarity_method=method)
    examples = load_or_refuse_without_mmseqs(task, method)
    if examples is None:
        return
    cluster = {e.id: e.meta["cluster"] for e in examples}
    assert cluster["P01"] == cluster["P05"] == cluster["P09"] != cluster["P02"] == cluster["P06"] == cluster["P10"]
    assert len(set(cluster.values())) == 11 - 4
    for seed in range(4):
        splits = make_splits(examples, SplitRule("cluster", 0.3, seed=seed, val_fraction=0.2, id_test_fraction=0.2),
                             task.input_key)
        held = {cluster[e.id] for e in splits.ood_test}
        assert held and not held & {cluster[e.id] for n in ("train", "val", "id_test") for e in splits[n]}


@pytest.mark.parametrize("method", ["kmer", "mmseqs"])
def test_default_similarity_split_keeps_two_thirds_identical_homologs_together(tmp_path, method):
    rng = np.random.default_rng(1)
    seqs = {}
    for family in range(10):  # members keep 80% of a common ancestor: ~65% identical to each other
        ancestor = random_protein(rng, 200)
        for member in range(4):
            seqs[f"F{family}_{member}"] = mutate(rng, ancestor, rate=0.2)
    (tmp_path / "s.fasta").write_text("".join(f">{p} 9606\n{s}\n" for p, s in seqs.items()))
    (tmp_path / "t.tsv").write_text("protein\tterm\tevidence\n" + "".join(f"{p}\t{MITO}\tIDA\n" for p in seqs))
    task = get_task("go/cafa", {"fasta": str(tmp_path / "s.fasta"), "annotations": str(tmp_path / "t.tsv"),
                                "ood": "similarity", "similarity_method": method, "rationale": "none"})
    examples = load_or_refuse_without_mmseqs(task, method)
    if examples is None:
        return
    family = lambda e: e.id.split("_")[0]  # noqa: E731
    assert len({e.meta["cluster"] for e in examples}) == 10
    assert all(len({e.meta["cluster"] for e in examples if family(e) == f"F{f}"}) == 1 for f in range(10))
    for seed in range(3):
        splits = make_splits(examples, SplitRule("cluster", 0.2, seed=seed), task.input_key)
        assert splits.ood_test and not {family(e) for e in splits.ood_test} & {family(e) for e in splits.train}


def test_sequences_are_cut_before_identical_ones_merge(tmp_path):
    rng = np.random.default_rng(2)
    head = random_protein(rng, 60)
    seqs = {"LONG_A": head + random_protein(rng, 20), "LONG_B": head + random_protein(rng, 30),
            **{f"P{i}": random_protein(rng, 60) for i in range(6)}}
    taxa = {p: "10090" if p == "LONG_B" else "9606" for p in seqs}
    (tmp_path / "s.fasta").write_text("".join(f">{p} {taxa[p]}\n{s}\n" for p, s in seqs.items()))
    rows = [f"{p}\t{MITO}\tIDA\n" for p in seqs if p != "LONG_B"] + [f"LONG_B\t{CYTO}\tIDA\n"]
    (tmp_path / "t.tsv").write_text("protein\tterm\tevidence\n" + "".join(rows))
    task = get_task("go/cafa", {"fasta": str(tmp_path / "s.fasta"), "annotations": str(tmp_path / "t.tsv"),
                                "max_residues": 60, "rationale": "none"})
    examples = {e.id: e for e in task.load()}
    assert "LONG_B" not in examples and len(examples) == 7  # one model input, so one protein
    assert examples["LONG_A"].protein == head and examples["LONG_A"].answer == MITO  # mitochondrion implies cytoplasm
    assert CYTO in task.gold_terms(examples["LONG_A"])
    assert len({e.protein for e in examples.values()}) == len(examples)


def test_missing_columns_and_files_are_one_line_errors(cafa_files, tmp_path):
    with pytest.raises(ValueError, match=r"no column for \['protein'\]"):
        get_task("go/cafa", {"fasta": str(cafa_files / "seqs.fasta"), "annotations": str(cafa_files / "terms.tsv")}).load()
    (tmp_path / "t.tsv").write_text("EntryID\tterm\nP01\tGO:0005739\n")
    with pytest.raises(ValueError, match="evidence_codes: null"):
        cafa_task(cafa_files, annotations=str(tmp_path / "t.tsv")).load()
    with pytest.raises(FileNotFoundError, match="file not found"):
        cafa_task(cafa_files, fasta=str(tmp_path / "none.fasta")).load()


def test_malformed_obo_and_headerless_context_are_one_line_errors(cafa_files, tmp_path):
    bad = tmp_path / "bad.obo"
    for text in ("not an obo\n", "format-version: 1.2\n\n[Term]\nid: GO:0000001\nname\n",
                 "format-version: 1.2\n\n[Term]\nid: GO:0000001\nname: no namespace\n"):
        bad.write_text(text)
        with pytest.raises(ValueError) as err:
            load_ontology(bad, cache=False)
        assert "\n" not in str(err.value) and str(bad) in str(err.value) and "task.options.obo" in str(err.value)
    headerless = tmp_path / "context.tsv"
    headerless.write_text("P01\tGO:0005515\nP01\tGO:0016020\n")  # read with a header, P01's first term is lost
    with pytest.raises(ValueError, match=r"context.tsv: the first line must be a header .*add a header line$"):
        cafa_task(cafa_files, context=str(headerless)).load()


# ---------------------------------------------------------------- reward and its gaming cases
@pytest.fixture(scope="module")
def scored(cafa_files):
    task = cafa_task(cafa_files, context=str(cafa_files / "context.tsv"))
    examples = {e.id: e for e in task.load()}
    task.fit([examples[p] for p in ("P02", "P03", "P04", "P05", "P06", "P07", "P08")])
    return task, examples["P01"]  # gold: mitochondrion (8 propagated terms); context: protein binding, membrane


def answer(terms: str) -> str:
    return f"<think>\nreasons\n</think>\n\nAnswer: {terms}"


def test_reward_is_propagated_f1(scored):
    task, example = scored
    assert task.reward([answer(MITO)], [example]) == [1.0]
    full = task.score(answer(CYTO), example)
    assert full["precision"] == 1.0 and full["recall"] == 3 / 8 and full["f1"] == pytest.approx(6 / 11)
    assert full["format"] == 1.0 and "f1_weighted" in full
    loose = task.score(f"<think>x</think>\nAnswer: it is in the mitochondrion ({MITO})", example)
    assert loose["f1"] == 1.0 and loose["f1_strict"] == 0.0 and loose["format"] == 0.0


def test_gaming_the_reward_earns_little(scored, onto):
    task, example = scored
    reward = lambda text: task.reward([answer(text)], [example])[0]  # noqa: E731
    every_cc_term = ", ".join(sorted(t for t in onto.names if onto.aspects[t] == "CC"))
    assert reward(every_cc_term) < 0.01
    assert reward(f"{CC_ROOT}, {MF_ROOT}, {BP_ROOT}") == 0.0
    assert reward(", ".join([CYTO] * 20)) == reward(CYTO)  # repeats count once
    context = example.fields["context"]  # the prompt's suggested terms, none of them gold
    assert all(t in task.user_prompt(example) for t in context)
    copied = ", ".join(context)  # propagated: 4 terms, of which only GO:0110165 (above membrane) is gold
    assert reward(copied) == pytest.approx(2 * (1 / 4) * (1 / 8) / (1 / 4 + 1 / 8))
    assert reward(f"{copied}, {MITO}") < reward(MITO)  # copying on top of the right answer costs precision


def test_context_terms_count_only_when_gold(scored):
    task, example = scored
    from dataclasses import replace

    with_gold_hint = replace(example, fields={**example.fields, "context": [CYTO]})
    assert task.score(answer(CYTO), with_gold_hint)["f1"] == task.score(answer(CYTO), example)["f1"] < 1.0


def test_split_metrics_fmax_per_aspect_from_samples(scored):
    task, example = scored
    metrics = task.split_metrics([example], [[answer(MITO), answer(CYTO)]])
    # one protein: at t <= .5 all 8 terms (p = r = 1); above, cytoplasm's 3 terms (p = 1, r = 3/8)
    assert metrics["fmax_CC"] == (1.0, 1) and metrics["coverage_CC"] == (1.0, 1) and "fmax_BP" not in metrics
    assert {"naive_fmax_CC", "naive_fmax_CC_weighted", "fmax_CC_weighted"} <= set(metrics)


def test_reward_metric_can_be_ia_weighted(cafa_files, scored):
    task, example = scored
    weighted = cafa_task(cafa_files, context=str(cafa_files / "context.tsv"), reward_metric="f1_weighted")
    examples = {e.id: e for e in weighted.load()}
    weighted.fit([examples[p] for p in ("P02", "P03", "P04", "P05", "P06", "P07", "P08")])  # as the fixture
    score = weighted.score(answer(CYTO), example)
    assert weighted.reward([answer(CYTO)], [example]) == [score["f1_weighted"]] != [score["f1"]]
    assert task.reward([answer(CYTO)], [example]) == [score["f1"]]
    with pytest.raises(ConfigError, match="f1_weighted needs IA"):
        cafa_task(cafa_files, reward_metric="f1_weighted", ia="none")


def test_ia_file_maps_alt_ids_and_refuses_one_that_weighs_no_gold_term(cafa_files, onto, tmp_path):
    # GO:0001948 is an alt_id of protein binding; GO:0000005 is obsolete; GO:0099999 is no GO term
    ia = tmp_path / "IA.txt"
    ia.write_text(f"GO:0001948\t2.5\n{MITO}\t1.5\nGO:0000005\t9\nGO:0099999\t3\n")
    assert read_ia_table(ia, onto) == {PROTEIN_BINDING: 2.5, MITO: 1.5}
    ia.write_text(f"GO:0001948\t2.5\n{PROTEIN_BINDING}\t0.5\n")
    assert read_ia_table(ia, onto) == {PROTEIN_BINDING: 0.5}  # the primary id's own weight wins
    task = cafa_task(cafa_files, ia=str(ia), reward_metric="f1_weighted", rationale="none")
    examples = {e.id: e for e in task.load()}
    task.fit([examples["P07"]])  # gold GO:0001948 in the table: protein binding, weighed through its alt_id
    assert task.reward([answer(PROTEIN_BINDING)], [examples["P07"]]) == [1.0]
    with pytest.raises(ValueError, match=r"weighs none of the 8 terms of the training proteins.*ia: train"):
        task.fit([examples["P01"]])  # mitochondrion and its ancestors: not in this IA file
    ia.write_text("GO:0099999\t3\nGO:0000005\t2\n")
    with pytest.raises(ValueError, match=r"names no term of the Gene Ontology .*set task.options.ia: train$"):
        read_ia_table(ia, onto)


def test_naive_frequency_baseline_and_n_per_aspect(cafa_files):
    task = cafa_task(cafa_files, ia="none", rationale="none")
    examples = {e.id: e for e in task.load()}
    task.fit([examples[p] for p in ("P02", "P05", "P06")])  # cytoplasm, mitochondrion, cytoplasm: no MF term
    assert task.term_frequency[CYTO] == task.term_frequency[INTRA] == task.term_frequency[CELL_ENTITY] == 1.0
    assert task.term_frequency[MITO] == task.term_frequency["GO:0043226"] == pytest.approx(1 / 3)
    chosen = [examples["P01"], examples["P10"], examples["P04"]]  # gold: mitochondrion, cytoplasm, protein binding
    metrics = task.split_metrics(chosen, [[answer(MITO)], [answer(CYTO)], [answer(PROTEIN_BINDING)]])
    assert metrics["fmax_CC"] == (1.0, 2) and metrics["fmax_MF"] == (1.0, 1)  # n: proteins annotated in the aspect
    # naive: t <= 1/3 predicts all 8 terms (P01: p = r = 1; P10: p = 3/8, r = 1), higher t the 3 cytoplasm terms
    # (P01: p = 1, r = 3/8; P10: p = r = 1); both give p, r = 11/16, 1 or 1, 11/16: F = 22/27
    assert metrics["naive_fmax_CC"] == (pytest.approx(22 / 27), 2)
    assert metrics["naive_fmax_MF"] == (0.0, 1) and "naive_fmax_CC_weighted" not in metrics


def test_neighbour_rationale_uses_training_proteins_only(scored):
    task, example = scored
    text = task.reasoning(example)  # P01's family members in the fitted split: P05 (mitochondrion)
    assert text.startswith("The closest training protein, P05,") and "GO:0005739 mitochondrion" in text
    assert_prompt_shows_placeholder(task, example, "protein")


# ---------------------------------------------------------------- BioReason-Pro schema
def test_hf_loader_reads_the_bioreason_pro_schema(tmp_path):
    rows = [
        {"protein_id": "Q1", "sequence": "MKTAYIAKQRQISFVKSHFSRQ", "organism": "Homo sapiens",
         "go_mf": "['GO:0005515']", "go_bp": [], "go_cc": [MITO], "go_pred": "GO:0016020 membrane", "reasoning": "r1"},
        {"protein_id": "Q2", "sequence": "MGLFDIVKKVVGALGSLLLKK", "organism": "Mus musculus",
         "go_mf": [], "go_bp": ["GO:0006915"], "go_cc": [], "go_pred": "", "reasoning": "r2"},
    ]
    path = tmp_path / "cafa5.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("go/hf", {"dataset": "json", "data_files": [str(path)], "context_column": "go_pred",
                              "rationale": "dataset"})
    examples = {e.id: e for e in task.load()}
    assert examples["Q1"].answer == f"{PROTEIN_BINDING}, {MITO}" and examples["Q1"].fields["context"] == [MEMBRANE]
    assert examples["Q2"].meta == {"taxon": "Mus musculus", "hf_split": "train"}
    assert task.reasoning(examples["Q1"]) == "r1"
    with pytest.raises(ValueError, match="no column"):
        get_task("go/hf", {"dataset": "json", "data_files": [str(path)], "term_columns": ["go_terms"]}).load()


def test_hf_loader_needs_the_organism_column_unless_told_there_is_none(tmp_path):
    path = tmp_path / "no_organism.jsonl"
    path.write_text(json.dumps({"protein_id": "Q1", "sequence": "MKTAYIAKQRQISFVKSHFSRQ", "go_mf": [],
                                "go_bp": [], "go_cc": [MITO]}) + "\n")
    options = {"dataset": "json", "data_files": [str(path)], "ood": "similarity", "rationale": "none"}
    with pytest.raises(ValueError, match=r"no column \[.organism.\].*organism_column: null"):
        get_task("go/hf", options).load()
    task = get_task("go/hf", {**options, "organism_column": None})
    (example,) = task.load()
    prompt = task.user_prompt(example)
    assert "Organism" not in prompt and prompt.startswith("Protein sequence: MKTAYIAKQRQISFVKSHFSRQ")
    with pytest.raises(ConfigError, match="organism_column"):
        get_task("go/hf", {**options, "organism_column": None, "ood": "taxon"})


def test_registered_with_the_options_they_need():
    from biopost.registry import TASKS, task_names

    assert {"go/cafa", "go/hf", "amp/modlamp"} <= set(task_names())
    required = lambda name: {k for k, f in TASKS[name].Options.model_fields.items() if f.is_required()}  # noqa: E731
    assert required("go/cafa") == {"fasta", "annotations"} and required("go/hf") == {"dataset"}


# ---------------------------------------------------------------- through the pipeline
def test_pipeline_publishes_the_time_split_and_fmax_rows(cafa_files, tmp_path, one_thread):
    from biopost.config import validate_config
    from biopost.pipeline import run
    from biopost.runlog import read_metrics

    config = validate_config({
        "name": "go-fast",
        "task": {"name": "go/cafa", "options": {"fasta": str(cafa_files / "seqs.fasta"), "ood": "time",
                 "annotations": str(cafa_files / "terms.tsv"), "columns": {"protein": "EntryID"},
                 "cutoff_date": "2020-01-01", "max_residues": 40}},
        "model": {"backbone": "tiny-s", "lora": None},
        "eval": {"splits": ["id_test", "ood_test"], "max_examples": 3, "batch_size": 4, "max_new_tokens": 8,
                 "num_samples": 2, "bootstrap": 0},
        "stages": [{"kind": "sft", "max_steps": 1, "batch_size": 4, "eval_at_start": False}],
    })
    run_dir = run(config, tmp_path / "run")
    published = json.loads((run_dir / "splits.json").read_text())
    assert published["ood_test_groups"] == ["after"] and published["sizes"]["ood_test"] == 3
    rows = read_metrics(run_dir)
    metrics = {(r["split"], r["metric"]) for r in rows}
    assert {("ood_test", "f1"), ("ood_test", "f1_weighted"), ("id_test", "precision")} <= metrics
    assert {("ood_test", "fmax_CC"), ("ood_test", "naive_fmax_CC"), ("ood_test", "naive_fmax_MF_weighted")} <= metrics
    # ood_test: P09 mitochondrion, P10 cytoplasm, P11 DNA binding (MF) + nucleus: each Fmax row counts its aspect
    n = {r["metric"]: r["n"] for r in rows if r["split"] == "ood_test" and r["stage"] == "sft"}
    assert n["f1"] == n["fmax_CC"] == n["naive_fmax_CC"] == 3 and n["fmax_MF"] == n["naive_fmax_MF"] == 1
