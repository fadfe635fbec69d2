"""The one evaluator: every stage and `biopost eval` call :func:`evaluate` with the same settings.

Batched generation (left padding, KV cache; or a vLLM engine, ``eval.generation``), greedy or k samples, the task's parser and scorer,
per-example records and summary rows with n and a bootstrap 95% interval.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from biopost import distributed
from biopost.config import EvalConfig
from biopost.data import Example
from biopost.data.splits import fingerprint, subset
from biopost.models.generation import Sampling, TransformersBackend
from biopost.stages.grpo import completion_mask


def generate_completions(policy, task, examples: list[Example], cfg: EvalConfig, desc: str = "generate",
                         backend=None) -> tuple[list[list[str]], list[int]]:
    """``cfg.num_samples`` completions per example (greedy when 1), and each completion's generated token
    count through end-of-turn (RL's completion mask: the count its length reward sees). ``backend``: the
    generation backend (models/generation.py); None = transformers ``generate`` on the live policy."""
    backend = backend or TransformersBackend()
    sampled = cfg.num_samples > 1
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, greedy=not sampled, temperature=cfg.temperature,
                        top_p=cfg.top_p, top_k=cfg.top_k, num_samples=cfg.num_samples, seed=cfg.seed)
    starts = list(range(0, len(examples), cfg.batch_size))
    # Greedy decoding is sharded over processes by whole batches: each batch is padded and decoded exactly as
    # one process would, so the gathered completions are one process's. Sampled decoding draws from one RNG
    # stream across batches, so every process decodes them all (the same samples as one process).
    mine = starts if sampled else [starts[i] for i in distributed.round_robin(len(starts))]
    modes = training_flags(policy.model)
    policy.model.eval()
    done: list[tuple[int, list[list[str]], list[int]]] = []
    try:
        with seeded_rng(cfg.seed):  # the same samples at every checkpoint; the caller's RNG untouched
            for start in tqdm(mine, desc=desc, leave=False, disable=len(examples) == 0 or not distributed.is_main()):
                batch = examples[start : start + cfg.batch_size]
                payloads = collate_payloads(batch, policy.modalities)
                enc = encode_prompts(policy, [policy.render_prompt(task.messages(e)) for e in batch], payloads)
                new = backend.generate(policy, enc["input_ids"], enc["attention_mask"], payloads, sampling)
                texts = [policy.decode(row) for row in new]
                done.append((start, [texts[i * cfg.num_samples : (i + 1) * cfg.num_samples] for i in range(len(batch))],
                             completion_mask(new, policy.end_of_turn_id).sum(1).tolist()))
    finally:
        restore_training_flags(modes)
    if not sampled:
        done = sorted(distributed.gather(done), key=lambda d: d[0])
    return [c for _, completions, _ in done for c in completions], [n for _, _, counts in done for n in counts]


def training_flags(model) -> list[tuple]:
    """Every module's own ``training`` flag: RL's policy is in eval mode but for its checkpointed layers
    (``checkpoint_in_eval_mode``), which a plain ``model.train(was_training)`` would switch off."""
    return [(module, module.training) for module in model.modules()]


def restore_training_flags(modes: list[tuple]) -> None:
    for module, training in modes:
        module.training = training


@contextmanager
def seeded_rng(seed: int):
    """Sample from torch's RNG seeded with ``seed``, then give the caller back its own CPU and CUDA RNG state.

    ``generate`` takes no generator, so evaluation borrows the global one: its samples are the same at every
    checkpoint, and a stage's own randomness (rollouts, dropout) goes on as if no evaluation had run.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def encode_prompts(policy, prompts: list[str], payloads: dict[str, list] | None = None) -> dict:
    """Rendered prompts as a left-padded batch on the model's device (generation appends on the right)."""
    ids = policy.tokenize(prompts, payloads)
    return policy.tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt").to(policy.device)


def collate_payloads(batch: list[Example], modalities: tuple[str, ...]) -> dict[str, list]:
    """The batch's payloads for the modalities the model reads through an encoder (none for text-only)."""
    return {name: [getattr(e, name) for e in batch] for name in modalities}


def score_split(task, examples: list[Example], completions: list[list[str]]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Per-example records and per-example score arrays (mean over samples; ``pass@k`` for k > 1)."""
    records, per_metric = [], {}
    for example, samples in zip(examples, completions):
        scores = [task.score(c, example) for c in samples]
        mean = {m: float(np.mean([s[m] for s in scores])) for m in scores[0]}
        if len(samples) > 1:
            mean[f"{task.primary_metric}_pass@{len(samples)}"] = float(max(s[task.primary_metric] for s in scores))
        for metric, value in mean.items():
            per_metric.setdefault(metric, []).append(value)
        records.append({
            "id": example.id,
            "answer": example.answer,
            "completions": samples,
            "parsed": [{"strict": task.parse(c, "strict"), "lenient": task.parse(c, "lenient")} for c in samples],
            "scores": scores,
            "mean": mean,
        })
    return records, {m: np.asarray(v) for m, v in per_metric.items()}


def bootstrap_ci(values: np.ndarray, resamples: int, seed: int) -> tuple[float | None, float | None]:
    """Percentile 95% interval of the mean; ``(None, None)`` (no interval, ``n/a`` in reports) when intervals are
    off (``resamples`` 0) or there are fewer than 2 values: every resample of one value is that value, a
    zero-width interval that would claim a certainty one example cannot give.

    >>> lo, hi = bootstrap_ci(np.array([0.0, 1.0] * 50), 2000, 0)
    >>> 0.38 < lo < 0.5 < hi < 0.62
    True
    >>> bootstrap_ci(np.array([1.0]), 2000, 0)
    (None, None)
    """
    if resamples == 0 or len(values) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def evaluate(policy, task, splits: dict[str, list[Example]], cfg: EvalConfig,
             backend=None) -> tuple[list[dict], dict[str, list[dict]]]:
    """Evaluate on each split; returns summary rows and per-example records by split. ``backend``: as
    :func:`generate_completions`."""
    rows, records = [], {}
    for name, examples in splits.items():
        chosen = subset(examples, cfg.max_examples, cfg.seed)
        if not chosen:
            continue
        completions, lengths = generate_completions(policy, task, chosen, cfg, desc=f"eval {name}", backend=backend)
        recs, per_metric = score_split(task, chosen, completions)
        records[name] = recs
        for metric, values in per_metric.items():
            lo, hi = bootstrap_ci(values, cfg.bootstrap, cfg.seed)
            rows.append({
                "split": name, "metric": metric, "value": float(values.mean()), "n": int(len(values)),
                "ci_low": lo, "ci_high": hi, "fingerprint": fingerprint(chosen),
                "num_samples": cfg.num_samples,
            })
        for metric, (value, n) in task.split_metrics(chosen, completions).items():
            rows.append({"split": name, "metric": metric, "value": float(value), "n": int(n), "ci_low": None,
                         "ci_high": None, "fingerprint": fingerprint(chosen), "num_samples": cfg.num_samples})
        rows.append({"split": name, "metric": "completion_tokens", "n": len(chosen), "fingerprint": fingerprint(chosen),
                     "value": float(np.mean(lengths)),
                     "ci_low": None, "ci_high": None, "num_samples": cfg.num_samples})
    return rows, records
