"""LoRA adapters per stage (peft): attach, continue, or merge and start a new one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from biopost.config import LoraConfig
from biopost.models.policy import Policy
from biopost.models.weights import merged


def prepare_for_training(policy: Policy, lora: LoraConfig | None, workdir: Path, mode: str = "new",
                         freeze_projector: bool = False) -> Policy:
    """Make ``policy`` trainable for a stage.

    ``lora=None``: full fine-tuning (an existing adapter is merged first).
    ``mode="continue"``: keep training the adapter the policy already has.
    ``mode="new"``: merge any existing adapter into the weights (saved under ``workdir/base`` so later
    checkpoints can reference it) and attach a fresh adapter, e.g. with another rank.
    A fused model's projectors train too unless ``freeze_projector``.
    """
    from peft import LoraConfig as PeftLora, get_peft_model

    policy.set_projector_trainable(not freeze_projector)
    if mode == "continue":
        if not policy.is_adapter:
            raise ValueError("adapter: continue needs an init checkpoint with a LoRA adapter; use adapter: new")
        for name, param in policy.model.named_parameters():
            param.requires_grad = "lora_" in name
        return policy
    if policy.is_adapter:
        policy = merged(policy)
        policy.save(workdir / "base")
        policy.base_path = workdir / "base"
    elif policy.base_path is None:
        policy.base_path = Path(policy.model.name_or_path)
    if lora is None:
        for param in policy.model.parameters():
            param.requires_grad = True
        return policy
    config = PeftLora(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(policy.model, config)
    return replace(policy, model=model)
