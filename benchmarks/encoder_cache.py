"""Fused SFT step time with the on-disk feature cache against re-encoding every step.

A tiny-s backbone is fused with a frozen encoder built in-process with random weights (timing does not
depend on them), through an ``mlp`` projector with 8 positions per item:

- ``--modality protein``: an encoder the size of ESM-2 8M (``esm2_t6_8M``: hidden 320, 6 layers, 20 heads);
  each item is a sequence of ``--length`` residues.
- ``--modality cell``: a ``BertForMaskedLM`` the size of Geneformer-6L-30M (hidden 256, 6 layers, 4 heads) with
  a 20,000-gene token dictionary and median dictionary, read through the rank-value cell encoder; each item is
  a cell expressing ``--length`` genes (all of them read: ``max_length`` = length + 2).

Both arms run the real SFT machinery (``PolicyTrainer``, ``tokenize_example``, the collator) on the same rows,
batch and seed: each step reads new items. With the cache the features were computed once beforehand (as
after a first epoch, or by an earlier run sharing the cache) and are read from disk; without it the encoder
runs on every step. Prints one JSON line; ``ratio`` = uncached / cached step time. ``benchmarks/run_all.py``
calls :func:`measure` for its ``encoder_cache`` line.

    python benchmarks/encoder_cache.py [--modality protein] [--steps 4] [--warmup 1] [--batch-size 8] [--length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

AMINO = "ACDEFGHIKLMNPQRSTVWY"
GENES = 20000  # Geneformer's dictionaries hold about 25k genes


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--modality", choices=["protein", "cell"], default="protein")
    p.add_argument("--length", type=int, default=256, help="residues per sequence, or expressed genes per cell")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_encoder(path: Path, modality: str) -> Path:
    """An ESM-2 8M-sized encoder with the ESM tokenizer, or a Geneformer-6L-sized BERT with gene dictionaries,
    saved as a transformers directory."""
    import torch

    path.mkdir(parents=True)
    torch.manual_seed(0)
    if modality == "cell":
        from transformers import BertConfig, BertForMaskedLM

        tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{f"G{i}": 4 + i for i in range(GENES)}}
        (path / "gene_tokens.json").write_text(json.dumps(tokens))
        (path / "gene_medians.json").write_text(json.dumps({f"G{i}": 1.0 + (i % 7) for i in range(GENES)}))
        config = BertConfig(vocab_size=len(tokens), hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                            intermediate_size=512, max_position_embeddings=2048, pad_token_id=0)
        BertForMaskedLM(config).save_pretrained(path)
        return path
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    (path / "vocab.txt").write_text("\n".join(["<cls>", "<pad>", "<eos>", "<unk>", *AMINO, "<mask>"]) + "\n")
    tokenizer = EsmTokenizer(str(path / "vocab.txt"))
    config = EsmConfig(vocab_size=len(tokenizer), hidden_size=320, num_hidden_layers=6, num_attention_heads=20,
                       intermediate_size=1280, max_position_embeddings=1026, position_embedding_type="rotary",
                       pad_token_id=tokenizer.pad_token_id, mask_token_id=tokenizer.mask_token_id, token_dropout=False)
    EsmForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_task_and_examples(n: int, length: int, seed: int, modality: str):
    import numpy as np

    from biopost.data import Example
    from biopost.tasks.base import LabelTask

    class BenchTask(LabelTask):
        name, domain, labels = "bench/two-classes", "bench", ["first", "second"]

        def user_prompt(self, example):
            return f"Input: {self.sequence_text(modality, 'x')}\nWhich class, first or second?"

    rng = np.random.default_rng(seed)

    def payload():
        if modality == "cell":
            genes = rng.choice(GENES, length, replace=False)
            return {"genes": [f"G{g}" for g in genes], "values": np.round(rng.gamma(2.0, 1.0, length), 4).tolist()}
        return "".join(rng.choice(list(AMINO), length))

    examples = [Example(f"p{i}", {}, ["first", "second"][i % 2], reasoning="The features decide.",
                        **{modality: payload()}) for i in range(n)]
    task = BenchTask()
    task.fused_modalities = frozenset({modality})
    return task, examples


ENCODER_NAMES = {"protein": "esm2_t6_8M-sized (hidden 320, 6 layers)",
                 "cell": "Geneformer-6L-sized BERT (hidden 256, 6 layers, 20k genes)"}


class StepTimer:
    """Wall time of each optimiser step (Trainer callback), the device synchronised."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        from common import sync

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                sync(device)
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync(device)
                timer.times.append(time.perf_counter() - timer.start)

        self.times: list[float] = []
        self.callback = Callback()


