"""LoRA adapters per stage (peft): attach, continue, or merge and start a new one."""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

from biopost import distributed
from biopost.config import LoraConfig
from biopost.models.memory import is_quantized, prepare_quantized
from biopost.models.policy import Policy, run_root
from biopost.models.weights import merged

ADAPTER_WEIGHTS = ("lora_", "trainable_tokens_delta")  # LoRA matrices and the added tokens' embedding rows


def prepare_for_training(policy: Policy, lora: LoraConfig | None, workdir: Path, mode: str = "new", *,
                         source: Path | None = None, freeze_projector: bool = False) -> Policy:
    """Make ``policy`` (loaded from checkpoint ``source``) trainable for a stage whose directory is ``workdir``.

    ``lora=None``: full fine-tuning (an existing adapter is merged first, in memory only).
    ``mode="continue"``: keep training the adapter the policy already has.
    ``mode="new"``: merge any existing adapter into the weights and attach a fresh adapter, e.g. with
    another rank. The merged weights are saved once per source checkpoint (see :func:`merged_base_dir`)
    so later checkpoints can reference them.
    Tokens the run added (``<think>``...) get trainable embedding rows in every adapter: a LoRA model
    freezes the embeddings, and rows that cannot move cannot learn what the new tokens mean.
    A fused model's projectors train too unless ``freeze_projector``.
    """
    from peft import LoraConfig as PeftLora, get_peft_model

    policy.set_projector_trainable(not freeze_projector)
    if mode == "continue":
        if not policy.is_adapter:
            raise ValueError("adapter: continue needs an init checkpoint with a LoRA adapter; use adapter: new")
        for name, param in policy.model.named_parameters():
            param.requires_grad = is_adapter_weight(name)
        return policy
    if policy.is_adapter:
        policy = merged(policy)
        if lora is not None:  # only an adapter trained on the merge needs it on disk
            if source is None:
                raise ValueError("a new adapter on a merged one needs the checkpoint it was loaded from (source=)")
            target = merged_base_dir(source, workdir)
            policy.base_path = distributed.on_main(lambda: save_merged_base(policy, target))  # one writer
    elif policy.base_path is None:
        policy.base_path = Path(policy.model.name_or_path)
    if lora is None:
        if is_quantized(policy.model):
            raise ValueError("4-bit base weights cannot be trained: give the stage a LoRA adapter (QLoRA)")
        for param in policy.model.parameters():
            param.requires_grad = True
        return policy
    if is_quantized(policy.model):
        policy = replace(policy, model=prepare_quantized(policy.model))
    added = policy.tokenizer.convert_tokens_to_ids(policy.info.get("added_tokens", []))
    config = PeftLora(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
        trainable_token_indices=embedding_rows(policy.model, added) if added else None,
    )
    with warnings.catch_warnings():  # peft reads transformers' renamed `is_gradient_checkpointing`; not ours to fix
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(policy.model, config)
    return replace(policy, model=model)


def is_adapter_weight(name: str, adapter: str = "default") -> bool:
    """Whether a parameter name belongs to the trainable weights of ``adapter`` (not a frozen reference)."""
    return any(key in name for key in ADAPTER_WEIGHTS) and adapter in name.split(".")


def embedding_rows(model, ids: list[int]) -> dict[str, list[int]]:
    """peft's ``trainable_token_indices``: rows ``ids`` of the input embedding and of an untied output
    embedding (peft ties a tied output matrix to the input rows itself)."""
    names = {module: name for name, module in model.named_modules()}
    layers = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not layers[0].weight:
        layers.append(output)
    return {names[layer]: list(ids) for layer in layers}


def merged_base_dir(source: Path, workdir: Path) -> Path:
    """One merged copy per source checkpoint: ``merged/<key>`` in the run directory holding the source, so
    every stage and every run (a study's branches) starting from that checkpoint shares it."""
    source = Path(source).resolve()
    root = run_root(source)
    if root is not None:
        return root / "merged" / "--".join(source.relative_to(root).parts)
    # a checkpoint outside any run directory: kept in this run, keyed by its location
    here = run_root(Path(workdir).resolve()) or Path(workdir).resolve()
    return here / "merged" / hashlib.sha256(str(source).encode()).hexdigest()[:16]


def save_merged_base(policy: Policy, target: Path) -> Path:
    """Save ``policy`` at ``target`` unless a copy is there; written aside and renamed, so concurrent runs
    never see half a directory."""
    if target.is_dir():
        return target
    scratch = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    policy.save(scratch)
    try:
        scratch.rename(target)
    except OSError:  # another process saved the same merge first
        shutil.rmtree(scratch, ignore_errors=True)
        if not target.is_dir():
            raise
    return target
