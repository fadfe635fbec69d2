"""Memory options shared by every training stage: gradient checkpointing and 4-bit base weights (QLoRA).

Both come from the ecosystem: transformers' activation checkpointing (non-reentrant, so frozen inputs such as
LoRA's and a fused model's spliced embeddings still get gradients) and bitsandbytes' NF4 weights prepared by
peft's ``prepare_model_for_kbit_training``. bf16 weights are ``model.dtype`` (models/device.py ``resolve_dtype``).
"""

from __future__ import annotations

import importlib.util

import torch

from biopost.config import ConfigError

QLORA_EXTRA = "pip install 'biopost[qlora]'"


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    ``model`` is a transformers model or a peft model around one. transformers also makes the input
    embeddings' output require grad (``enable_input_require_grads``), as a LoRA model's frozen embeddings
    would otherwise cut the graph at the first checkpointed layer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False  # a cache is useless (and refused) while checkpointing a training forward


def checkpoint_in_eval_mode(model) -> None:
    """Let checkpointed layers recompute although the model is in eval mode (RL keeps dropout off that way).

    transformers checkpoints a layer only while that layer's ``training`` flag is set; the flag is set on the
    checkpointed layers alone, not their children, so dropout and attention dropout stay off."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True


def quantization_config(kind: str | None, compute_dtype: str):
    """transformers' ``quantization_config`` for ``model.quantization`` (None: full-precision weights)."""
    if kind is None:
        return None
    from transformers import BitsAndBytesConfig

    from biopost.models.policy import DTYPES

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[compute_dtype])


def check_quantization(kind: str | None, device: str) -> None:
    """4-bit weights need bitsandbytes and a CUDA device: a one-line error before any model loads otherwise."""
    if kind is None:
        return
    if not device.startswith("cuda"):
        raise ConfigError(f"model.quantization: {kind} runs on a CUDA GPU only (bitsandbytes), but the run's device is "
                          f"{device}; remove model.quantization or run on a GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization: {kind} needs bitsandbytes, which is not installed: {QLORA_EXTRA}")


def is_quantized(model) -> bool:
    """Whether ``model`` (or the model under a peft adapter) holds k-bit weights (they cannot be moved or trained)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def prepare_quantized(model):
    """peft's preparation of a k-bit model before an adapter is attached: base weights frozen, the remaining
    half-precision ones (norms, embeddings) in float32. Gradient checkpointing is switched on apart
    (``model.gradient_checkpointing``), as for unquantized models."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
