"""GRPO math as pure functions: group advantages, token log-probabilities, the clipped loss.

Kept apart from the training loop so each piece is tested on hand-computed numbers and against TRL.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALINGS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Reward minus its group's mean, divided by the group's (or batch's) std, or not scaled.

    >>> [round(a, 3) for a in group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2).tolist()]
    [0.707, -0.707, 0.0, 0.0]
    """
    if scale not in SCALINGS:
        raise ValueError(f"unknown reward scaling {scale!r}; valid: {SCALINGS}")
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        return advantages
    return advantages / (std + 1e-4)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token and the entropy of each position's distribution.

    ``logits[:, t]`` predicts ``targets[:, t]``; logits are divided by the sampling temperature so the
    probabilities are those the completions were sampled from.
    """
    logits = logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # logged only: no graph over the vocabulary-sized tensors
        entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first end-of-turn token, 0 after it (padding or runaway text).

    >>> completion_mask(torch.tensor([[5, 2, 7, 7], [5, 6, 8, 9]]), eos_id=2).tolist()
    [[1, 1, 0, 0], [1, 1, 1, 1]]
    """
    is_eos = completion_ids == eos_id
    after = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after).long()


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    batch_sequences: int | None = None,
    batch_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate with an optional k3 KL penalty to the reference, aggregated by ``loss_type``.

    ``grpo``: mean over each sequence's tokens, then over sequences. ``dr_grpo``: sum over all tokens
    divided by (sequences x max completion length), a constant. ``dapo``: mean over all tokens.

    For a micro-batch, ``batch_sequences`` and ``batch_tokens`` give the whole batch's sequence and
    completion-token counts: the loss is then this micro-batch's share, and the shares sum to the
    full-batch loss for every ``loss_type`` (dapo's token mean spans the batch, not the micro-batch).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {LOSS_TYPES}")
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if beta != 0.0:
            per_token = per_token + beta * kl
    sequences = per_token.size(0) if batch_sequences is None else batch_sequences
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / sequences
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (sequences * max_completion_length)
    else:
        tokens = mask.sum() if batch_tokens is None else torch.as_tensor(batch_tokens, dtype=mask.dtype)
        loss = (per_token * mask).sum() / tokens.clamp(min=1.0)
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)
        was_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        stats = {
            "clip_fraction": float((was_clipped.float() * mask).sum() / tokens),
            "ratio_mean": float((ratio * mask).sum() / tokens),
            "kl": float((kl * mask).sum() / tokens) if kl is not None else None,  # None: nothing measured
        }
    return loss, stats
