"""RL throughput: our GRPO loop (biopost.stages.rl) against TRL's GRPOTrainer, same model and settings.

Both train the same freshly built tiny backbone (tokenizer trained on the PBMC task's texts) on the same
prompts (the first ``--prompts`` training prompts of ``cell_type/pbmc68k``, rendered with the chat template,
each step uses all of them), with the same number of generations, completion length, sampling temperature,
learning rate, loss type, beta, clipping and gradient-norm clipping, one optimiser step per rollout batch
(mu = 1), no gradient checkpointing and float32. The reward is the same cheap function of the text for both,
so rewards cost nothing and the comparison is generation + log-probs + backward + framework overhead.

Sampled completions differ in length, so the figure of merit is generated completion tokens per second
(through the first end-of-turn token, as both mask them). The two run interleaved (one of our steps before each
of TRL's), so a busy machine slows both alike; the ratio is of the medians of per-step tokens/s. Prints one JSON line; ``benchmarks/run_all.py`` calls
:func:`measure` for its ``rl_*`` lines.

Sizes: see benchmarks/common.py (``smollm2-135m-arch``: SmolLM2-135M's architecture with random weights).
``--lora full`` trains every weight (both keep a frozen reference copy when beta > 0); ``--lora R`` trains a
rank-R adapter on all linear layers (alpha 2R, no dropout), the reference being the adapter switched off.

    python benchmarks/rl_throughput.py [--steps 10] [--warmup 2] [--size tiny-s] [--device auto] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import SIZES, build_backbone, machine, resolve, sync


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny-s", choices=SIZES)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--lora", default="full", help="full, or a LoRA rank (all linear layers, alpha = 2 x rank)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--loss-type", default="grpo", choices=["grpo", "dr_grpo", "dapo"])
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def text_reward(prompts, completions, **_) -> list[float]:
    """Same cheap reward for both trainers: share of distinct characters (varies, so advantages are non-zero)."""
    return [len(set(c)) / (1 + len(c)) for c in completions]


def build(args, workdir: Path):
    from biopost.config import validate_config
    from biopost.pipeline import load_task_and_splits

    config = validate_config({"task": {"name": "cell_type/pbmc68k"}, "stages": [{"kind": "rl"}]})
    task, splits = load_task_and_splits(config)
    path = build_backbone(args.size, task.training_texts(splits.train), workdir / "backbone", seed=args.seed)
    return task, list(splits.train)[: args.prompts], path


def lora_settings(args) -> dict | None:
    """None for full fine-tuning, else the adapter both trainers attach."""
    if args.lora == "full":
        return None
    rank = int(args.lora)
    return {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "target_modules": "all-linear"}


def ours_stepper(args, task, examples, path, device, workdir: Path):
    """Our GRPO step as ``run_rl`` takes it (rollout, rewards, advantages, reference log-probs, update), as a
    function returning the completion tokens it trained on."""
    import torch

    from biopost.config import LoraConfig, RLStage
    from biopost.models.adapters import prepare_for_training
    from biopost.models.policy import load_policy
    from biopost.stages import rl
    from biopost.stages.grpo import group_advantages

    torch.manual_seed(args.seed)
    lora = lora_settings(args)
    stage = RLStage(num_generations=args.generations, prompts_per_step=args.prompts,
                    max_completion_length=args.max_completion_length, lr=args.lr, loss_type=args.loss_type,
                    beta=args.beta, temperature=1.0, top_p=1.0, top_k=0, scale_rewards="group",
                    schedule={"name": "constant", "warmup_ratio": 0.0}, lora=LoraConfig(**lora) if lora else "full")
    policy = load_policy(path, args.dtype, device=device)
    policy = prepare_for_training(policy, stage.resolved_lora(None), workdir / "ours", source=path)
    reference = rl.Reference.of(policy, path, stage.adapter)
    policy.model.eval()
    rewards = {"text": (1.0, text_reward)}
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    scheduler = rl.make_scheduler(stage, optimizer, args.warmup + args.steps + 1)

    def step() -> int:
        batch = rl.rollout(policy, task, examples, stage)  # the same prompts every step, as TRL below
        scores = rl.score_rollouts(batch, rewards, stage)
        advantages = group_advantages(scores["reward"], stage.num_generations, stage.scale_rewards)
        with torch.no_grad():
            batch.old_logps = rl.sequence_logps(policy, batch, stage.temperature)[0] if stage.mu > 1 else None  # as run_rl
            batch.ref_logps = reference.logps(policy, batch, stage.temperature)
        rl.optimise(policy, optimizer, scheduler, params, batch, advantages, stage)
        return int(batch.mask.sum())

    return step


def timed(step, device: str) -> tuple[float, int]:
    sync(device)
    start = time.perf_counter()
    tokens = step()
    sync(device)
    return time.perf_counter() - start, tokens


def run_ours(args, task, examples, path, device, workdir: Path) -> dict:
    """Our loop alone."""
    step = ours_stepper(args, task, examples, path, device, workdir)
    runs = [timed(step, device) for _ in range(args.warmup + args.steps)][args.warmup :]
    return summary([t for t, _ in runs], [n for _, n in runs])


def run_trl(args, task, examples, path, device, workdir: Path, alongside=None) -> tuple[dict, dict | None]:
    """TRL's trainer; with ``alongside`` (a step function of ours) one of our steps runs before each of TRL's
    (timed apart), so both see the same machine load: the summaries of (TRL, ours)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from biopost.models.policy import DTYPES, load_policy

    torch.manual_seed(args.seed)
    render = load_policy(path)
    prompts = [render.render_prompt(task.messages(e)) for e in examples]  # identical prompt text to ours
    tokens: list[int] = []

    def reward(prompts, completions, completion_ids, **kw):
        tokens.append(sum(len(ids) for ids in completion_ids))
        return text_reward(prompts, completions)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start, self.ours = [], 0.0, []

        def on_step_begin(self, *a, **kw):
            if alongside is not None:
                self.ours.append(timed(alongside, device))
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            sync(device)
            self.times.append(time.perf_counter() - self.start)

    total = args.warmup + args.steps
    config = GRPOConfig(
        output_dir=str(workdir / "trl"), max_steps=total, per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.max_completion_length, learning_rate=args.lr,
        loss_type=args.loss_type, beta=args.beta, epsilon=0.2, epsilon_high=0.28, temperature=1.0, top_p=1.0,
        top_k=0, scale_rewards="group", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, gradient_accumulation_steps=1, num_iterations=1, gradient_checkpointing=False,
        bf16=args.dtype == "bfloat16", fp16=False, use_cpu=device == "cpu", report_to="none", logging_steps=10**6, save_strategy="no",  # no per-step printing
        log_completions=False, disable_tqdm=True, seed=args.seed, shuffle_dataset=False,
    )
    lora = lora_settings(args)
    peft_config = None
    if lora:
        from peft import LoraConfig as PeftLora

        peft_config = PeftLora(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                               target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]), reward_funcs=reward, args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=peft_config,
    )
    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    ours = timer.ours[args.warmup :]
    return (summary(timer.times[args.warmup :], tokens[args.warmup :]),
            summary([t for t, _ in ours], [n for _, n in ours]) if ours else None)


