"""Memory options on a GPU: peak CUDA memory with and without each, and proof that each changes no result.

One JSON line per part (also appended to ``$OUT/memory.jsonl`` when ``OUT`` is set), each with ``name``,
``ratio`` and ``compares`` (what the ratio divides), the peak memories in GiB and the differences in results:

- ``memory_dtype_auto``: what ``model.dtype: auto`` resolves to on this GPU and the dtype the weights load in.
- ``memory_gradient_checkpointing_{lora,full}``: one RL forward + backward (``sequence_logps`` + ``grpo_loss``)
  without / with ``model.gradient_checkpointing``; loss and gradients compared.
- ``memory_reference_cpu_offload``: full fine-tuning's reference log-probs (plus the policy's forward and
  backward) with the reference copied on the GPU / kept on the CPU and moved in per batch; KL compared.
- ``memory_qlora``: LoRA on bf16 / on 4-bit NF4 base weights (``model.quantization: 4bit``), one RL step; only
  where bitsandbytes imports.

The model is SmolLM2-135M's architecture (hidden 576, 30 layers) built in-process with random weights; the
batch is random token ids (memory does not depend on the values). Needs CUDA:

    python benchmarks/memory_gpu.py [--batch 8 --prompt 256 --completion 256]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

GIB = 2**30
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5)


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "memory.jsonl", "a") as f:
            f.write(line + "\n")


def build_model_dir(path: Path) -> Path:
    """A Hugging Face directory: the tiny models' tokenizer and a bf16 SmolLM2-architecture model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from biopost.models.tiny import build_tiny_backbone

    build_tiny_backbone("tiny-s", [f"cell {i} expresses gene {i * 7 % 13}" for i in range(200)], path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    for stale in path.glob("model*.safetensors"):
        stale.unlink()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SMOLLM2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def random_batch(vocab: int, batch: int, prompt: int, completion: int, device):
    from biopost.stages.rl import Rollouts

    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, vocab, (batch, n), generator=gen).to(device)  # noqa: E731
    ones = lambda n: torch.ones(batch, n, dtype=torch.long, device=device)  # noqa: E731
    return Rollouts([None] * batch, ids(prompt), ones(prompt), ids(completion), ones(completion), [], {})


def rl_step(policy, batch, reference=None):
    """Loss and gradients of one RL forward + backward (the reference's log-probs first, when given)."""
    from biopost.stages.grpo import grpo_loss
    from biopost.stages.rl import sequence_logps

    ref = reference.logps(policy, batch, 1.0) if reference is not None else None
    logps, _ = sequence_logps(policy, batch, 1.0)
    advantages = torch.linspace(-0.5, 1.0, len(batch.examples), device=logps.device)
    loss, stats = grpo_loss(logps, logps.detach(), ref, advantages, batch.mask, beta=0.04)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    policy.model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads, stats


