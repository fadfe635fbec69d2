"""Sampling in which each sequence draws from its own seeded generator.

``generate`` samples a whole batch from torch's one global RNG, so a sequence's tokens depend on which other
sequences share its batch. RL under a launcher shards each step's rollouts over processes; seeding every
sequence by (stage seed, step, its index in the step's global batch) makes the rollouts the same under any
number of processes. transformers has no per-row generator, so this logits processor draws the token itself
and leaves ``generate`` a single allowed token to pick.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


def row_seeds(seed: int, step: int, rows: range) -> list[int]:
    """One seed per sequence from (seed, step, global row index): independent of batch layout.

    >>> row_seeds(0, 3, range(2, 4)) == row_seeds(0, 3, range(4))[2:]
    True
    """
    return [int(np.random.SeedSequence([seed, step, row]).generate_state(1)[0]) for row in rows]


class PerRowSampler(LogitsProcessor):
    """Warp the scores (temperature, top-k, top-p, as ``generate`` would), draw each row's next token with that
    row's generator, and return scores that allow only the drawn token."""

    def __init__(self, seeds: list[int], device, temperature: float, top_p: float, top_k: int):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        warpers = [TemperatureLogitsWarper(temperature)]
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)
        picks = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        only = torch.full_like(scores, -float("inf"))
        return only.scatter_(1, picks, 0.0)
