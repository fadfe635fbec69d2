"""Splits: seeded, fingerprinted, OOD groups held out whole, identical inputs in any two splits are an error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from biopost.cli import main
from biopost.config import ConfigError, load_config, validate_config
from biopost.data import Example, LeakageError, SplitRule, Splits
from biopost.data import make_splits as cut
from biopost.data.splits import check_leakage
from biopost.pipeline import load_task_and_splits

GROUPS = ("a", "b", "c", "d")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def key(example: Example) -> str:
    """What a toy model reads: the prompt fields."""
    return str(example.fields)


def make_splits(examples, rule):
    return cut(examples, rule, key)


def examples(per_group: int = 10, groups=GROUPS) -> list[Example]:
    return [Example(id=f"{g}{i}", fields={"x": f"{g}-{i}"}, answer="y", meta={"grp": g})
            for g in groups for i in range(per_group)]


def rule(**kw) -> SplitRule:
    return SplitRule(**{"ood_field": "grp", "ood_test_groups": ("c",), **kw})


def ids(split) -> set[str]:
    return {e.id for e in split}


def test_same_seed_same_splits_different_seed_different_split():
    data = examples()
    first = make_splits(data, rule(seed=0))
    assert make_splits(list(reversed(data)), rule(seed=0)).fingerprints() == first.fingerprints()
    other = make_splits(data, rule(seed=1))
    assert other.fingerprint("train") != first.fingerprint("train")
    assert other.fingerprint("val") != first.fingerprint("val")
    assert other.fingerprint("ood_test") == first.fingerprint("ood_test")  # explicit groups do not move


def test_ood_groups_never_reach_training_or_in_domain_tests():
    splits = make_splits(examples(), rule(ood_test_groups=("c",), ood_val_groups=("d",)))
    for name in ("train", "val", "id_test"):
        assert {e.meta["grp"] for e in splits[name]} <= {"a", "b"}
    assert {e.meta["grp"] for e in splits.ood_test} == {"c"}
    assert {e.meta["grp"] for e in splits.ood_val} == {"d"}
    assert sum(splits.sizes().values()) == 40
    all_ids = [e.id for name in ("train", "val", "id_test", "ood_val", "ood_test") for e in splits[name]]
    assert len(all_ids) == len(set(all_ids))


@pytest.mark.parametrize("seed", range(5))
def test_fraction_of_groups_and_disjoint_ood_val(seed):
    splits = make_splits(examples(), rule(ood_test_groups=0.5, ood_val_groups=0.5, seed=seed))
    assert len(splits.ood_test_groups) == 2 and len(splits.ood_val_groups) == 1
    assert not set(splits.ood_test_groups) & set(splits.ood_val_groups)
    assert {e.meta["grp"] for e in splits.ood_test} == set(splits.ood_test_groups)
    assert not {e.meta["grp"] for e in splits.train} & (set(splits.ood_test_groups) | set(splits.ood_val_groups))


def test_fraction_of_groups_is_seeded():
    pick = lambda seed: make_splits(examples(), rule(ood_test_groups=0.25, seed=seed)).ood_test_groups  # noqa: E731
    assert pick(3) == pick(3)
    assert len({pick(seed) for seed in range(20)}) > 1


def test_overlapping_explicit_ood_val_and_test_groups_is_an_error():
    with pytest.raises(ValueError, match=r"share \['c'\].*disjoint"):
        make_splits(examples(), rule(ood_test_groups=("c", "d"), ood_val_groups=("b", "c")))


def test_unknown_group_names_list_the_groups_present():
    with pytest.raises(ValueError) as err:
        make_splits(examples(), rule(ood_test_groups=("zzz",)))
    assert "zzz" in str(err.value)
    assert "groups present" in str(err.value) and all(f"'{g}'" in str(err.value) for g in GROUPS)


def test_duplicated_input_in_a_test_split_is_leakage():
    data = examples()
    dup = dataclasses.replace(data[0], id="dup-of-a0", meta={"grp": "c"})  # same input, lands in ood_test
    with pytest.raises(LeakageError) as err:
        make_splits(data + [dup], rule())
    assert "ood_test: 1 (e.g. a0 = dup-of-a0)" in str(err.value)
    allowed = make_splits(data + [dup], rule(allow_overlap=True))
    assert "dup-of-a0" in ids(allowed.ood_test) and "a0" in ids(allowed.train + allowed.val + allowed.id_test)


def test_in_domain_duplicates_split_between_train_and_id_test_are_leakage():
    twins = [Example(id=f"x{i}-{copy}", fields={"x": i}, answer="y", meta={"grp": "a"})
             for i in range(10) for copy in (1, 2)]
    with pytest.raises(LeakageError, match="train & id_test"):
        make_splits(twins + examples(groups=("c",)), rule(val_fraction=0.1, id_test_fraction=0.3))


def test_non_unique_ids_are_rejected():
    data = examples()
    with pytest.raises(ValueError, match="not unique"):
        make_splits(data + [data[0]], rule())


def test_pbmc_holds_out_cycling_cells(pbmc_splits):
    splits = pbmc_splits
    assert splits.ood_test_groups == ("G2M", "S")
    for name in ("train", "val", "id_test"):
        assert {e.meta["phase"] for e in splits[name]} == {"G1"}
    assert {e.meta["phase"] for e in splits.ood_test} == {"G2M", "S"}
    assert sum(splits.sizes().values()) == 700
    assert not ids(splits.train) & (ids(splits.val) | ids(splits.id_test) | ids(splits.ood_test))
    # the same cell types are asked in and out of domain: a covariate shift, not new labels
    assert {e.answer for e in splits.ood_test} <= {e.answer for e in splits.train}


def test_unknown_pbmc_group_is_a_config_error_listing_phases():
    config = validate_config({"task": {"name": "cell_type/pbmc68k", "split": {"ood_test_groups": ["M"]}},
                              "stages": [{"kind": "sft"}]})
    with pytest.raises(ConfigError) as err:
        load_task_and_splits(config)
    assert "'M'" in str(err.value) and all(p in str(err.value) for p in ("G1", "G2M", "S"))


# ---------------------------------------------------------------- leakage is checked on what the model reads
def test_a_text_model_reads_the_prompt_not_the_payload(pbmc_task, pbmc_splits):
    """Two cells with the same top genes are one question to a text model, whatever the rest of their profile."""
    seen = pbmc_splits.train[0]
    twin = dataclasses.replace(seen, id="twin", cell={"genes": seen.cell["genes"][::-1], "values": [1.0]},
                               meta={**seen.meta, "phase": "S"})
    assert pbmc_task.input_key(twin) == pbmc_task.input_key(seen)
    with pytest.raises(LeakageError, match=rf"& ood_test: 1 \(e\.g\. {seen.id} = twin\)"):
        cut([*pbmc_splits.train, *pbmc_splits.ood_test, twin], SplitRule("phase", ("G2M", "S")), pbmc_task.input_key)
    pbmc_task.fused_modalities = frozenset({"cell"})  # an encoder reads the whole profile: now they differ
    try:
        assert pbmc_task.input_key(twin) != pbmc_task.input_key(seen)
    finally:
        pbmc_task.fused_modalities = frozenset()


def test_every_pair_of_splits_is_compared():
    a, b, c, d, e = (Example(i, {"x": i}, "y") for i in "abcde")
    dup = lambda ex, new: dataclasses.replace(ex, id=new)  # noqa: E731
    splits = Splits(train=(a,), val=(b, dup(c, "c2")), id_test=(c,), ood_test=(d, dup(e, "e2")), ood_val=(e,),
                    ood_test_groups=(), ood_val_groups=())
    with pytest.raises(LeakageError) as err:
        check_leakage(splits, key)
    message = str(err.value)
    assert "val & id_test: 1 (e.g. c2 = c)" in message and "ood_val & ood_test: 1 (e.g. e = e2)" in message
    assert "train" not in message.split(";")[0] and "\n" not in message
    check_leakage(dataclasses.replace(splits, val=(b,), ood_test=(d,)), key)  # no shared input: fine


def test_short_cell_sentences_leak_through_train(tmp_path, capsys, monkeypatch):
    """top_k_genes 4: many cells share their four top genes across splits; training never starts."""
    def forbidden(*args, **kwargs):
        raise AssertionError("training started on leaking splits")

    monkeypatch.setattr("biopost.pipeline.resolve_backbone", forbidden)
    code = main(["train", str(CONFIGS / "demo" / "sft-tiny.yaml"), "--output-dir", str(tmp_path / "run"),
                 "task.options.top_k_genes=4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    for pair in ("train & val: 17", "train & id_test: 39", "train & ood_test: 49", "val & id_test"):
        assert pair in err
    assert "top_k_genes" in err and "allow_overlap: true" in err


def test_shipped_and_test_configs_have_no_leakage(fast_config):
    """The demo and backbone configs and the tests' fast config cut splits that pass the leakage check."""
    paths = sorted([*CONFIGS.glob("demo/*.yaml"), *CONFIGS.glob("backbones/*.yaml")])
    configs = [load_config(path) for path in paths]
    # table tasks read a file the user writes first (docs/tasks.md); tests/test_docs_tasks.py checks that one
    tasks = {c.task.model_dump_json(): c for c in configs if c.task.name != "table"}
    fast = validate_config(fast_config())
    tasks[fast.task.model_dump_json()] = fast
    assert len(paths) >= 5 and len(tasks) >= 3  # pbmc with top_k 24, the default 32, and 16
    for config in tasks.values():
        load_task_and_splits(config)  # raises on leakage