def peak(fn):
    """``fn()``'s result and the peak CUDA memory (GiB) allocated while it ran, above what was there before."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - base) / GIB


def grad_difference(a: dict, b: dict) -> float:
    """Largest relative difference between two gradient sets (norm of the difference over the norm)."""
    assert a.keys() == b.keys() and a, "the same parameters get gradients"
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)) for k in a)


def load(path: Path, dtype: str, lora: bool, quantization: str | None = None):
    from biopost.config import LoraConfig
    from biopost.models.adapters import prepare_for_training
    from biopost.models.policy import load_policy

    policy = load_policy(path, dtype, device="cuda", quantization=quantization)
    policy = prepare_for_training(policy, LoraConfig(rank=16, alpha=32.0, dropout=0.0) if lora else None,
                                  Path(tempfile.mkdtemp()))
    policy.model.eval()
    return policy


def part_dtype(path: Path, args) -> dict:
    from biopost.models.device import resolve_dtype
    from biopost.models.policy import load_policy

    dtype = resolve_dtype("auto", "cuda")
    policy = load_policy(path, dtype, device="cuda")
    return {"name": "memory_dtype_auto", "resolved": dtype, "weights": str(next(policy.model.parameters()).dtype),
            "bf16_supported": torch.cuda.is_bf16_supported()}


def part_checkpointing(path: Path, args, lora: bool) -> dict:
    from biopost.models.memory import checkpoint_in_eval_mode, enable_gradient_checkpointing

    policy = load(path, "bfloat16", lora)
    batch = random_batch(policy.model.config.vocab_size, args.batch, args.prompt, args.completion, "cuda")
    gc.collect()
    (loss_a, grads_a, _), without = peak(lambda: rl_step(policy, batch))
    enable_gradient_checkpointing(policy.model)
    checkpoint_in_eval_mode(policy.model)
    (loss_b, grads_b, _), with_ = peak(lambda: rl_step(policy, batch))
    return {"name": f"memory_gradient_checkpointing_{'lora' if lora else 'full'}", "ratio": without / with_,
            "compares": "peak CUDA memory of one RL forward+backward: without / with gradient checkpointing",
            "peak_gib_without": without, "peak_gib_with": with_, "loss_without": loss_a, "loss_with": loss_b,
            "max_grad_rel_diff": grad_difference(grads_a, grads_b)}


def part_reference(path: Path, args) -> dict:
    from biopost.stages.rl import Reference

    out = {}
    for mode in ("copy", "cpu_offload"):
        gc.collect()
        torch.cuda.empty_cache()
        policy = load(path, "bfloat16", lora=False)
        reference = Reference.of(policy, path, "new", mode)
        torch.manual_seed(0)
        with torch.no_grad():  # the policy has moved away from its start, so the KL is not zero
            for param in policy.model.parameters():
                param.add_(torch.randn_like(param) * 1e-2)
        batch = random_batch(policy.model.config.vocab_size, args.batch, args.prompt, args.completion, "cuda")
        # the peak of the whole state the run holds (policy, reference, activations), and what stays between steps
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _, _, stats = rl_step(policy, batch, reference)
        out[mode] = {"peak": torch.cuda.max_memory_allocated() / GIB, "kl": stats["kl"],
                     "resident": torch.cuda.memory_allocated() / GIB, "reference_on": str(reference.frozen.device)}
        del policy, reference, batch
    return {"name": "memory_reference_cpu_offload", "ratio": out["copy"]["resident"] / out["cpu_offload"]["resident"],
            "compares": "CUDA memory held between RL steps (policy, reference, batch): reference copied on the GPU / "
            "kept on the CPU", **{f"{k}_gib_{m}" if k in ("peak", "resident") else f"{k}_{m}": v
                                  for m, row in out.items() for k, v in row.items()}}


def part_qlora(path: Path, args) -> dict:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"name": "memory_qlora", "skipped": "bitsandbytes is not installed"}
    out = {}
    for quantization in (None, "4bit"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        policy = load(path, "bfloat16", lora=True, quantization=quantization)
        weights = torch.cuda.memory_allocated() / GIB
        batch = random_batch(policy.model.config.vocab_size, args.batch, args.prompt, args.completion, "cuda")
        loss, grads, _ = rl_step(policy, batch)
        out[quantization or "bf16"] = {"weights": weights, "peak": torch.cuda.max_memory_allocated() / GIB,
                                       "loss": loss, "grad_params": len(grads)}
        del policy, batch
    return {"name": "memory_qlora", "ratio": out["bf16"]["weights"] / out["4bit"]["weights"],
            "compares": "GPU memory of the loaded LoRA model: bf16 base / 4-bit NF4 base",
            **{f"{k}_{m}": v for m, row in out.items() for k, v in row.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--completion", type=int, default=256)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        emit({"name": "memory", "skipped": "needs a CUDA GPU"})
        return 0
    emit({"name": "machine", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
          "batch": args.batch, "prompt": args.prompt, "completion": args.completion})
    path = build_model_dir(Path(tempfile.mkdtemp()) / "smollm2-arch")
    parts = [("dtype", part_dtype), ("checkpointing_lora", lambda p, a: part_checkpointing(p, a, True)),
             ("checkpointing_full", lambda p, a: part_checkpointing(p, a, False)), ("reference", part_reference),
             ("qlora", part_qlora)]
    failed = 0
    for name, part in parts:
        try:
            emit(part(path, args))
        except Exception as err:  # one part's failure is reported; the others still run
            failed += 1
            emit({"name": f"memory_{name}", "error": f"{err.__class__.__name__}: {err}",
                  "where": traceback.format_exc().strip().splitlines()[-3:]})
        torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
