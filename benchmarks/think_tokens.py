"""Can LoRA SFT learn the reasoning format when ``<think>``/``</think>`` are added tokens? (issue 16, item 1)

A tiny-s backbone without think tokens (tokenizer trained on the PBMC cell-type texts, as for SmolLM2, which
lacks them) is first trained in full for ``--pretrain-steps`` on the task with the tags as text: a
"pretrained" model that already knows the format. Two arms then run the same LoRA SFT (rank 8, all linear
layers, same rows, order and seed) for ``--steps`` steps: ``text`` keeps the tags as text; ``add`` adds them
as tokens the way ``model.think_tokens: add`` does (``ensure_think_tokens``, then ``prepare_for_training``).
Reported per arm: greedy format reward (``rewards.format_reward``) and accuracy on ``--eval`` val examples,
and for ``add`` the teacher-forced probability of the right and of the other tag at target positions holding
a tag, and the distance between the two new rows relative to a typical row's norm. Prints one JSON line.

Runs against any checkout (``PYTHONPATH=<checkout>/src``), so the arms can be compared before and after a fix.

    python benchmarks/think_tokens.py [--pretrain-steps 60] [--steps 100] [--eval 32]
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import random
import tempfile
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=60, help="full fine-tuning steps, tags as text")
    p.add_argument("--steps", type=int, default=100, help="LoRA SFT steps per arm")
    p.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval", type=int, default=32, help="val examples scored per arm")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def train(policy, rows, steps: int, lr: float, batch_size: int, seed: int) -> None:
    """Teacher-forced steps on whatever ``policy`` leaves trainable (the same order for every arm)."""
    import torch

    from biopost.stages.trainer import collate

    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    policy.model.train()
    for _ in range(steps):
        policy.model(**collate(order.sample(rows, batch_size), policy.tokenizer.pad_token_id)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    policy.model.eval()


def tag_probabilities(policy, task, examples) -> tuple[float, float]:
    """Mean teacher-forced p(right tag) and p(other tag) over target positions holding a tag."""
    import torch

    from biopost.models.tiny import THINK
    from biopost.stages.sft import tokenize_example
    from biopost.stages.trainer import collate

    tags = policy.tokenizer.convert_tokens_to_ids(THINK)
    batch = collate([tokenize_example(policy, task, e, 512) for e in examples], policy.tokenizer.pad_token_id)
    with torch.no_grad():
        probs = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
    labels = batch["labels"][:, 1:]
    right, wrong = [], []
    for row, pos in ((labels == tags[0]) | (labels == tags[1])).nonzero().tolist():
        label = int(labels[row, pos])
        right.append(float(probs[row, pos, label]))
        wrong.append(float(probs[row, pos, tags[1] if label == tags[0] else tags[0]]))
    return sum(right) / len(right), sum(wrong) / len(wrong)


def score(policy, task, examples, max_new_tokens: int) -> dict:
    from biopost.config import EvalConfig
    from biopost.evaluation import generate_completions
    from biopost.rewards import format_reward

    out = generate_completions(policy, task, examples, EvalConfig(max_new_tokens=max_new_tokens, batch_size=16))
    completions = [c for (c,) in (out[0] if isinstance(out, tuple) else out)]  # (texts, lengths) after the fix
    fmt = format_reward(None, completions)
    correct = [task.score(c, e)[task.primary_metric] for e, c in zip(examples, completions)]
    return {"format_reward": round(sum(fmt) / len(fmt), 4), task.primary_metric: round(sum(correct) / len(correct), 4)}


def lora_arm(source: Path, workdir: Path, rows_of, args, task, val, add: bool) -> dict:
    import torch

    from biopost.config import LoraConfig
    from biopost.models.adapters import prepare_for_training
    from biopost.models.backbones import ensure_think_tokens
    from biopost.models.policy import load_policy
    from biopost.models.tiny import THINK

    policy = load_policy(source)
    result = {}
    if add:
        ensure_think_tokens(policy)
        policy.save(workdir / "think")
        source = workdir / "think"
        policy = load_policy(source)
        weight = policy.model.get_input_embeddings().weight.detach()
        a, b = weight[policy.tokenizer.convert_tokens_to_ids(THINK)]
        result["rows_apart"] = round(float((a - b).norm() / weight.norm(dim=1).mean()), 6)
    torch.manual_seed(args.seed)
    lora = LoraConfig(rank=8, alpha=16.0, dropout=0.0)
    kwargs = {"source": source} if "source" in inspect.signature(prepare_for_training).parameters else {}
    policy = prepare_for_training(policy, lora, workdir / "stage", **kwargs)
    train(policy, rows_of(policy), args.steps, args.lr, args.batch_size, args.seed)
    result.update(score(policy, task, val, max_new_tokens=96))
    if add:
        right, wrong = tag_probabilities(policy, task, val)
        result.update(p_right_tag=round(right, 4), p_other_tag=round(wrong, 4))
    return result


def main() -> None:
    args = parse_args()
    import torch

    from biopost.config import validate_config
    from biopost.models.policy import load_policy
    from biopost.models.tiny import build_tiny_backbone
    from biopost.pipeline import load_task_and_splits
    from biopost.stages.sft import tokenize_example

    torch.set_num_threads(args.threads)
    config = validate_config({"task": {"name": "cell_type/pbmc68k", "options": {"top_k_genes": 24}},
                              "stages": [{"kind": "sft"}]})
    task, splits = load_task_and_splits(config)
    train_split, val = list(splits.train), list(splits.val)[: args.eval]
    rows_of = lambda policy: [tokenize_example(policy, task, e, 512) for e in train_split]  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(args.seed)
        plain = build_tiny_backbone("tiny-s", task.training_texts(train_split), tmp / "plain", think_tokens=False,
                                    seed=args.seed)
        policy = load_policy(plain)
        train(policy, rows_of(policy), args.pretrain_steps, 3e-3, args.batch_size, args.seed)
        pretrained = policy.save(tmp / "pretrained")
        arms = {name: lora_arm(pretrained, tmp / name, rows_of, args, task, val, add=name == "add")
                for name in ("text", "add")}
    print(json.dumps({"benchmark": "think_tokens", "pretrain_steps": args.pretrain_steps, "lora_steps": args.steps,
                      "lr": args.lr, "eval_examples": len(val), **arms,
                      "torch": torch.__version__, "platform": platform.machine()}))


if __name__ == "__main__":
    main()
