"""GRPO math on hand-computed numbers, and the RL helpers on a real tiny model.

Expected values are computed here with plain Python arithmetic (``math``), never by calling the function
under test, so a wrong sign, clip bound or normaliser shows up as a number mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch

from biopost.config import RLStage
from biopost.models.policy import load_policy
from biopost.models.tiny import build_tiny_backbone
from biopost.stages import rl
from biopost.stages.grpo import completion_mask, group_advantages, grpo_loss, token_logps
from biopost.stages.rl import Rollouts, make_scheduler, optimise, sequence_logps

# ---------------------------------------------------------------- a 2-prompt x 2-generation batch
# 4 sequences x 3 completion tokens; the mask has padding (rows 1 and 2 end early). Values at masked
# positions are deliberately odd so that a loss which forgot the mask would differ.
LOGPS = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -3.0], [-0.7, -4.0, -0.2], [-1.5, -0.9, -0.4]]
OLD = [[-1.5, -0.5, -1.9], [-0.3, -0.6, -0.1], [-0.1, -0.2, -3.0], [-1.4, -1.6, -0.4]]
REF = [[-1.2, -0.7, -2.0], [-0.5, -1.0, -0.5], [-0.4, -0.1, -1.0], [-1.5, -1.1, -0.1]]
MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]
ADV = [1.0, -1.0, 0.5, -0.5]
EPS_LOW, EPS_HIGH, BETA, MAX_LEN = 0.2, 0.28, 0.05, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_per_token(lp: float, old: float, ref: float, adv: float, beta: float) -> float:
    ratio = math.exp(lp - old)
    clipped = min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH)
    surrogate = -min(ratio * adv, clipped * adv)
    kl = math.exp(ref - lp) - (ref - lp) - 1
    return surrogate + beta * kl


def hand_loss(loss_type: str, beta: float) -> float:
    per_row_sums, per_row_counts = [], []
    for i in range(4):
        terms = [hand_per_token(LOGPS[i][t], OLD[i][t], REF[i][t], ADV[i], beta) for t in range(3) if MASK[i][t]]
        per_row_sums.append(sum(terms))
        per_row_counts.append(len(terms))
    if loss_type == "grpo":  # mean over each sequence's tokens, then over sequences
        return sum(s / n for s, n in zip(per_row_sums, per_row_counts)) / 4
    if loss_type == "dr_grpo":  # constant denominator: sequences x max completion length
        return sum(per_row_sums) / (4 * MAX_LEN)
    return sum(per_row_sums) / sum(per_row_counts)  # dapo: mean over all tokens


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batch_shares_add_up_to_the_hand_computed_loss(loss_type):
    tokens = sum(map(sum, MASK))
    shares = [grpo_loss(t(LOGPS)[rows], t(OLD)[rows], t(REF)[rows], t(ADV)[rows], torch.tensor(MASK)[rows],
                        loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA,
                        max_completion_length=MAX_LEN, batch_sequences=4, batch_tokens=tokens)[0].item()
              for rows in (slice(0, 1), slice(1, 3), slice(3, 4))]
    assert sum(shares) == pytest.approx(hand_loss(loss_type, BETA), abs=1e-6)


def test_hand_computed_batch_actually_clips():
    """Guard for the fixture above: some masked-in tokens are outside the clip range on the side that matters."""
    clipped = 0
    for i in range(4):
        for j in range(3):
            ratio = math.exp(LOGPS[i][j] - OLD[i][j])
            if MASK[i][j] and ((ratio > 1 + EPS_HIGH and ADV[i] > 0) or (ratio < 1 - EPS_LOW and ADV[i] < 0)):
                clipped += 1
    assert clipped >= 2


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, BETA])
def test_loss_matches_hand_computation(loss_type, beta):
    loss, stats = grpo_loss(t(LOGPS), t(OLD), t(REF), t(ADV), torch.tensor(MASK), loss_type=loss_type,
                            epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta, max_completion_length=MAX_LEN)
    assert loss.item() == pytest.approx(hand_loss(loss_type, beta), abs=1e-6)

    tokens = [(i, j) for i in range(4) for j in range(3) if MASK[i][j]]
    ratios = {(i, j): math.exp(LOGPS[i][j] - OLD[i][j]) for i, j in tokens}
    clipped = [(i, j) for i, j in tokens
               if (ratios[i, j] > 1 + EPS_HIGH and ADV[i] > 0) or (ratios[i, j] < 1 - EPS_LOW and ADV[i] < 0)]
    kl = [math.exp(REF[i][j] - LOGPS[i][j]) - (REF[i][j] - LOGPS[i][j]) - 1 for i, j in tokens]
    assert stats["clip_fraction"] == pytest.approx(len(clipped) / len(tokens), abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx(sum(ratios.values()) / len(tokens), abs=1e-6)
    assert stats["kl"] == pytest.approx(sum(kl) / len(tokens), abs=1e-6)


def test_loss_types_differ_and_are_validated():
    values = {lt: grpo_loss(t(LOGPS), t(OLD), t(REF), t(ADV), torch.tensor(MASK), loss_type=lt,
                            max_completion_length=MAX_LEN)[0].item() for lt in ("grpo", "dr_grpo", "dapo")}
    assert len({round(v, 6) for v in values.values()}) == 3
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(t(LOGPS), t(OLD), None, t(ADV), torch.tensor(MASK), loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(t(LOGPS), t(OLD), None, t(ADV), torch.tensor(MASK), loss_type="dr_grpo")


# ---------------------------------------------------------------- advantages
def test_group_advantages_scalings():
    rewards = t([1.0, 0.0, 2.0, 4.0])  # groups (1, 0) and (2, 4)
    centered = [0.5, -0.5, -1.0, 1.0]
    std_g1 = math.sqrt(((1 - 0.5) ** 2 + (0 - 0.5) ** 2) / 1)  # unbiased std, as TRL
    std_g2 = math.sqrt(((2 - 3) ** 2 + (4 - 3) ** 2) / 1)
    mean_all = (1 + 0 + 2 + 4) / 4
    std_all = math.sqrt(sum((r - mean_all) ** 2 for r in (1, 0, 2, 4)) / 3)

    group = group_advantages(rewards, 2, "group").tolist()
    expected_group = [0.5 / (std_g1 + 1e-4), -0.5 / (std_g1 + 1e-4), -1 / (std_g2 + 1e-4), 1 / (std_g2 + 1e-4)]
    assert group == pytest.approx(expected_group, abs=1e-5)
    assert group_advantages(rewards, 2, "batch").tolist() == pytest.approx([c / (std_all + 1e-4) for c in centered], abs=1e-5)
    assert group_advantages(rewards, 2, "none").tolist() == pytest.approx(centered, abs=1e-6)
    # one group of 4: centred on the overall mean
    assert group_advantages(rewards, 4, "none").tolist() == pytest.approx([r - mean_all for r in (1, 0, 2, 4)], abs=1e-6)


def test_group_with_equal_rewards_has_zero_advantage():
    adv = group_advantages(t([1.0, 1.0, 0.0, 1.0]), 2, "group")
    assert adv[:2].tolist() == [0.0, 0.0]
    assert adv[2].item() < 0 < adv[3].item()
    with pytest.raises(ValueError, match="reward scaling"):
        group_advantages(t([1.0, 0.0]), 2, "zscore")


# ---------------------------------------------------------------- ratio, clipping and its gradient
def test_moved_policy_changes_ratio_and_clips():
    """Simulate a second optimisation pass (mu > 1): current log-probs drift from the rollout's."""
    old = t([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    mask = torch.ones(4, 2)
    adv = t([1.0, -1.0, 1.0, -1.0])
    _, same = grpo_loss(old.clone(), old, None, adv, mask)
    assert same["ratio_mean"] == pytest.approx(1.0, abs=1e-7) and same["clip_fraction"] == 0.0
    moved = old + t([[0.6, 0.0], [-0.6, 0.0], [0.1, 0.0], [0.1, 0.0]])
    _, stats = grpo_loss(moved, old, None, adv, mask)
    assert stats["ratio_mean"] != pytest.approx(1.0, abs=1e-3)
    assert stats["clip_fraction"] == pytest.approx(2 / 8)  # rows 0 (up, A>0) and 1 (down, A<0), first token


def test_clipping_zeroes_gradient_only_on_the_advantage_side():
    # one token per sequence; dapo divides by 4 tokens. old log-prob 0, so ratio = exp(logp).
    logps = t([[0.5], [-0.5], [-0.5], [0.5]]).requires_grad_()
    adv = t([1.0, 1.0, -1.0, -1.0])
    loss, stats = grpo_loss(logps, torch.zeros(4, 1), None, adv, torch.ones(4, 1), loss_type="dapo")
    loss.backward()
    grad = logps.grad.squeeze(1).tolist()
    assert grad[0] == 0.0  # ratio 1.65 > 1.28 with A > 0: clipped
    assert grad[1] == pytest.approx(-math.exp(-0.5) / 4)  # ratio 0.61 with A > 0: not clipped, pushes log-prob up
    assert grad[2] == 0.0  # ratio 0.61 < 0.8 with A < 0: clipped
    assert grad[3] == pytest.approx(math.exp(0.5) / 4)  # ratio 1.65 with A < 0: not clipped, pushes log-prob down
    assert stats["clip_fraction"] == pytest.approx(0.5)


def grad_for(ratio: float, adv: float, **eps) -> float:
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _ = grpo_loss(logp, torch.zeros(1, 1), None, t([adv]), torch.ones(1, 1), loss_type="dapo", **eps)
    loss.backward()
    return logp.grad.item()


def test_asymmetric_epsilons():
    # ratio 1.25 with A > 0: inside 1 + 0.28, outside 1 + 0.2
    assert grad_for(1.25, 1.0, epsilon_low=0.2, epsilon_high=0.28) == pytest.approx(-1.25)
    assert grad_for(1.25, 1.0, epsilon_low=0.2, epsilon_high=0.2) == 0.0
    # ratio 0.75 with A < 0: outside 1 - 0.2, inside 1 - 0.3
    assert grad_for(0.75, -1.0, epsilon_low=0.2, epsilon_high=0.28) == 0.0
    assert grad_for(0.75, -1.0, epsilon_low=0.3, epsilon_high=0.28) == pytest.approx(0.75)
    # the high bound never clips a negative advantage, the low bound never a positive one
    assert grad_for(1.25, -1.0, epsilon_low=0.2, epsilon_high=0.2) == pytest.approx(1.25)
    assert grad_for(0.75, 1.0, epsilon_low=0.2, epsilon_high=0.28) == pytest.approx(-0.75)


# ---------------------------------------------------------------- KL penalty
def test_kl_term_scaled_by_beta():
    logps = t([[-1.0, -2.0], [-0.5, -0.2]])
    ref = t([[-1.3, -1.0], [-0.5, -0.9]])
    mask = torch.tensor([[1, 1], [1, 0]])
    zero_adv = torch.zeros(2)  # policy-gradient term vanishes: the loss is the KL term alone
    k3 = [math.exp(r - lp) - (r - lp) - 1 for r, lp in [(-1.3, -1.0), (-1.0, -2.0), (-0.5, -0.5)]]
    for beta in (0.0, 0.1, 0.5):
        loss, stats = grpo_loss(logps, logps.clone(), ref, zero_adv, mask, loss_type="dapo", beta=beta)
        assert loss.item() == pytest.approx(beta * sum(k3) / 3, abs=1e-7)
        assert stats["kl"] == pytest.approx(sum(k3) / 3, abs=1e-6)  # logged even when beta = 0
    assert k3[2] == 0.0 and sum(k3) > 0
    _, no_ref = grpo_loss(logps, logps.clone(), None, zero_adv, mask, beta=0.1)
    assert no_ref["kl"] is None  # no reference: nothing measured, not a KL of 0


# ---------------------------------------------------------------- masks and token log-probs
def test_completion_mask_stops_after_first_end_of_turn():
    ids = torch.tensor([
        [9, 9, 2, 0, 0],  # end-of-turn then padding
        [2, 5, 5, 5, 5],  # end-of-turn first: only it counts
        [5, 2, 5, 2, 5],  # runaway text after the first end-of-turn does not count
        [5, 6, 7, 8, 9],  # truncated: no end-of-turn, everything counts
    ])
    assert completion_mask(ids, eos_id=2).tolist() == [
        [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1],
    ]


def test_token_logps_with_temperature():
    logits = t([[[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    targets = torch.tensor([[0, 1]])
    for temp in (1.0, 0.5, 2.0):
        chosen, entropy = token_logps(logits, targets, temperature=temp)
        for pos, row in enumerate(([2.0, 1.0, 0.0], [0.0, 0.0, 3.0])):
            scaled = [x / temp for x in row]
            log_z = math.log(sum(math.exp(x) for x in scaled))
            logp = [x - log_z for x in scaled]
            assert chosen[0, pos].item() == pytest.approx(logp[targets[0, pos].item()], abs=1e-6)
            assert entropy[0, pos].item() == pytest.approx(-sum(math.exp(lp) * lp for lp in logp), abs=1e-6)
    assert token_logps(logits, targets, 0.5)[0][0, 0] > token_logps(logits, targets, 1.0)[0][0, 0]


# ---------------------------------------------------------------- a real tiny model
TEXTS = [f"Which colour word appears: {c}? <think>\n\n</think>\n\nAnswer: {c}" for c in ("red", "green", "blue")] * 4


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_backbone("tiny-s", TEXTS, tmp_path_factory.mktemp("grpo") / "tiny")


def left_padded(tok, prompts: list[str]):
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


def make_rollouts(policy, prompts: list[str], completion_ids: torch.Tensor) -> Rollouts:
    ids, attention = left_padded(policy.tokenizer, prompts)
    mask = completion_mask(completion_ids, policy.end_of_turn_id)
    return Rollouts(list(range(len(prompts))), ids, attention, completion_ids, mask, [""] * len(prompts), {})


def test_sequence_logps_ignore_left_padding(tiny_path):
    policy = load_policy(tiny_path)
    policy.model.eval()
    eos, pad = policy.end_of_turn_id, policy.tokenizer.pad_token_id
    short = "Which colour?"
    long = "Which colour word appears in this much longer prompt: red? Answer in one line."
    completions = torch.tensor([[50, 60, eos, pad, pad], [70, 80, 90, 100, eos]])
    both = make_rollouts(policy, [short, long], completions)
    assert both.prompt_mask[0].min() == 0  # the short prompt really is left-padded
    alone = make_rollouts(policy, [short], completions[:1])
    assert alone.prompt_mask.min() == 1
    with torch.no_grad():
        batched, _ = sequence_logps(policy, both, temperature=0.7)
        single, _ = sequence_logps(policy, alone, temperature=0.7)
        rows, _ = sequence_logps(policy, both, temperature=0.7, rows=slice(0, 1))
    keep = both.mask[0].bool()
    assert keep.tolist() == [True, True, True, False, False]
    torch.testing.assert_close(batched[0][keep], single[0][keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(rows[0][keep], single[0][keep], atol=1e-5, rtol=0)
    # and it is the log-prob of the given token: a different completion token changes it
    other = make_rollouts(policy, [short], torch.tensor([[51, 60, eos, pad, pad]]))
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(policy, other, 0.7)[0][0, 0], single[0, 0])


def test_second_pass_with_mu_2_sees_a_moved_policy(tiny_path, monkeypatch):
    torch.manual_seed(0)
    policy = load_policy(tiny_path)
    policy.model.eval()
    for p in policy.model.parameters():
        p.requires_grad_(True)
    eos, pad = policy.end_of_turn_id, policy.tokenizer.pad_token_id
    completions = torch.tensor([[50, 60, 70, eos], [51, 61, eos, pad], [52, 62, 72, 82], [53, eos, pad, pad]])
    batch = make_rollouts(policy, ["Which colour word appears: red?"] * 2 + ["Which colour word appears: blue?"] * 2,
                          completions)
    stage = RLStage(mu=2, lr=0.05, beta=0.0, loss_type="grpo", max_completion_length=4,
                    schedule={"name": "constant", "warmup_ratio": 0.0})
    with torch.no_grad():
        batch.old_logps, _ = sequence_logps(policy, batch, stage.temperature)
        batch.ref_logps = batch.old_logps.clone()
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr)
    scheduler = make_scheduler(stage, optimizer, stage.mu)

    passes = []
    real = rl.grpo_loss

    def recording(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        passes.append(stats)
        return loss, stats

    monkeypatch.setattr(rl, "grpo_loss", recording)
    stats = optimise(policy, optimizer, scheduler, params, batch, t([1.0, -1.0, 1.0, -1.0]), stage)
    assert len(passes) == 2  # one micro-batch (the whole batch) per pass
    assert passes[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and passes[0]["clip_fraction"] == 0.0
    assert abs(passes[1]["ratio_mean"] - 1.0) > 1e-3
    assert passes[1]["clip_fraction"] > 0.0
    assert stats["clip_fraction"] == pytest.approx(passes[1]["clip_fraction"] / 2)


def test_single_pass_uses_current_logps_as_old(tiny_path):
    """mu = 1: ``run_rl`` skips the old-log-prob forward; ``optimise`` compares with the detached current ones."""
    policy = load_policy(tiny_path)
    policy.model.eval()
    eos = policy.end_of_turn_id
    batch = make_rollouts(policy, ["Which colour word appears: red?"] * 2, torch.tensor([[50, eos], [51, 52]]))
    assert batch.old_logps is None
    batch.ref_logps = None
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before = [p.detach().clone() for p in params]
    one = RLStage(mu=1, beta=0.0, schedule={"name": "constant", "warmup_ratio": 0.0})
    stats = optimise(policy, optimizer, make_scheduler(one, optimizer, 1), params, batch, t([1.0, -1.0]), one)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and stats["clip_fraction"] == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, params))  # it still trains
    two = one.model_copy(update={"mu": 2})
    with pytest.raises(ValueError, match="old_logps"):
        optimise(policy, optimizer, make_scheduler(two, optimizer, 2), params, batch, t([1.0, -1.0]), two)


# ---------------------------------------------------------------- micro-batches change memory, never the update
def update_with(policy, batch, stage) -> list[torch.Tensor]:
    """The gradient ``optimise`` steps with (plain SGD with lr 1 turns the step into minus the gradient)."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    optimise(policy, optimizer, make_scheduler(stage, optimizer, stage.mu), params, batch,
             t([1.0, -0.5, 0.25, -1.0, 0.75]), stage)
    update = [b - p.detach() for b, p in zip(before, params)]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return update


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batch_size_never_changes_the_update(tiny_path, loss_type):
    """Completions of very different lengths, so a per-micro-batch token mean would weight them differently."""
    torch.manual_seed(0)
    policy = load_policy(tiny_path)
    policy.model.eval()
    eos, pad = policy.end_of_turn_id, policy.tokenizer.pad_token_id
    completions = torch.tensor([[50, eos, pad, pad, pad, pad], [51, 61, 71, 81, 91, 95], [52, 62, eos, pad, pad, pad],
                                [53, 63, 73, 83, eos, pad], [54, eos, pad, pad, pad, pad]])
    batch = make_rollouts(policy, [f"Which colour word appears: {c}?" for c in ("red", "red", "blue", "blue", "green")],
                          completions)
    with torch.no_grad():
        batch.old_logps, _ = sequence_logps(policy, batch, 1.0)
        batch.ref_logps = batch.old_logps - 0.3 * torch.rand_like(batch.old_logps)  # a reference the KL term sees
    stage = RLStage(mu=2, beta=0.1, loss_type=loss_type, max_completion_length=6, max_grad_norm=1e9,
                    schedule={"name": "constant", "warmup_ratio": 0.0})
    whole = update_with(policy, batch, stage)
    assert sum(float(u.abs().sum()) for u in whole) > 0
    for micro in (1, 2, 3, 4):
        split = update_with(policy, batch, stage.model_copy(update={"micro_batch_size": micro}))
        for a, b in zip(whole, split):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
