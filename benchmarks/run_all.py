"""Every speed benchmark in one command: one JSON line each, with ``name``, ``ratio``, ``compares`` and ``machine``.

- ``sft_<size>``: our SFT stage's training tokens/s (the stage's own Trainer, built by
  ``biopost.stages.trainer.stage_trainer`` with all its callbacks; evaluation is benchmarked apart) against a
  bare loop (transformers model, peft adapter, plain torch forward / backward / AdamW) on the same model,
  LoRA settings, tokenized rows, batch size, learning rate, gradient clipping and dtype. Tokens = non-padding
  tokens fed to the model.
- ``rl_<size>``: our GRPO loop's completion tokens/s against TRL's GRPOTrainer (benchmarks/rl_throughput.py).
- ``eval_<size>``: the evaluator's examples/s at its batch size against one example at a time (greedy).
- ``encoder_cache``: fused SFT step time without the on-disk feature cache over with it (benchmarks/encoder_cache.py).
- ``plan``: optimizer steps a study would run without sharing over those the planner executes
  (configs/studies/paper-genomics.yaml, step counts from its declared sizes; nothing is trained).

Sizes: tiny models measure framework overhead; ``smollm2-135m-arch`` (SmolLM2-135M's architecture, random
weights: speed does not depend on the weights' values) measures throughput. See benchmarks/common.py.
A benchmark that fails prints ``{"name": ..., "error": ...}`` and the others still run.

    python benchmarks/run_all.py [--quick] [--device auto|cpu|cuda] [--dtype float32|bfloat16] [--sizes tiny-s,smollm2-135m-arch]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules, also when imported

from common import SIZES, SMOLLM2_ARCH, build_backbone, machine, resolve, sync  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASK = "cell_type/pbmc68k"  # real data shipped inside scanpy: no hub needed
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}
ACCEPT = {"sft": 0.9, "rl": 0.95, "eval": 5.0}  # issue 13's acceptance ratios


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps (CI-ish); the figures are noisier")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--sizes", default=f"tiny-s,{SMOLLM2_ARCH}", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--only", default="sft,rl,eval,encoder_cache,plan", help="comma-separated benchmark kinds")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------- shared setup
def task_and_splits():
    from biopost.config import validate_config
    from biopost.pipeline import load_task_and_splits

    return load_task_and_splits(validate_config({"task": {"name": TASK}, "stages": [{"kind": "sft"}]}))


class TokenCounter:
    """Counts the non-padding tokens of every forward through ``model`` (a pre-hook). The counts stay on the
    device until read, so counting adds no synchronisation to a step."""

    def __init__(self, model):
        self.pending, self.counted = [], 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None:
            self.pending.append(mask.sum())

    @property
    def tokens(self) -> int:
        self.counted += sum(int(n) for n in self.pending)
        self.pending = []
        return self.counted

    def close(self):
        self.handle.remove()


def clock(device: str) -> float:
    sync(device)
    return time.perf_counter()


def rates(times: list[float], tokens: list[int]) -> dict:
    """Mean step time, tokens/s over the window, and the median of per-step rates (robust to a busy machine)."""
    import statistics

    return {"step_s": sum(times) / len(times), "tokens_per_s": sum(tokens) / sum(times),
            "median_tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times)),
            "tokens_per_step": sum(tokens) / len(tokens)}


# ---------------------------------------------------------------- SFT: stage vs bare loop
def sft_config(path: Path, device: str, dtype: str, lora: dict | None, batch_size: int, total: int):
    from biopost.config import validate_config

    return validate_config({
        "task": {"name": TASK}, "model": {"backbone": str(path), "dtype": dtype, "device": device, "lora": lora},
        "stages": [{"kind": "sft", "batch_size": batch_size, "max_steps": total, "lr": 1e-4, "max_length": 512,
                    "schedule": {"name": "constant", "warmup_ratio": 0.0}, "eval_at_start": False,
                    "save_every_steps": 10**6}],
    })


def sft_measure(config, task, splits, device: str, workdir: Path, warmup: int, steps: int, bare: bool) -> dict:
    """Time the SFT stage's Trainer (as ``run_sft`` builds it; evaluation a no-op) step by step; with ``bare``,
    one step of the bare loop runs before each of the stage's (timed apart), so a busy machine slows both alike.
    A stage step is timed from one ``on_step_begin`` to the next: per-step logging is inside it."""
    from transformers import TrainerCallback, set_seed

    from biopost.models.adapters import prepare_for_training
    from biopost.runlog import RunLog
    from biopost.stages.context import StageContext, plan_steps
    from biopost.stages.sft import tokenize_example
    from biopost.stages.trainer import stage_trainer

    stage = config.stages[0]
    loop = BareLoop(config, task, splits, device) if bare else None
    set_seed(stage.seed)
    ctx = StageContext(config, 0, "sft", task, splits, RunLog(workdir), workdir / "stages" / "0-sft",
                       Path(config.model.backbone), {}, device=device)
    ctx.stage_dir.mkdir(parents=True)
    policy = ctx.load_policy(ctx.init_path)
    policy = prepare_for_training(policy, stage.resolved_lora(config.model), ctx.stage_dir, source=ctx.init_path)
    dataset = [tokenize_example(policy, task, e, stage.max_length) for e in splits.train]
    total, per_epoch, _ = plan_steps(stage, len(dataset))
    trainer, _ = stage_trainer(ctx, policy, dataset, total, total, per_epoch, evaluate=lambda step, epoch: None)
    counter = TokenCounter(policy.model)
    ours, theirs, last = ([], []), ([], []), {}

    class Interleave(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if last:  # the stage's previous step, logging included
                ours[0].append(clock(device) - last["time"])
                ours[1].append(counter.tokens - last["tokens"])
            if loop is not None:
                start = clock(device)
                theirs[1].append(loop.step())
                theirs[0].append(clock(device) - start)
            last.update(time=clock(device), tokens=counter.tokens)

    trainer.add_callback(Interleave())
    trainer.train()  # warmup + steps + 1 steps: the last one closes the window
    counter.close()
    window = slice(warmup, warmup + steps)
    return {"ours": {**rates(ours[0][window], ours[1][window]), "optimizer": trainer.args.optim.value},
            "bare": {**rates(theirs[0][window], theirs[1][window]), "optimizer": "torch.optim.AdamW (default: foreach)"}
            if loop else None}


class BareLoop:
    """A plain loop on the same rows: transformers model + peft adapter, forward, backward, clip, AdamW, log loss."""

    def __init__(self, config, task, splits, device: str):
        import contextlib

        import torch
        from peft import LoraConfig as PeftLora, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from biopost.models.policy import DTYPES, Policy
        from biopost.stages.sft import tokenize_example

        self.stage, lora, self.device = config.stages[0], config.model.lora, device
        torch.manual_seed(self.stage.seed)
        path = config.model.backbone
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.rows = [tokenize_example(Policy(None, self.tokenizer), task, e, self.stage.max_length) for e in splits.train]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[config.model.dtype]).to(device)
        if lora is not None:
            model = get_peft_model(model, PeftLora(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                   target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.stage.lr, weight_decay=self.stage.weight_decay)
        self.autocast = (torch.autocast(device, dtype=torch.bfloat16) if config.model.dtype == "bfloat16"
                         else contextlib.nullcontext())
        self.order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.stage.seed)).tolist()
        self.done = 0

    def step(self) -> int:
        """One optimiser step; the number of non-padding tokens it trained on."""
        import torch

        size = self.stage.batch_size
        batch = [self.rows[self.order[(self.done * size + i) % len(self.rows)]] for i in range(size)]
        self.done += 1
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((size, width), self.tokenizer.pad_token_id)
        labels = torch.full((size, width), -100)
        mask = torch.zeros((size, width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
            mask[i, : len(r["input_ids"])] = 1
        with self.autocast:
            loss = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                              labels=labels.to(self.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.stage.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # a loop logs its loss each step, as the stage does
        return int(mask.sum())


def bench_sft(size: str, args, task, splits, lora: dict | None = LORA, batch_size: int | None = None,
              steps: int | None = None, warmup: int = 2, bare: bool = True) -> dict:
    device = resolve(args.device)
    steps = steps or (3 if args.quick else 10)
    if batch_size is None:
        from biopost.config import SFTStage

        batch_size = SFTStage().batch_size  # the stage's default, as a user runs it
    with tempfile.TemporaryDirectory() as tmp:
        path = build_backbone(size, task.training_texts(splits.train), Path(tmp) / "backbone", seed=args.seed)
        config = sft_config(path, device, args.dtype, lora, batch_size, warmup + steps + 1)
        measured = sft_measure(config, task, splits, device, Path(tmp) / "run", warmup, steps, bare)
        params = count_params(path)
    ours, theirs = measured["ours"], measured["bare"]
    out = {"name": f"sft_{size}", "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
           "ours_median_tokens_per_s": round(ours["median_tokens_per_s"], 1), "ours_step_s": round(ours["step_s"], 4),
           "tokens_per_step": ours["tokens_per_step"], "ours_optimizer": ours["optimizer"], "params": params}
    if theirs:
        out = {"name": out["name"], "ratio": round(ours["median_tokens_per_s"] / theirs["median_tokens_per_s"], 3),
               "compares": "our SFT stage's training tokens/s over a bare torch loop's (same model, LoRA, rows, batch; "
                           "interleaved steps, medians of per-step rates)",
               "accept": ACCEPT["sft"], **out, "bare_tokens_per_s": round(theirs["tokens_per_s"], 1),
               "bare_median_tokens_per_s": round(theirs["median_tokens_per_s"], 1),
               "bare_step_s": round(theirs["step_s"], 4), "bare_tokens_per_step": theirs["tokens_per_step"],
               "bare_optimizer": theirs["optimizer"]}
    return {**out, "lora": lora, "batch_size": batch_size, "dtype": args.dtype, "steps": steps, "warmup": warmup,
            "device": device, "weights": "random (speed does not depend on them)"}


def count_params(path: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


# ---------------------------------------------------------------- RL: ours vs TRL
def bench_rl(size: str, args, lora: str = "full", trl_too: bool = True, steps: int | None = None,
             warmup: int = 1) -> dict:
    import rl_throughput

    from biopost.config import RLStage

    steps = steps or (2 if args.quick else 5)
    beta = RLStage().beta  # the stage's default KL weight: both compute reference log-probs
    rl_args = rl_throughput.parse_args(["--size", size, "--device", args.device, "--dtype", args.dtype, "--lora", lora,
                                        "--steps", str(steps), "--warmup", str(warmup), "--beta", str(beta),
                                        "--seed", str(args.seed)])
    result = rl_throughput.measure(rl_args, trl_too=trl_too)
    head = {"name": f"rl_{size}"}
    if trl_too:
        head.update(ratio=result.pop("ratio_tokens_per_s"), accept=ACCEPT["rl"],
                    compares="our GRPO loop's completion tokens/s over TRL GRPOTrainer's (same model, prompts, "
                             "settings; interleaved steps, medians of per-step rates)")
    return {**head, **result, "weights": "random (speed does not depend on them)"}


# ---------------------------------------------------------------- evaluation: batched vs one at a time
def bench_eval(size: str, args, task, splits) -> dict:
    """The evaluator at its default batch size and length (greedy) against batch size 1. Random weights rarely
    end a completion early, so both arms generate about max_new_tokens per example."""
    from biopost.config import EvalConfig
    from biopost.evaluation import generate_completions
    from biopost.models.policy import load_policy

    batch_size, max_new_tokens = EvalConfig().batch_size, EvalConfig().max_new_tokens
    device = resolve(args.device)
    examples = list(splits.val) + list(splits.id_test)
    rounds, single_per_round = (1, 4) if args.quick else (2, 4)
    if len(examples) < batch_size * rounds:
        raise ValueError(f"{TASK} has {len(examples)} val + id_test examples, fewer than {batch_size * rounds}")
    configs = {"batched": EvalConfig(batch_size=batch_size, max_new_tokens=max_new_tokens),
               "single": EvalConfig(batch_size=1, max_new_tokens=max_new_tokens)}
    totals = {arm: {"seconds": 0.0, "examples": 0, "tokens": 0} for arm in configs}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_backbone(size, task.training_texts(splits.train), Path(tmp) / "backbone", seed=args.seed)
        policy = load_policy(path, args.dtype, device=device)
        for arm, cfg in configs.items():  # warm-up
            generate_completions(policy, task, examples[: cfg.batch_size], cfg)
        for r in range(rounds):  # interleaved, so a busy machine slows both alike
            for arm, n in (("batched", batch_size), ("single", single_per_round)):
                chunk = examples[r * n : (r + 1) * n]
                start = clock(device)
                _, lengths = generate_completions(policy, task, chunk, configs[arm])
                totals[arm]["seconds"] += clock(device) - start
                totals[arm]["examples"] += len(chunk)
                totals[arm]["tokens"] += sum(lengths)
    rates = {arm: {"examples_per_s": t["examples"] / t["seconds"], "examples": t["examples"],
                   "mean_tokens": t["tokens"] / t["examples"]} for arm, t in totals.items()}
    b, s = rates["batched"], rates["single"]
    return {"name": f"eval_{size}", "ratio": round(b["examples_per_s"] / s["examples_per_s"], 2), "accept": ACCEPT["eval"],
            "compares": f"the evaluator's examples/s at batch {batch_size} over one example at a time (greedy)",
            "batched_examples_per_s": round(b["examples_per_s"], 2), "single_examples_per_s": round(s["examples_per_s"], 2),
            "batched_mean_tokens": round(b["mean_tokens"], 1), "single_mean_tokens": round(s["mean_tokens"], 1),
            "batched_examples": b["examples"], "single_examples": s["examples"], "batch_size": batch_size,
            "max_new_tokens": max_new_tokens, "dtype": args.dtype, "device": device,
            "weights": "random (speed does not depend on them)"}


# ---------------------------------------------------------------- encoder cache, study planner
def bench_encoder_cache(args) -> dict:
    import encoder_cache

    steps = "2" if args.quick else "4"
    result = encoder_cache.measure(encoder_cache.parse_args(["--steps", steps, "--device", args.device,
                                                                "--seed", str(args.seed)]))
    return {"name": "encoder_cache", "ratio": result.pop("ratio"),
            "compares": "fused SFT step time re-encoding every step over reading cached features", **result}


def bench_plan(args) -> dict:
    from biopost.study.config import load_study
    from biopost.study.plan import make_plan

    study = ROOT / "configs" / "studies" / "paper-genomics.yaml"
    plan = make_plan(load_study(study), load_data=False)
    naive, executed = plan.steps_naive, plan.steps_executed
    return {"name": "plan", "ratio": round(naive / executed, 3),
            "compares": "optimizer steps without sharing over steps the study planner executes",
            "study": str(study.relative_to(ROOT)), "runs": len(plan.runs), "steps_naive": naive,
            "steps_executed": executed, "sizes": plan.sizes}


# ---------------------------------------------------------------- driver
def benchmarks(args) -> list[tuple[str, object]]:
    """(name, thunk) in running order; the task's data are loaded once, on first need."""
    sizes = [s for s in args.sizes.split(",") if s]
    kinds = set(args.only.split(","))
    data = {}

    def loaded():
        if not data:
            data["task"], data["splits"] = task_and_splits()
        return data["task"], data["splits"]

    out = []
    for size in sizes:
        if "sft" in kinds:
            out.append((f"sft_{size}", lambda size=size: bench_sft(size, args, *loaded())))
        if "rl" in kinds:
            out.append((f"rl_{size}", lambda size=size: bench_rl(size, args)))
        if "eval" in kinds:
            out.append((f"eval_{size}", lambda size=size: bench_eval(size, args, *loaded())))
    if "encoder_cache" in kinds:
        out.append(("encoder_cache", lambda: bench_encoder_cache(args)))
    if "plan" in kinds:
        out.append(("plan", lambda: bench_plan(args)))
    return out


def run_one(name: str, thunk, where: dict) -> dict:
    """The benchmark's line, or an error line naming it (one failure must not lose the rest)."""
    return {**timed_row(thunk, name=name), "machine": where}


def timed_row(thunk, **on_error) -> dict:
    """``thunk()``'s row with its ``seconds``; if it raises, the traceback goes to stderr and the row is
    ``on_error`` plus a one-line ``error``, so the next benchmark still runs."""
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries our JSON lines only (TRL prints its metrics)
            row = thunk()
    except Exception as err:  # noqa: BLE001 - reported as data, the next benchmark runs
        traceback.print_exc(file=sys.stderr)
        row = {**on_error, "error": f"{type(err).__name__}: {err}".splitlines()[0][:500]}
    return {**row, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    where = machine(resolve(args.device))
    for name, thunk in benchmarks(args):
        print(json.dumps(run_one(name, thunk, where)), flush=True)


if __name__ == "__main__":
    main()
