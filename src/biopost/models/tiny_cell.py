"""``tiny-cell``: a small BERT pretrained offline by masked-gene modelling on the embedded PBMC training cells.

Pretraining reads only the ``train`` cells of ``cell_type/pbmc68k`` under its default split (seed 0); the held-out
MLM loss is measured on the ``val`` cells, and the builder asserts that no ``id_test`` / ``ood_test`` cell is
among either. Its vocabulary is the genes of the training cells (plus ``<pad>``, ``<mask>``, ``<cls>``,
``<eos>``) and its reference medians are those cells' non-zero medians (:func:`~biopost.models.cell_encoder.gene_medians`):
both are saved beside the weights (``gene_tokens.json``, ``gene_medians.json``), so the directory loads as any
Geneformer-style checkpoint would. ``cells.json`` records a key of every pretraining cell (:func:`cell_key`) and the split
fingerprints, for :func:`biopost.models.tiny_encoders.check_encoder_leakage`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from biopost.models.cell_encoder import MEDIANS_FILE, SPECIAL, TOKENS_FILE, GeneTokenizer, gene_medians
from biopost.models.tiny_encoders import publish_build

TASK = "cell_type/pbmc68k"
ARCHITECTURE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
TRAINING = dict(steps=300, batch_size=32, lr=2e-3, warmup=20, mlm_probability=0.15, max_length=64)


KEY = "id+sorted-gene-values"  # how cells.json keys cells; a record keyed otherwise cannot be checked


def cell_key(example) -> str:
    """Hash of a cell as its dataset names it: the cell's id and its (gene, value) pairs, sorted. The task's gene
    order (a tie-break shuffle seeded by ``task.options.seed``) and which cells ``max_cells`` keeps do not change it.

    >>> from types import SimpleNamespace as Cell
    >>> a = cell_key(Cell(id="c1", cell={"genes": ["A", "B"], "values": [1.0, 1.0]}))
    >>> a == cell_key(Cell(id="c1", cell={"genes": ["B", "A"], "values": [1.0, 1.0]}))
    True
    >>> a == cell_key(Cell(id="c1", cell={"genes": ["A", "B"], "values": [1.0, 2.0]}))
    False
    """
    pairs = sorted(zip(example.cell["genes"], map(float, example.cell["values"])))
    return hashlib.sha256(json.dumps([str(example.id), pairs]).encode()).hexdigest()


def pretraining_cells():
    """(train cells, val cells, splits) of the embedded task under its default split."""
    from biopost.config import validate_config
    from biopost.pipeline import load_task_and_splits

    config = validate_config({"task": {"name": TASK, "options": {"rationale": False}}, "stages": [{"kind": "sft"}]})
    _, splits = load_task_and_splits(config)
    train, heldout = [e.cell for e in splits.train], [e.cell for e in splits.val]
    tested = {cell_key(e) for name in ("id_test", "ood_test") for e in splits[name]}
    tested_ids = {e.id for name in ("id_test", "ood_test") for e in splits[name]}
    assert not tested & {cell_key(e) for e in splits.train + splits.val}, "a test cell is in tiny-cell's pretraining data"
    assert not tested_ids & {e.id for e in splits.train + splits.val}, "a test cell id is in tiny-cell's pretraining"
    return train, heldout, splits


def build_tiny_cell(target: Path, seed: int = 0, steps: int | None = None) -> dict:
    """Pretrain ``tiny-cell`` and save it to ``target`` (built aside, then renamed: concurrent builds are safe)."""
    import torch

    started, cpu_started = time.perf_counter(), time.process_time()
    steps = steps or TRAINING["steps"]
    target = Path(target)
    work = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train, heldout, splits = pretraining_cells()
    genes = sorted({g for c in train for g in c["genes"]})
    token_ids = {t: i for i, t in enumerate([*SPECIAL, *genes])}
    medians = gene_medians(train)
    tokenizer = GeneTokenizer(token_ids, medians, TRAINING["max_length"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains as fast on one thread, and the same on any machine
    try:
        model, losses = pretrain(token_ids, [tokenizer(c) for c in train], [tokenizer(c) for c in heldout], seed, steps)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(work)
    (work / TOKENS_FILE).write_text(json.dumps(token_ids))
    (work / MEDIANS_FILE).write_text(json.dumps(medians))
    (work / "cells.json").write_text(json.dumps({
        "key": KEY, "train": [cell_key(e) for e in splits.train], "heldout": [cell_key(e) for e in splits.val],
        "split_fingerprints": splits.fingerprints()}))
    report = {
        "name": "tiny-cell", "seed": seed, "steps": steps, "source": f"{TASK} train cells (default split)",
        "train_cells": len(train), "heldout_cells": len(heldout), "genes": len(genes), **losses,
        "build_seconds": round(time.perf_counter() - started, 1),
        "build_cpu_seconds": round(time.process_time() - cpu_started, 1),
        "architecture": ARCHITECTURE, "training": TRAINING,
    }
    publish_build(work, target, report)
    print(f"built encoder tiny-cell: held-out (val cells) MLM loss {losses['untrained_heldout_mlm_loss']:.3f} -> "
          f"{losses['heldout_mlm_loss']:.3f} (gene frequencies alone: {losses['gene_frequency_loss']:.3f}) "
          f"in {report['build_seconds']} s ({report['build_cpu_seconds']} s of CPU)")
    return report


def word_level_tokenizer(token_ids: dict[str, int]):
    """A transformers tokenizer over the gene vocabulary, so the library's MLM collator masks and pads."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(token_ids, unk_token="<pad>")),
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<cls>", eos_token="<eos>")


def pretrain(token_ids: dict[str, int], train: list[list[int]], heldout: list[list[int]], seed: int, steps: int):
    """A seeded BERT trained by masked-gene modelling (15% of gene tokens, 80/10/10 mask/random/keep);
    returns it with its held-out loss before and after training, on the same masks."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, get_scheduler

    tokenizer = word_level_tokenizer(token_ids)
    p = TRAINING["mlm_probability"]
    heldout_batch = DataCollatorForLanguageModeling(tokenizer, mlm_probability=p, seed=seed + 1)(
        [{"input_ids": ids} for ids in heldout])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(token_ids), pad_token_id=token_ids["<pad>"],
                            max_position_embeddings=TRAINING["max_length"], type_vocab_size=1,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **ARCHITECTURE)
        model = BertForMaskedLM(config)
        untrained = heldout_loss(model, heldout_batch)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=p, seed=seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=TRAINING["lr"], weight_decay=0.01)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=TRAINING["warmup"], num_training_steps=steps)
        rng = np.random.default_rng(seed)
        model.train()
        for _ in range(steps):
            rows = rng.integers(0, len(train), TRAINING["batch_size"])
            loss = model(**collator([{"input_ids": train[i]} for i in rows])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return model, {"heldout_mlm_loss": heldout_loss(model, heldout_batch), "untrained_heldout_mlm_loss": untrained,
                   "gene_frequency_loss": frequency_loss(train, heldout_batch, len(token_ids))}


def heldout_loss(model, batch) -> float:
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(**batch).loss)
    model.train(was_training)
    return round(loss, 4)


def frequency_loss(train: list[list[int]], heldout_batch, vocab_size: int) -> float:
    """Cross-entropy of predicting each masked gene from training gene frequencies alone (no context)."""
    counts = np.bincount([t for ids in train for t in ids[1:-1]], minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    labels = heldout_batch["labels"].numpy().ravel()
    return round(float(-logp[labels[labels >= 0]].mean()), 4)
