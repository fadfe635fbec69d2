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
from pathlib import Path

from biopost.models.cell_encoder import MEDIANS_FILE, SPECIAL, TOKENS_FILE, GeneTokenizer, gene_medians
from biopost.models.tiny_encoders import build_dir, build_times, pretrain_mlm, publish_build, start_clock

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
    clock = start_clock()
    steps = steps or TRAINING["steps"]
    work = build_dir(target)
    train, heldout, splits = pretraining_cells()
    genes = sorted({g for c in train for g in c["genes"]})
    token_ids = {t: i for i, t in enumerate([*SPECIAL, *genes])}
    medians = gene_medians(train)
    tokenizer = GeneTokenizer(token_ids, medians, TRAINING["max_length"])
    model, losses = pretrain(token_ids, [tokenizer(c) for c in train], [tokenizer(c) for c in heldout], seed, steps)
    model.save_pretrained(work)
    (work / TOKENS_FILE).write_text(json.dumps(token_ids))
    (work / MEDIANS_FILE).write_text(json.dumps(medians))
    (work / "cells.json").write_text(json.dumps({
        "key": KEY, "train": [cell_key(e) for e in splits.train], "heldout": [cell_key(e) for e in splits.val],
        "split_fingerprints": splits.fingerprints()}))
    report = {
        "name": "tiny-cell", "seed": seed, "steps": steps, "source": f"{TASK} train cells (default split)",
        "train_cells": len(train), "heldout_cells": len(heldout), "genes": len(genes), **losses, **build_times(clock),
        "architecture": ARCHITECTURE, "training": TRAINING,
    }
    publish_build(work, target, report, heldout="held-out (val cells)")
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
    from transformers import BertConfig, BertForMaskedLM

    def bert():
        return BertForMaskedLM(BertConfig(
            vocab_size=len(token_ids), pad_token_id=token_ids["<pad>"], max_position_embeddings=TRAINING["max_length"],
            type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **ARCHITECTURE))

    return pretrain_mlm(bert, word_level_tokenizer(token_ids), train, heldout, seed, steps, TRAINING, unit="gene")