# ---------------------------------------------------------------- split sizes are validated together
@pytest.mark.parametrize("split, message", [
    ({"val_fraction": 0.5, "id_test_fraction": 0.6}, "val_fraction (0.5) + id_test_fraction (0.6) must be below 1"),
    ({"val_fraction": 0.0}, "'task.split.val_fraction'"),
    ({"id_test_fraction": 0.0}, "'task.split.id_test_fraction'"),
])
def test_fractions_leaving_no_training_data_are_config_errors(split, message):
    with pytest.raises(ConfigError) as err:
        validate_config({"task": {"name": "cell_type/pbmc68k", "split": split}, "stages": [{"kind": "sft"}]})
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("data, kw, empty", [
    (examples(per_group=3, groups=("a", "c")), {}, "val"),  # 3 in-domain examples: 10% rounds to none
    (examples(), {"val_fraction": 0.5, "id_test_fraction": 0.49}, "train"),
    (examples(), {"ood_test_groups": ("a", "b", "c", "d")}, "train, val, id_test"),
    (examples(), {"ood_test_groups": ()}, "ood_test"),
    (examples(), {"ood_val_groups": ()}, "ood_val"),
])
def test_an_empty_split_is_a_one_line_error_with_the_sizes(data, kw, empty):
    with pytest.raises(ValueError) as err:
        make_splits(data, rule(**kw))
    message = str(err.value)
    assert message.startswith(f"empty split: {empty} (train=") and "ood_test=" in message and "\n" not in message


