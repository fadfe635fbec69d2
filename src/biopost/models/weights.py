"""Weight-space arithmetic on whole checkpoints: interpolation (WiSE-FT) and uniform averaging.

Written over the state dicts of every torch module a :class:`Policy` holds (the language model and, for fused
models, the projectors), so it applies to any checkpoint. Adapters are merged first: a LoRA checkpoint
becomes plain weights. Tensors equal at both ends are kept as they are, so untouched parts never pick up
rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from biopost.models.policy import Policy


def merged(policy: Policy) -> Policy:
    """The policy with its adapter (if any) merged into the weights."""
    if not policy.is_adapter:
        return policy
    return dataclasses.replace(policy, model=policy.model.merge_and_unload(), base_path=None)


def modules_of(policy: Policy) -> dict[str, torch.nn.Module]:
    """The policy's torch modules by attribute name: ``model``, plus any other it holds (fused ``projectors``)."""
    return {name: value for name, value in vars(policy).items() if isinstance(value, torch.nn.Module)}


def weights_of(policy: Policy) -> dict[str, torch.Tensor]:
    """Every tensor of the policy's modules, keyed ``<module>.<state-dict key>`` (views, not copies)."""
    return {f"{name}.{key}": tensor for name, module in modules_of(policy).items()
            for key, tensor in module.state_dict().items()}


def load_weights(policy: Policy, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (as from :func:`weights_of`) into the policy in place; every key must match."""
    for name, module in modules_of(policy).items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * end`` per tensor, computed in float32, exact at alpha 0 and 1.

    >>> s, e = {"w": torch.tensor([0.1, 2.0])}, {"w": torch.tensor([0.3, -1.0])}
    >>> [torch.equal(interpolate(s, e, a)["w"], x["w"]) for a, x in ((0.0, s), (1.0, e))]
    [True, True]
    >>> interpolate(s, e, 0.5)["w"]
    tensor([0.2000, 0.5000])
    """
    check_same_layout(start, end)
    out = {}
    for key, a in start.items():
        b = end[key]
        if torch.equal(a, b):
            out[key] = a
        elif not a.is_floating_point():
            raise ValueError(f"weights differ in non-float tensor {key!r}; the checkpoints are not one architecture")
        else:  # (1 - alpha) * a + alpha * b, not a + alpha * (b - a): each end is reproduced exactly
            out[key] = ((1.0 - alpha) * a.float() + alpha * b.float()).to(a.dtype)
    return out


def average(states: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of state dicts, one in memory at a time (a float32 running sum).

    >>> a, b = {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([2.0, 5.0])}
    >>> average([a, b])["w"]
    tensor([1.5000, 4.0000])
    >>> torch.equal(average([a, a, a])["w"], a["w"])
    True
    """
    first, total, same, count = None, {}, {}, 0
    for state in states:
        count += 1
        if first is None:
            first = {k: v.clone() for k, v in state.items()}
            total = {k: v.float().clone() for k, v in first.items() if v.is_floating_point()}
            same = {k: True for k in first}
            continue
        check_same_layout(first, state)
        for key, value in state.items():
            same[key] = same[key] and torch.equal(value, first[key])
            if key in total:
                total[key] += value.float()
            elif not same[key]:
                raise ValueError(f"weights differ in non-float tensor {key!r}; not one architecture")
    if first is None:
        raise ValueError("nothing to average")
    return {k: v if same[k] else (total[k] / count).to(v.dtype) for k, v in first.items()}


def check_same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, shapes and dtypes, or a one-line error naming the first difference."""
    if a.keys() != b.keys():
        diff = sorted(a.keys() ^ b.keys())
        raise ValueError(f"checkpoints hold different weights ({len(diff)} keys differ, e.g. {diff[:3]})")
    for key, value in a.items():
        if value.shape != b[key].shape or value.dtype != b[key].dtype:
            raise ValueError(f"weight {key!r} is {tuple(value.shape)} {value.dtype} in one checkpoint and "
                             f"{tuple(b[key].shape)} {b[key].dtype} in the other")
