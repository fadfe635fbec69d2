"""What the speed benchmarks share: backbones by size, the machine they ran on, device sync and timing.

Sizes: the built-in tiny models (they measure framework overhead) and ``smollm2-135m-arch``, SmolLM2-135M's
architecture (LlamaConfig: hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536, vocab 49152, tied
embeddings) built in-process with random weights: speed does not depend on the weights' values, and nothing
needs the hub. Its tokenizer is the tiny models' (a byte-level BPE trained on the task's texts), so prompts
are shorter in tokens than with SmolLM2's own tokenizer; every figure is per token, and both arms of each
comparison see the same tokens.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

SMOLLM2_ARCH = "smollm2-135m-arch"
SMOLLM2_CONFIG = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
SIZES = ("tiny-s", "tiny-m", SMOLLM2_ARCH)


def build_backbone(size: str, texts: list[str], path: Path, seed: int = 0) -> Path:
    """A Hugging Face model directory of ``size`` (see the module docstring) with random weights."""
    from biopost.models.tiny import build_tiny_backbone

    if size not in SIZES:
        raise ValueError(f"unknown benchmark size {size!r}; valid: {', '.join(SIZES)}")
    if size != SMOLLM2_ARCH:
        return build_tiny_backbone(size, texts, path, seed=seed)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tiny_backbone("tiny-s", texts, path, seed=seed)  # for its tokenizer; the model is replaced below
    tokenizer = AutoTokenizer.from_pretrained(path)
    for stale in path.glob("model*.safetensors"):
        stale.unlink()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    return path


def resolve(device: str) -> str:
    """``auto`` -> cuda when torch sees one; ``cuda`` without one is an error (as biopost's own device choice)."""
    from biopost.models.device import resolve_device

    return resolve_device(device)


def machine(device: str) -> dict:
    """CPU model, cores, library versions, and the CUDA device when one is used."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(), "device": device}
    if device == "cuda":
        out["cuda_device"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
    return out


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall time between marks, with the device synchronised at each mark."""

    def __init__(self, device: str):
        self.device, self.marks = device, []

    def mark(self) -> None:
        sync(self.device)
        self.marks.append(time.perf_counter())