def test_a_fraction_of_a_single_group_is_an_error_not_everything_ood():
    with pytest.raises(ValueError, match=r"ood_test_groups: a fraction \(0.25\).*at least 2.*\['a'\]"):
        make_splits(examples(groups=("a",)), rule(ood_test_groups=0.25))


def test_an_ood_val_fraction_never_takes_the_last_in_domain_group():
    with pytest.raises(ValueError, match=r"ood_val_groups: .* not held out for ood_test needs at least 2.*\['a'\]"):
        make_splits(examples(groups=("a", "c")), rule(ood_val_groups=0.5))
    three = make_splits(examples(groups=("a", "b", "c")), rule(ood_val_groups=0.5))
    assert len(three.ood_val_groups) == 1 and three.train


def test_empty_split_through_the_pipeline_is_a_config_error():
    config = validate_config({"task": {"name": "cell_type/pbmc68k", "split": {"ood_test_groups": ["G1", "G2M", "S"]}},
                              "stages": [{"kind": "sft"}]})
    with pytest.raises(ConfigError, match=r"task.split: empty split: train, val, id_test \(train=0, .*ood_test=700\)"):
        load_task_and_splits(config)


def test_leakage_is_judged_on_what_a_fused_model_reads():
    """Eight gene names can coincide across cells, but a model reading cells through an encoder sees their
    values too: `biopost eval` of a fused checkpoint must judge leakage as the run did (it used to refuse)."""
    config = validate_config({"task": {"name": "cell_type/pbmc68k", "options": {"top_k_genes": 8}},
                              "stages": [{"kind": "sft"}]})
    with pytest.raises(ConfigError, match="identical inputs"):
        load_task_and_splits(config)
    task, _ = load_task_and_splits(config, frozenset({"cell"}))
    assert task.fused_modalities == {"cell"}


def test_a_group_field_keeps_each_group_in_one_split():
    data = [dataclasses.replace(e, meta={**e.meta, "block": e.id[:-1] + str(int(e.id[-1]) // 3)})
            for e in examples(per_group=9)]  # blocks of 3 examples
    grouped = make_splits(data, rule(group_field="block"))
    assert make_splits(list(reversed(data)), rule(group_field="block")).fingerprints() == grouped.fingerprints()
    owner: dict[str, set[str]] = {}
    for name in ("train", "val", "id_test", "ood_test", "ood_val"):
        for e in grouped[name]:
            owner.setdefault(e.meta["block"], set()).add(name)
    assert all(len(names) == 1 for names in owner.values())
    assert (len(grouped.val), len(grouped.id_test), len(grouped.train)) == (3, 6, 18)  # 27 in-domain, whole blocks
    loose = make_splits(data, rule())  # one example at a time: blocks are torn apart, which the check refuses
    with pytest.raises(LeakageError, match="sharing a block in two splits"):
        check_leakage(loose, key, group_field="block")
    with pytest.raises(ValueError, match="group_field 'nope' missing from meta of 36 examples"):
        make_splits(data, rule(group_field="nope"))
