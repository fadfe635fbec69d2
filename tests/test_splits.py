"""Splits: seeded, fingerprinted, OOD groups held out whole, leakage between train and test is an error."""

from __future__ import annotations

import dataclasses

import pytest

from biopost.config import ConfigError, validate_config
from biopost.data import Example, LeakageError, SplitRule, make_splits
from biopost.pipeline import load_task_and_splits

GROUPS = ("a", "b", "c", "d")


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
        make_splits(data + [dup], rule(val_fraction=0.0, id_test_fraction=0.0))
    assert "a0 ~ dup-of-a0" in str(err.value) and "ood_test" in str(err.value)
    allowed = make_splits(data + [dup], rule(val_fraction=0.0, id_test_fraction=0.0, allow_overlap=True))
    assert "dup-of-a0" in ids(allowed.ood_test) and "a0" in ids(allowed.train)


def test_in_domain_duplicates_split_between_train_and_id_test_are_leakage():
    twins = [Example(id=f"x{i}-{copy}", fields={"x": i}, answer="y", meta={"grp": "a"})
             for i in range(10) for copy in (1, 2)]
    with pytest.raises(LeakageError, match="id_test"):
        make_splits(twins + examples(groups=("c",)), rule(val_fraction=0.0, id_test_fraction=0.3))


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
