"""RL throughput: our GRPO loop (biopost.stages.rl) against TRL's GRPOTrainer, same model and settings.

Both train the same freshly built tiny backbone (tokenizer trained on the PBMC task's texts) on the same
prompts (the first ``--prompts`` training prompts of ``cell_type/pbmc68k``, rendered with the chat template,
each step uses all of them), with the same number of generations, completion length, sampling temperature,
learning rate, loss type, beta, clipping and gradient-norm clipping, one optimiser step per rollout batch
(mu = 1), no gradient checkpointing and float32. The reward is the same cheap function of the text for both,
so rewards cost nothing and the comparison is generation + log-probs + backward + framework overhead.

Sampled completions differ in length, so the figure of merit is generated completion tokens per second
(through the first end-of-turn token, as both mask them). Prints one JSON line.

    python benchmarks/rl_throughput.py [--steps 10] [--warmup 2] [--size tiny-s]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny-s", choices=["tiny-s", "tiny-m"])
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
    return p.parse_args()


def text_reward(prompts, completions, **_) -> list[float]:
    """Same cheap reward for both trainers: share of distinct characters (varies, so advantages are non-zero)."""
    return [len(set(c)) / (1 + len(c)) for c in completions]


def build(args, workdir: Path):
    from biopost.config import validate_config
    from biopost.models.tiny import build_tiny_backbone
    from biopost.pipeline import load_task_and_splits

    config = validate_config({"task": {"name": "cell_type/pbmc68k"}, "stages": [{"kind": "rl"}]})
    task, splits = load_task_and_splits(config)
    path = build_tiny_backbone(args.size, task.training_texts(splits.train), workdir / "backbone", seed=args.seed)
    return task, list(splits.train)[: args.prompts], path


def run_ours(args, task, examples, path, device) -> dict:
    import torch

    from biopost.config import RLStage
    from biopost.models.policy import load_policy
    from biopost.stages import rl
    from biopost.stages.grpo import group_advantages

    torch.manual_seed(args.seed)
    stage = RLStage(num_generations=args.generations, prompts_per_step=args.prompts,
                    max_completion_length=args.max_completion_length, lr=args.lr, loss_type=args.loss_type,
                    beta=args.beta, temperature=1.0, top_p=1.0, top_k=0, scale_rewards="group",
                    schedule={"name": "constant", "warmup_ratio": 0.0}, lora="full")
    policy = load_policy(path)
    policy.model.to(device)
    for p in policy.model.parameters():
        p.requires_grad_(True)
    reference = rl.Reference.of(policy, path, stage.adapter)
    policy.model.eval()
    rewards = {"text": (1.0, text_reward)}
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    scheduler = rl.make_scheduler(stage, optimizer, args.warmup + args.steps)

    times, tokens = [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        batch = rl.rollout(policy, task, examples, stage)  # the same prompts every step, as TRL below
        scores = rl.score_rollouts(batch, rewards, stage)
        advantages = group_advantages(scores["reward"], stage.num_generations, stage.scale_rewards)
        with torch.no_grad():
            batch.old_logps = rl.sequence_logps(policy, batch, stage.temperature)[0] if stage.mu > 1 else None  # as run_rl
            batch.ref_logps = reference.logps(policy, batch, stage.temperature)
        rl.optimise(policy, optimizer, scheduler, params, batch, advantages, stage)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(int(batch.mask.sum()))
    return summary(times, tokens)


def run_trl(args, task, examples, path, device, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from biopost.models.policy import load_policy

    torch.manual_seed(args.seed)
    render = load_policy(path)
    prompts = [render.render_prompt(task.messages(e)) for e in examples]  # identical prompt text to ours
    tokens: list[int] = []

    def reward(prompts, completions, completion_ids, **kw):
        tokens.append(sum(len(ids) for ids in completion_ids))
        return text_reward(prompts, completions)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **kw):
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
        bf16=False, fp16=False, use_cpu=device == "cpu", report_to="none", logging_steps=10**6, save_strategy="no",  # no per-step printing
        log_completions=False, disable_tqdm=True, seed=args.seed, shuffle_dataset=False,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=reward, args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=AutoTokenizer.from_pretrained(path),
    )
    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    return summary(timer.times[args.warmup :], tokens[args.warmup :])


def summary(times: list[float], tokens: list[int]) -> dict:
    return {"step_s": sum(times) / len(times), "tokens_per_s": sum(tokens) / sum(times),
            "completion_tokens_per_step": sum(tokens) / len(tokens), "steps": len(times)}


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main():
    args = parse_args()
    import torch
    import transformers
    import trl

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        task, examples, path = build(args, workdir)
        ours = run_ours(args, task, examples, path, device)
        theirs = run_trl(args, task, examples, path, device, workdir)
    print(json.dumps({
        "ours_step_s": round(ours["step_s"], 4), "trl_step_s": round(theirs["step_s"], 4),
        "ours_tokens_per_s": round(ours["tokens_per_s"], 1), "trl_tokens_per_s": round(theirs["tokens_per_s"], 1),
        "ratio_tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
        "ours_completion_tokens_per_step": ours["completion_tokens_per_step"],
        "trl_completion_tokens_per_step": theirs["completion_tokens_per_step"],
        "size": args.size, "prompts": args.prompts, "generations": args.generations,
        "max_completion_length": args.max_completion_length, "loss_type": args.loss_type, "beta": args.beta,
        "steps": args.steps, "warmup": args.warmup, "device": device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