def summary(times: list[float], tokens: list[int]) -> dict:
    """Mean step time, tokens/s over the window, and the median of the per-step rates (robust to a busy machine)."""
    import statistics

    return {"step_s": sum(times) / len(times), "tokens_per_s": sum(tokens) / sum(times),
            "median_tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times)),
            "completion_tokens_per_step": sum(tokens) / len(tokens), "steps": len(times)}


def measure(args, trl_too: bool = True) -> dict:
    """Ours (and TRL's unless ``trl_too`` is false) on one freshly built backbone; one flat dict of results."""
    import transformers

    device = resolve(args.device)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        task, examples, path = build(args, workdir)
        if trl_too:  # interleaved: one of our steps, then one of TRL's
            step = ours_stepper(args, task, examples, path, device, workdir)
            theirs, ours = run_trl(args, task, examples, path, device, workdir, alongside=step)
        else:
            ours, theirs = run_ours(args, task, examples, path, device, workdir), None
    out = {"ours_step_s": round(ours["step_s"], 4), "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
           "ours_median_tokens_per_s": round(ours["median_tokens_per_s"], 1),
           "ours_completion_tokens_per_step": ours["completion_tokens_per_step"]}
    if theirs:
        out.update({"trl_step_s": round(theirs["step_s"], 4), "trl_tokens_per_s": round(theirs["tokens_per_s"], 1),
                    "trl_median_tokens_per_s": round(theirs["median_tokens_per_s"], 1),
                    "ratio_tokens_per_s": round(ours["median_tokens_per_s"] / theirs["median_tokens_per_s"], 3),
                    "trl_completion_tokens_per_step": theirs["completion_tokens_per_step"]})
    return {**out, "size": args.size, "lora": args.lora, "dtype": args.dtype, "prompts": args.prompts,
            "generations": args.generations, "max_completion_length": args.max_completion_length,
            "loss_type": args.loss_type, "beta": args.beta, "steps": args.steps, "warmup": args.warmup,
            "device": device}


def main():
    args = parse_args()
    import torch
    import trl

    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    print(json.dumps({**result, "trl": trl.__version__, "machine": machine(result["device"])}))


if __name__ == "__main__":
    main()
