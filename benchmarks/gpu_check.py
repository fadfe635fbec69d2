"""One prepared GPU check: bf16 SFT and RL through biopost on SmolLM2-135M's architecture, then every benchmark.

Each part prints one JSON line (also appended to ``$OUT/gpu.jsonl`` when ``OUT`` is set) with the peak CUDA
memory it allocated (``torch.cuda.max_memory_allocated``, reset before each part). A part that fails prints
``{"part": ..., "error": ...}`` and the rest still run. Nothing needs the hub: the model is built in-process
with random weights (speed does not depend on them) and the data are the PBMC cells inside scanpy.

Parts, in order (the most wanted first, in case time runs out):
  machine; sft_lora, sft_full (our SFT stage's Trainer, with model FLOPs utilisation); rl_lora, rl_full (our
  GRPO loop); then run_all.py's benchmarks (SFT vs a bare loop, RL vs TRL, batched evaluation, encoder cache,
  study plan) on the chosen device and dtype.

Model FLOPs utilisation (SFT): ``mfu = 6 * params * tokens_per_s / peak`` with ``params`` every parameter of the
model (tied embedding counted once: its LM-head matmul is real work), ``tokens_per_s`` the non-padding tokens
trained on per second, and ``peak = 989e12`` (H200 dense bf16). 6 = 2 (forward) + 4 (backward) FLOPs per
parameter per token; attention's sequence-length term is left out. With LoRA the frozen weights get no weight
gradient (about 4 instead of 6), so LoRA's figure overstates the work done; it is comparable with full's only
as "model FLOPs".

    python benchmarks/gpu_check.py                       # on the GPU: cuda, bfloat16
    python benchmarks/gpu_check.py --smoke --device cpu  # end-to-end check on a CPU: tiny sizes, few steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_all  # noqa: E402
from common import SMOLLM2_ARCH, machine, resolve  # noqa: E402

PEAK_FLOPS = 989e12  # H200 SXM dense bf16 (no sparsity)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few steps: check every part runs (CPU)")
    p.add_argument("--skip-run-all", action="store_true", help="only the biopost SFT / RL parts")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no part after this many seconds (each skipped part prints a line saying so); "
                        "default 300, none with --smoke")
    return p.parse_args(argv)


class Emitter:
    """Prints each line and appends it to $OUT/gpu.jsonl when OUT is set."""

    def __init__(self):
        out = os.environ.get("OUT")
        self.path = Path(out) / "gpu.jsonl" if out else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(line + "\n")


def part(emit, name: str, device: str, thunk, deadline: float) -> None:
    """Run one part with the peak-memory counter reset; emit its row or an error row (or a skipped row when
    the time budget is spent)."""
    import torch

    if time.perf_counter() > deadline:
        emit({"part": name, "skipped": "time budget spent (--budget-s)"})
        return
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = {"part": name, **run_all.timed_row(thunk)}
    if cuda:
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    emit(row)


def with_mfu(row: dict) -> dict:
    mfu = 6 * row["params"] * row["ours_tokens_per_s"] / PEAK_FLOPS
    return {**row, "mfu": round(mfu, 4), "mfu_formula": "6 * params * tokens_per_s / 989e12 (H200 dense bf16)"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import transformers

    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.smoke else 300.0)
    deadline = time.perf_counter() + budget

    transformers.logging.set_verbosity_error()
    device = resolve(args.device)
    emit = Emitter()
    size = "tiny-s" if args.smoke else SMOLLM2_ARCH
    sft_steps, rl_steps = (2, 1) if args.smoke else (10, 4)
    batch = 4 if args.smoke else 32
    bench = run_all.parse_args(["--device", device, "--dtype", args.dtype] + (["--quick"] if args.smoke else []))
    emit({"part": "machine", **machine(device), "size": size, "dtype": args.dtype, "smoke": args.smoke})
    data = {}

    def loaded():
        if not data:
            data["task"], data["splits"] = run_all.task_and_splits()
        return data["task"], data["splits"]

    for name, lora in (("sft_lora", run_all.LORA), ("sft_full", None)):
        part(emit, name, device, lambda lora=lora: with_mfu(run_all.bench_sft(
            size, bench, *loaded(), lora=lora, batch_size=batch, steps=sft_steps, bare=False)), deadline)
    for name, lora in (("rl_lora", "16"), ("rl_full", "full")):
        part(emit, name, device, lambda lora=lora: run_all.bench_rl(size, bench, lora=lora, trl_too=False,
                                                                     steps=rl_steps), deadline)
    if args.skip_run_all:
        return
    bench.sizes = "tiny-s" if args.smoke else f"{SMOLLM2_ARCH},tiny-s"  # throughput first, should time run out
    for name, thunk in run_all.benchmarks(bench):
        part(emit, f"run_all/{name}", device, thunk, deadline)


if __name__ == "__main__":
    main()
