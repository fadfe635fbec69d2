"""Deterministic, fingerprinted train / val / id_test / ood_test (/ ood_val) splits with a leakage check.

OOD examples are whole groups of a metadata field held out (explicit list or a seeded fraction of the
groups); ``ood_val`` comes from other groups than ``ood_test`` so OOD-aware selection never sees test groups.
The in-domain rest is split at random with a seed, one example at a time, or one block at a time when the rule
names a ``group_field``: examples sharing its value (e.g. several sites drawn from one JASPAR matrix, near
copies of each other) always land in the same split, and the leakage check refuses any value in two splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from biopost.config import TEST_SPLITS  # noqa: F401  (re-exported: split names live with the config)
from biopost.data.example import Example

SPLIT_NAMES = ("train", "val", "id_test", "ood_val", "ood_test")


class LeakageError(ValueError):
    """Identical inputs (as the model reads them) in two splits."""


@dataclass(frozen=True)
class SplitRule:
    ood_field: str
    ood_test_groups: tuple[str, ...] | float
    ood_val_groups: tuple[str, ...] | float | None = None
    val_fraction: float = 0.1
    id_test_fraction: float = 0.2
    seed: int = 0
    allow_overlap: bool = False
    group_field: str | None = None  # meta field binding examples to one split (None: each example on its own)


@dataclass(frozen=True)
class Splits:
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    id_test: tuple[Example, ...]
    ood_test: tuple[Example, ...]
    ood_val: tuple[Example, ...]
    ood_test_groups: tuple[str, ...]
    ood_val_groups: tuple[str, ...]

    def __getitem__(self, name: str) -> tuple[Example, ...]:
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; valid: {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def fingerprint(self, name: str) -> str:
        return fingerprint(self[name])

    def fingerprints(self) -> dict[str, str]:
        return {name: self.fingerprint(name) for name in SPLIT_NAMES}

    def content_fingerprints(self) -> dict[str, str]:
        return {name: content_fingerprint(self[name]) for name in SPLIT_NAMES}

    def sizes(self) -> dict[str, int]:
        return {name: len(self[name]) for name in SPLIT_NAMES}


def fingerprint(examples: tuple[Example, ...] | list[Example]) -> str:
    """Order-free hash of a split's example ids.

    >>> a, b = Example("a", {}, "x"), Example("b", {}, "y")
    >>> fingerprint([a, b]) == fingerprint([b, a]) != fingerprint([a])
    True
    """
    digest = hashlib.sha256("\n".join(sorted(e.id for e in examples)).encode()).hexdigest()
    return digest[:16]


def content_fingerprint(examples: tuple[Example, ...] | list[Example]) -> str:
    """Order-free hash of everything a split's examples hold (fields, answer, rationale, payloads, meta): it
    changes when a data file is edited under the same ids, which :func:`fingerprint` does not see.

    >>> a, b = Example("a", {"x": 1}, "y"), Example("a", {"x": 1}, "z")
    >>> content_fingerprint([a]) == content_fingerprint([a]) != content_fingerprint([b])
    True
    """
    plain = lambda value: value.tolist() if hasattr(value, "tolist") else str(value)  # noqa: E731  (numpy: all of it)
    rows = sorted(json.dumps(dataclasses.astuple(e), sort_keys=True, default=plain) for e in examples)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def subset(items, max_items: int | None, seed: int) -> list:
    """A seeded, order-stable subset (every checkpoint is scored on the same examples; capped datasets too)."""
    items = list(items)
    if max_items is None or len(items) <= max_items:
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), max_items, replace=False))
    return [items[i] for i in keep]


def make_splits(examples: list[Example], rule: SplitRule, input_key: Callable[[Example], str],
                remedy: str = "deduplicate the examples") -> Splits:
    """Cut ``examples`` by ``rule``; unless ``rule.allow_overlap``, no two splits may share an input.

    ``input_key`` gives what the model reads of an example (``Task.input_key``: the rendered prompt plus the
    payloads an encoder reads); ``remedy`` is the task's advice when inputs collide.
    """
    splits = cut_splits(examples, rule)
    if not rule.allow_overlap:
        check_leakage(splits, input_key, remedy, rule.group_field)
    return splits


def cut_splits(examples: list[Example], rule: SplitRule) -> Splits:
    """Cut ``examples`` by ``rule`` without the leakage check, for a caller that must fit its task on train
    before it can say what the model reads (then :func:`check_leakage`)."""
    if not (0 < rule.val_fraction and 0 < rule.id_test_fraction and rule.val_fraction + rule.id_test_fraction < 1):
        raise ValueError(f"val_fraction ({rule.val_fraction}) and id_test_fraction ({rule.id_test_fraction}) must "
                         "be above 0 and sum below 1, leaving in-domain examples for train")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids are not unique; a task must give every example its own id")
    for field, what in ((rule.ood_field, "ood_field"), (rule.group_field, "group_field")):
        missing = [e.id for e in examples if field is not None and field not in e.meta]
        if missing:
            raise ValueError(f"{what} {field!r} missing from meta of {len(missing)} examples, e.g. {missing[:3]}")
    groups = sorted({str(e.meta[rule.ood_field]) for e in examples})
    rng = np.random.default_rng(rule.seed)
    test_groups = _pick_groups(groups, rule.ood_test_groups, rng, "ood_test_groups", rule.ood_field, "")
    val_groups: tuple[str, ...] = ()
    if rule.ood_val_groups is not None:
        rest = [g for g in groups if g not in test_groups]
        pool = rest if isinstance(rule.ood_val_groups, float) else groups  # named groups: report a clash below
        val_groups = _pick_groups(pool, rule.ood_val_groups, rng, "ood_val_groups", rule.ood_field,
                                  " not held out for ood_test")
        clash = set(val_groups) & set(test_groups)
        if clash:
            raise ValueError(f"ood_val_groups and ood_test_groups share {sorted(clash)}; they must be disjoint")
    by_group = lambda names: tuple(e for e in examples if str(e.meta[rule.ood_field]) in names)  # noqa: E731
    held_out = set(test_groups) | set(val_groups)
    in_domain = [e for e in examples if str(e.meta[rule.ood_field]) not in held_out]  # deal_blocks orders them by id
    val, id_test, train = deal_blocks(in_domain, rule)
    splits = Splits(
        val=tuple(val),
        id_test=tuple(id_test),
        train=tuple(train),
        ood_test=by_group(set(test_groups)),
        ood_val=by_group(set(val_groups)),
        ood_test_groups=test_groups,
        ood_val_groups=val_groups,
    )
    check_sizes(splits, rule)
    return splits


def deal_blocks(in_domain: list[Example], rule: SplitRule) -> tuple[list, list, list]:
    """(val, id_test, train): blocks of examples (one per ``group_field`` value, else one per example) in seeded
    order, each whole into val until it holds ``val_fraction`` of the examples, then id_test, then train.
    Single-example blocks give exactly the per-example split, so a group field changes nothing until a group
    holds two examples.

    >>> data = [Example(f"{m}-{i}", {}, "y", meta={"m": m}) for m in "abcdefghij" for i in range(3)]
    >>> val, id_test, train = deal_blocks(data, SplitRule("m", (), group_field="m", val_fraction=0.2))
    >>> [len(val), len(id_test), len(train)], {e.meta["m"] for e in val} & {e.meta["m"] for e in train}
    ([6, 6, 18], set())
    """
    blocks: dict[str, list[Example]] = {}
    for e in sorted(in_domain, key=lambda e: e.id):  # blocks in order of their first id: independent of input order
        blocks.setdefault(e.id if rule.group_field is None else str(e.meta[rule.group_field]), []).append(e)
    ordered = list(blocks.values())
    order = np.random.default_rng(rule.seed).permutation(len(ordered))
    n_val = int(round(rule.val_fraction * len(in_domain)))
    n_test = int(round(rule.id_test_fraction * len(in_domain)))
    val, id_test, train = [], [], []
    for i in order:
        (val if len(val) < n_val else id_test if len(id_test) < n_test else train).extend(ordered[i])
    return val, id_test, train


def _pick_groups(groups: list[str], wanted, rng, key: str, field: str, among: str) -> tuple[str, ...]:
    """Named groups, or a seeded fraction of ``groups`` that always leaves one of them in-domain."""
    if isinstance(wanted, float):
        if not 0 < wanted < 1:
            raise ValueError(f"{key} as a fraction must be in (0, 1), got {wanted}")
        if len(groups) < 2:
            raise ValueError(f"{key}: a fraction ({wanted}) of the groups of {field!r}{among} needs at least 2 of "
                             f"them so one stays in-domain, found {groups}; name the groups or change ood_field")
        n = max(1, math.floor(wanted * len(groups)))
        return tuple(sorted(rng.choice(groups, size=n, replace=False).tolist()))
    unknown = sorted(set(wanted) - set(groups))
    if unknown:
        raise ValueError(f"{key}: {unknown} are not groups of {field!r}; groups present: {groups}")
    return tuple(sorted(wanted))


def check_sizes(splits: Splits, rule: SplitRule) -> None:
    """Train, val, id_test and ood_test must hold examples; so must ood_val when groups are asked for it."""
    needed = ["train", "val", "id_test", "ood_test"] + (["ood_val"] if rule.ood_val_groups is not None else [])
    empty = [name for name in needed if not splits[name]]
    if empty:
        sizes = ", ".join(f"{name}={size}" for name, size in splits.sizes().items())
        raise ValueError(f"empty split: {', '.join(empty)} ({sizes}); train, val, id_test and ood_test (and ood_val "
                         "when requested) each need examples: change val_fraction / id_test_fraction or the OOD groups")


def check_leakage(splits: Splits, input_key: Callable[[Example], str],
                  remedy: str = "deduplicate the examples", group_field: str | None = None) -> None:
    """Raise if any two splits (train, val, id_test, ood_val, ood_test) hold an identical input, or, with a
    ``group_field``, examples sharing its value (near copies the input check cannot see).

    >>> a, b = Example("a", {"x": 1}, "y"), Example("b", {"x": 1}, "z")
    >>> check_leakage(Splits((a,), (b,), (), (), (), (), ()), lambda e: str(e.fields))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    biopost.data.splits.LeakageError: identical inputs in two splits: train & val: 1 (e.g. a = b); deduplicate...
    """
    if group_field is not None:
        check_groups(splits, group_field)
    found = shared_keys(splits, input_key)
    if found:
        raise LeakageError(f"identical inputs in two splits: {'; '.join(found)}; {remedy}, "
                           "or set task.split.allow_overlap: true")


def check_groups(splits: Splits, group_field: str) -> None:
    """Raise if a value of ``group_field`` is held by examples of two splits.

    >>> a, b = Example("a", {}, "y", meta={"m": "M1"}), Example("b", {}, "z", meta={"m": "M1"})
    >>> check_groups(Splits((a,), (), (b,), (), (), (), ()), "m")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    biopost.data.splits.LeakageError: examples sharing a m in two splits: train & id_test: 1 (e.g. M1: a = b); ...
    """
    found = shared_keys(splits, lambda e: str(e.meta[group_field]), show_key=True)
    if found:
        raise LeakageError(f"examples sharing a {group_field} in two splits: {'; '.join(found)}; cut the splits "
                           f"with group_field {group_field!r} (biopost.data.splits.cut_splits)")


def shared_keys(splits: Splits, key: Callable[[Example], str], show_key: bool = False) -> list[str]:
    """For each pair of splits sharing a key: ``"first & second: count (e.g. ...)"``."""
    keyed = {name: [(key(e), e.id) for e in splits[name]] for name in SPLIT_NAMES}
    found = []
    for first, second in itertools.combinations(SPLIT_NAMES, 2):
        seen = dict(reversed(keyed[first]))  # key -> first id holding it
        hits = [(k, seen[k], i) for k, i in keyed[second] if k in seen]
        if hits:
            shown = ", ".join(f"{k + ': ' if show_key else ''}{a} = {b}" for k, a, b in hits[:2])
            found.append(f"{first} & {second}: {len(hits)} (e.g. {shown})")
    return found