def time_sft(policy, rows, args, workdir: Path, device: str) -> float:
    from transformers import TrainingArguments

    from biopost.stages.trainer import PolicyTrainer, collate

    timer = StepTimer(device)
    training = TrainingArguments(output_dir=str(workdir), per_device_train_batch_size=args.batch_size,
                                 max_steps=args.warmup + args.steps, learning_rate=1e-3, save_strategy="no",
                                 logging_steps=10**6, report_to="none", seed=args.seed, data_seed=args.seed,
                                 remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
                                 use_cpu=device == "cpu")
    trainer = PolicyTrainer(policy, model=policy.model, args=training, train_dataset=rows,
                            data_collator=lambda batch: collate(batch, policy.tokenizer.pad_token_id),
                            callbacks=[timer.callback])
    trainer.train()
    timed = timer.times[args.warmup :]
    return sum(timed) / len(timed)


def measure(args) -> dict:
    """Step times with and without the cache, and the settings they were measured with."""
    import transformers

    from biopost.config import EncoderConfig, LoraConfig
    from biopost.models.adapters import prepare_for_training
    from biopost.models.fusion import fuse
    from biopost.models.policy import load_policy
    from biopost.models.tiny import build_tiny_backbone
    from biopost.stages.sft import tokenize_example

    from common import resolve

    device = resolve(args.device)
    transformers.logging.set_verbosity_error()
    n = args.batch_size * (args.warmup + args.steps)
    task, examples = make_task_and_examples(n, args.length, args.seed, args.modality)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.environ["BIOPOST_CACHE"] = str(workdir / "cache")  # a fresh feature cache, removed afterwards
        encoder = build_encoder(workdir / "encoder", args.modality)
        backbone = build_tiny_backbone("tiny-s", task.training_texts(examples), workdir / "backbone", seed=args.seed)
        step_s = {}
        for arm, cached in (("cached", True), ("uncached", False)):
            cfg = EncoderConfig(name=str(encoder), projector="mlp", num_tokens=8, max_length=args.length + 2,
                                batch_size=args.batch_size, cache=cached)
            policy = fuse(load_policy(backbone), {args.modality: cfg}, seed=args.seed).to(device)
            policy = prepare_for_training(policy, LoraConfig(rank=8, alpha=16, dropout=0.0), workdir / arm)
            rows = [tokenize_example(policy, task, e, 512) for e in examples]
            if cached:  # features computed once beforehand, as after a first epoch
                policy.encoders[args.modality].encode([getattr(e, args.modality) for e in examples])
            step_s[arm] = time_sft(policy, rows, args, workdir / arm, device)
    return {
        "cached_step_s": round(step_s["cached"], 4), "uncached_step_s": round(step_s["uncached"], 4),
        "ratio": round(step_s["uncached"] / step_s["cached"], 2),
        "modality": args.modality, "encoder": ENCODER_NAMES[args.modality] + ", random weights", "backbone": "tiny-s",
        "projector": "mlp", "num_tokens": 8, "batch_size": args.batch_size, "length": args.length,
        "steps": args.steps, "warmup": args.warmup, "device": device,
    }


def main():
    args = parse_args()
    import torch

    from common import machine

    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    print(json.dumps({**result, "machine": machine(result["device"])}))


if __name__ == "__main__":
    main()
