"""Our GRPO loss against TRL's ``GRPOTrainer._compute_loss`` on identical rollouts (text-only tiny model).

Both sides get the same prompt/completion tensors, advantages, old and reference log-probs. TRL computes
the current log-probs with its own fused LM head; we use :func:`biopost.stages.rl.sequence_logps` and
:func:`biopost.stages.grpo.grpo_loss`. Loss values and the resulting gradients must agree.
"""

from __future__ import annotations

import pytest
import torch

from biopost.models.policy import Policy, load_policy
from biopost.models.tiny import build_tiny_backbone
from biopost.stages.grpo import completion_mask, grpo_loss
from biopost.stages.rl import Rollouts, sequence_logps

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TEXTS = [f"Which colour word appears: {c}? <think>\n\n</think>\n\nAnswer: {c}" for c in ("red", "green", "blue")] * 4
PROMPTS = ["Which colour word appears: red?", "Which colour word appears in this longer sentence: green and more?"]
G, MAX_LEN = 2, 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_backbone("tiny-s", TEXTS, tmp_path_factory.mktemp("vs_trl") / "tiny")


@pytest.fixture(scope="module")
def rollout_tensors(tiny_path):
    """2 prompts x 2 generations, left-padded prompts, completions that stop early (padding) or run to the end."""
    policy = load_policy(tiny_path)
    tok = policy.tokenizer
    tok.padding_side = "left"
    enc = tok([p for p in PROMPTS for _ in range(G)], return_tensors="pt", padding=True, add_special_tokens=False)
    eos, pad = policy.end_of_turn_id, tok.pad_token_id
    completion_ids = torch.tensor([
        [40, 41, 42, eos, pad, pad],
        [43, 44, 45, 46, 47, 48],  # truncated at max length: no end-of-turn
        [49, eos, pad, pad, pad, pad],
        [50, 51, 52, 53, eos, pad],
    ])
    mask = completion_mask(completion_ids, eos)
    return enc["input_ids"], enc["attention_mask"], completion_ids, mask


def trl_trainer(path, tmp_path, loss_type: str, beta: float, temperature: float):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / f"trl-{loss_type}"), loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28,
        temperature=temperature, max_completion_length=MAX_LEN, num_generations=G, per_device_train_batch_size=2 * G,
        gradient_accumulation_steps=1, scale_rewards="group", use_cpu=True, report_to="none",
        bf16=False,  # GRPOConfig defaults to bf16 autocast; compare both sides in float32
        # TRL >= 1.x defaults to multiplying the k3 KL by the importance ratio (DeepSeek-V3.2's unbiased KL
        # gradient); our loss is the classic GRPO k3 penalty, which is TRL's with this switched off.
        use_bias_correction_kl=False,
    )
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda prompts, completions, **_: [0.0] * len(prompts),
                              args=args, train_dataset=dataset, processing_class=tokenizer)
    # Normalisation for one micro-batch: `_compute_loss` divides grpo / dr_grpo by
    # `current_gradient_accumulation_steps` in train mode, and dapo by num_items_in_batch x accumulation steps /
    # steps_per_generation. Trainer only sets the attribute inside `train()`, so we set 1 (one micro-batch = one
    # optimiser step, as our `optimise` with micro_batch_size=None), keep steps_per_generation = 1 (its default
    # = gradient_accumulation_steps) and pass num_items_in_batch = this batch's completion-token count. Train
    # mode takes the same branch real training takes; the tiny Qwen3 has no dropout, so values do not change.
    trainer.current_gradient_accumulation_steps = 1
    assert trainer.args.steps_per_generation == 1 and trainer.accelerator.num_processes == 1
    trainer.model.train()
    return trainer


CASES = [  # loss type, beta, temperature, shift of the old log-probs away from the current ones
    ("grpo", 0.0, 1.0, 0.0),
    ("dr_grpo", 0.0, 1.0, 0.0),
    ("dapo", 0.0, 1.0, 0.0),
    ("grpo", 0.04, 0.7, 0.3),
    ("dr_grpo", 0.04, 1.0, 0.3),
    ("dapo", 0.04, 0.7, 0.3),
]


@pytest.mark.parametrize("loss_type,beta,temperature,shift", CASES)
def test_loss_and_gradients_match_trl(tiny_path, rollout_tensors, tmp_path, loss_type, beta, temperature, shift):
    prompt_ids, prompt_mask, completion_ids, mask = rollout_tensors
    trainer = trl_trainer(tiny_path, tmp_path, loss_type, beta, temperature)
    ours = load_policy(tiny_path)  # same weights from the same directory, separate parameters for gradients
    ours.model.eval()
    batch = Rollouts(list(range(4)), prompt_ids, prompt_mask, completion_ids, mask, [""] * 4, {})

    with torch.no_grad():
        current, _ = sequence_logps(ours, batch, temperature)
    gen = torch.Generator().manual_seed(0)
    # old != current: as on a later pass of mu > 1 (or with shift = 0, the first pass); some tokens clip
    old = current + shift * torch.randn(current.shape, generator=gen)
    ref = current + 0.5 * torch.randn(current.shape, generator=gen)
    advantages = torch.tensor([0.7, -0.3, 1.0, -0.5])  # not summing to 0, so the grpo loss is not 0 at ratio 1

    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
        "ref_per_token_logps": ref, "num_items_in_batch": mask.sum(),
    }
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()

    logps, _ = sequence_logps(ours, batch, temperature)
    our_loss, stats = grpo_loss(logps, old, ref, advantages, mask, loss_type=loss_type, epsilon_low=0.2,
                                epsilon_high=0.28, beta=beta, max_completion_length=MAX_LEN)
    our_loss.backward()

    assert our_loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert abs(our_loss.item()) > 1e-4  # a vacuous 0 == 0 would prove nothing
    if shift:
        assert stats["clip_fraction"] > 0
        trl_clip = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
        assert stats["clip_fraction"] == pytest.approx(trl_clip, abs=1e-6)
    if beta:
        assert stats["kl"] == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-5)

    trl_params = dict(trainer.model.named_parameters())
    compared = 0
    for name, param in ours.model.named_parameters():
        if param.grad is None:
            continue
        torch.testing.assert_close(param.grad, trl_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)
        compared += 1
    assert compared > 10


def test_policy_wrapper_sees_trl_patched_model_unchanged(tiny_path, rollout_tensors, tmp_path):
    """TRL patches ``forward`` in place (fused LM head); the plain call our Policy makes must be unaffected."""
    prompt_ids, prompt_mask, completion_ids, mask = rollout_tensors
    trainer = trl_trainer(tiny_path, tmp_path, "grpo", 0.0, 1.0)
    patched = Policy(trainer.model, trainer.processing_class)
    plain = load_policy(tiny_path)
    batch = Rollouts(list(range(4)), prompt_ids, prompt_mask, completion_ids, mask, [""] * 4, {})
    with torch.no_grad():
        a, _ = sequence_logps(patched, batch, 1.0)
        b, _ = sequence_logps(plain, batch, 1.0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
