"""The one device choice (``model.device``, or ``--device`` for eval / predict), resolved once per command."""

from __future__ import annotations

import torch

from biopost.config import DEVICES, ConfigError


def resolve_device(choice: str) -> str:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error, not a fallback.

    >>> resolve_device("cpu")
    'cpu'
    >>> resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    True
    """
    if choice not in DEVICES:
        raise ConfigError(f"unknown device {choice!r}; valid: {', '.join(DEVICES)}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device cuda requested but torch {torch.__version__} sees no CUDA device; use auto or cpu")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def resolve_dtype(choice: str, device: str) -> str:
    """``auto``: bfloat16 on a CUDA device that supports it, else float32 (CPUs train and generate in float32);
    any other choice is kept as given.

    >>> resolve_dtype("auto", "cpu"), resolve_dtype("bfloat16", "cpu")
    ('float32', 'bfloat16')
    """
    if choice != "auto":
        return choice
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"
