"""Classical baselines: a scikit-learn classifier on task features, the reference line for every accuracy.

``biopost baseline CONFIG --output-dir DIR`` loads the config's task and splits exactly as training does,
turns examples into features with a *featurizer* fitted on ``train`` only, fits a logistic regression for
each regularisation strength in ``C_GRID``, keeps the one with the best ``val`` accuracy (ties: the
stronger regularisation) and writes ``stage: baseline`` rows for the config's evaluation splits to
``DIR/metrics.jsonl`` in the evaluator's row format (same example subsets, fingerprints, bootstrap
intervals), plus ``DIR/baseline.json`` (grid, val scores, choice) and per-example predictions. Rerunning
replaces earlier baseline rows.

Featurizers (``FEATURIZERS``; ``auto`` picks by the payloads the training examples carry):

- ``kmer``: for each sequence payload, frequencies of all 1..k-mers (DNA: both strands, k <= 4;
  protein: k <= 2). A tuple payload (reference and variant windows) adds, per further sequence, its
  k-mer count difference from the first, which is where a single-base variant shows.
- ``expression``: a cell's expression values by gene (vocabulary from training cells).
- ``encoder``: the frozen encoder the config fuses (``model.encoders.<modality>``, loaded as training loads it,
  through the same feature cache), its features mean-pooled over each item's real positions (every token the
  encoder attends to, ``<cls>`` / ``<eos>`` included, padding never). A tuple payload adds, per further item, its
  pooled difference from the first. Only asked for by name (``--features encoder`` or ``kmer+encoder``): ``auto``
  stays on the encoder-free features, the reference for fused and text arms alike.

Extension point: a featurizer is any object with ``fit(train) -> self`` and ``transform(examples) ->
matrix``, built by ``factory(config, task, modalities)`` and registered with :func:`register_featurizer`;
``--features NAME`` (alone or joined with ``+``) then uses it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

from biopost import durable
from biopost.config import ConfigError, RunConfig
from biopost.data import Example
from biopost.data.splits import fingerprint
from biopost.evaluation import bootstrap_ci, subset
from biopost.locks import DirectoryLock
from biopost.runlog import RunLog
from biopost.trackers import check_installed, open_trackers

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
STAGE = "baseline"
ALPHABETS = {"dna": "ACGT", "protein": "ACDEFGHIKLMNPQRSTVWY"}
KMAX = {"dna": 4, "protein": 2}
FEATURIZERS: dict[str, Callable] = {}


def register_featurizer(name: str):
    """Register ``factory(config, task, modalities) -> featurizer`` under ``name`` (used by ``--features``);
    ``modalities`` are the payloads the training examples carry."""
    def wrap(factory):
        if name in FEATURIZERS:
            raise ValueError(f"featurizer {name!r} registered twice")
        FEATURIZERS[name] = factory
        return factory
    return wrap


# ---------------------------------------------------------------- featurizers
def kmer_counts(seq: str, k: int, alphabet: str) -> np.ndarray:
    """Counts of every k-mer over ``alphabet`` (in lexicographic order); windows with other letters are skipped.

    >>> kmer_counts("ACGTN", 2, "ACGT").reshape(4, 4)[[0, 1, 2], [1, 2, 3]].tolist()  # AC, CG, GT
    [1.0, 1.0, 1.0]
    >>> int(kmer_counts("ACNGT", 2, "ACGT").sum())
    2
    """
    size = len(alphabet)
    lookup = np.full(256, -1, dtype=np.int64)
    lookup[np.frombuffer(alphabet.encode(), dtype=np.uint8)] = np.arange(size)
    codes = lookup[np.frombuffer(seq.upper().encode(), dtype=np.uint8)]
    if len(codes) < k:
        return np.zeros(size**k, dtype=np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(codes, k)
    windows = windows[(windows >= 0).all(axis=1)]
    index = windows @ (size ** np.arange(k - 1, -1, -1))
    return np.bincount(index, minlength=size**k).astype(np.float64)


def kmer_profile(seq: str, modality: str) -> np.ndarray:
    """Counts of 1..k-mers concatenated; DNA counts both strands (a site reads the same on either).

    >>> kmer_profile("AAC", "dna")[:4].tolist()  # A, C, G, T over AAC and its reverse complement GTT
    [2.0, 1.0, 1.0, 2.0]
    """
    from biopost.tasks.genomics.dna import reverse_complement

    strands = [seq, reverse_complement(seq)] if modality == "dna" else [seq]
    alphabet = ALPHABETS[modality]
    return sum(np.concatenate([kmer_counts(s, k, alphabet) for k in range(1, KMAX[modality] + 1)]) for s in strands)


def frequencies(counts: np.ndarray, alphabet_size: int, kmax: int) -> np.ndarray:
    """Each k-block of a profile divided by its total, so sequences of any length compare."""
    out, start = counts.copy(), 0
    for k in range(1, kmax + 1):
        block = out[start : start + alphabet_size**k]
        total = block.sum()
        if total:
            block /= total
        start += alphabet_size**k
    return out


class KmerFeatures:
    """k-mer frequencies of each sequence payload; further sequences of a tuple add count differences."""

    def __init__(self, modalities: tuple[str, ...]):
        self.modalities = modalities

    def fit(self, train: list[Example]) -> "KmerFeatures":
        return self

    def transform(self, examples: list[Example]) -> np.ndarray:
        return np.vstack([np.concatenate([self.one(getattr(e, m), m) for m in self.modalities]) for e in examples])

    def one(self, payload, modality: str) -> np.ndarray:
        seqs = (payload,) if isinstance(payload, str) else tuple(payload)
        profiles = [kmer_profile(s, modality) for s in seqs]
        first = frequencies(profiles[0], len(ALPHABETS[modality]), KMAX[modality])
        return np.concatenate([first, *(p - profiles[0] for p in profiles[1:])])


class ExpressionFeatures:
    """A cell's expression by gene over the training cells' gene vocabulary (unseen genes dropped)."""

    def fit(self, train: list[Example]) -> "ExpressionFeatures":
        from sklearn.feature_extraction import DictVectorizer

        self.vectorizer = DictVectorizer(sparse=True).fit([self.as_dict(e) for e in train])
        return self

    def transform(self, examples: list[Example]) -> sp.csr_matrix:
        return self.vectorizer.transform([self.as_dict(e) for e in examples])

    @staticmethod
    def as_dict(example: Example) -> dict[str, float]:
        return dict(zip(example.cell["genes"], example.cell["values"]))


@register_featurizer("kmer")
def kmer_featurizer(config: RunConfig, task, modalities: set[str]) -> KmerFeatures:
    chosen = tuple(m for m in ("dna", "protein") if m in modalities)
    if not chosen:
        raise ConfigError(f"baseline: kmer features need dna or protein payloads; task {task.name} has {sorted(modalities)}")
    return KmerFeatures(chosen)


@register_featurizer("expression")
def expression_featurizer(config: RunConfig, task, modalities: set[str]) -> ExpressionFeatures:
    if "cell" not in modalities:
        raise ConfigError(f"baseline: expression features need cell payloads; task {task.name} has {sorted(modalities)}")
    return ExpressionFeatures()


class EncoderFeatures:
    """Each payload item's frozen-encoder features, mean-pooled over its positions; a tuple's further items add
    their pooled difference from the first (as k-mer counts do)."""

    chunk = 256  # items encoded and pooled at a time: a long-context encoder's per-position features stay small

    def __init__(self, configs: dict, device: str, dtype: str):
        self.configs, self.device, self.dtype = configs, device, dtype
        self.encoders: dict = {}

    def fit(self, train: list[Example]) -> "EncoderFeatures":
        import tempfile

        import torch

        from biopost.models.encoders import load_encoder

        with tempfile.TemporaryDirectory() as tmp:  # a cell encoder reads its medians file while it loads
            self.encoders = {m: load_encoder(self.prepared(cfg, m, train, Path(tmp)), m, self.device,
                                             getattr(torch, self.dtype))
                             for m, cfg in self.configs.items()}
        return self

    @staticmethod
    def prepared(cfg, modality: str, train: list[Example], tmp: Path):
        """A cell encoder without a median dictionary takes the training cells' medians, as training does."""
        from biopost.models.cell_encoder import gene_medians, has_medians
        from biopost.models.encoders import cell_encoder_source

        source = cell_encoder_source(cfg) if modality == "cell" else None
        if source is None or has_medians(cfg, source):
            return cfg
        durable.write_json(tmp / "gene_medians.json", gene_medians(e.cell for e in train if e.cell is not None))
        return cfg.model_copy(update={"gene_medians": str(tmp / "gene_medians.json")})

    def transform(self, examples: list[Example]) -> np.ndarray:
        from biopost.models.cell_encoder import check_cells_readable

        if "cell" in self.encoders:  # a cell whose genes the encoder cannot read would pool to noise
            check_cells_readable(self, ((f"baseline: example {e.id}", e.cell) for e in examples))
        return np.hstack([self.block(m, examples) for m in self.encoders])

    def block(self, modality: str, examples: list[Example]) -> np.ndarray:
        encoder = self.encoders[modality]
        items = [encoder.items(getattr(e, modality)) for e in examples]
        counts = {len(row) for row in items}
        if len(counts) > 1:
            raise ValueError(f"baseline: encoder features need the same number of {modality} items in every example; "
                             f"found {sorted(counts)}")
        unique = {encoder.item_key(it): it for row in items for it in row}
        pooled = dict(zip(unique, self.pool(encoder, list(unique.values()))))
        rows = [[pooled[encoder.item_key(it)] for it in row] for row in items]
        return np.vstack([np.concatenate([r[0], *(v - r[0] for v in r[1:])]) for r in rows])

    def pool(self, encoder, items: list) -> list[np.ndarray]:
        """Mean of each item's feature rows: the encoder returns only the positions it attended, never padding."""
        out = []
        for start in range(0, len(items), self.chunk):
            for features in encoder.encode(items[start : start + self.chunk]):
                if not len(features):
                    raise ValueError(f"baseline: the {encoder.modality} encoder gives no positions for an item; "
                                     "check its tokenizer reads the task's payloads")
                out.append(features.float().mean(0).cpu().numpy())
        return out


@register_featurizer("encoder")
def encoder_featurizer(config: RunConfig, task, modalities: set[str]) -> EncoderFeatures:
    if not config.model.encoders:
        raise ConfigError("baseline: encoder features need a frozen encoder in the config: add model.encoders."
                          "<modality> (e.g. model.encoders.dna.name: tiny-dna) or use --features kmer / expression")
    chosen = {m: cfg for m, cfg in config.model.encoders.items() if m in modalities}
    if not chosen:
        raise ConfigError(f"baseline: the config's encoders ({', '.join(sorted(config.model.encoders))}) read none of "
                          f"task {task.name}'s payloads ({', '.join(sorted(modalities)) or 'none'})")
    from biopost.models.device import resolve_device, resolve_dtype

    device = resolve_device(config.model.device)
    return EncoderFeatures(chosen, device, resolve_dtype(config.model.dtype, device))


class Combined:
    """Several featurizers side by side (``--features kmer+encoder``)."""

    def __init__(self, parts: list):
        self.parts = parts

    def fit(self, train):
        self.parts = [p.fit(train) for p in self.parts]
        return self

    def transform(self, examples):
        blocks = [p.transform(examples) for p in self.parts]
        return sp.hstack([sp.csr_matrix(b) for b in blocks]).tocsr() if len(blocks) > 1 else blocks[0]


def build_featurizer(spec: str, config: RunConfig, task, train: list[Example]):
    """``auto`` (by the training examples' payloads), one registered name, or names joined by ``+``."""
    present = {m for e in train for m in e.payloads()}
    if spec == "auto":
        names = (["expression"] if "cell" in present else []) + (["kmer"] if present & {"dna", "protein"} else [])
        if not names:
            raise ConfigError(f"baseline: task {task.name} has no dna, protein or cell payloads to featurize")
    else:
        names = spec.split("+")
    unknown = [n for n in names if n not in FEATURIZERS]
    if unknown:
        raise ConfigError(f"baseline: unknown features {unknown}; registered: auto, {', '.join(sorted(FEATURIZERS))}")
    parts = [FEATURIZERS[n](config, task, present) for n in names]
    return (parts[0] if len(parts) == 1 else Combined(parts)).fit(train), "+".join(names)


# ---------------------------------------------------------------- fit, select on val, report
def fit_and_select(X_train, y_train, X_val, y_val, grid=C_GRID):
    """Logistic regression per C; the best val accuracy wins (ties: smaller C, i.e. stronger regularisation)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MaxAbsScaler
    from threadpoolctl import threadpool_limits

    scores, models = {}, {}
    with threadpool_limits(1):  # small problems: BLAS threads only contend (40x slower on a busy 2-core machine)
        for C in grid:
            model = make_pipeline(MaxAbsScaler(), LogisticRegression(C=C, max_iter=3000))
            model.fit(X_train, y_train)
            models[C], scores[C] = model, float(np.mean(model.predict(X_val) == np.asarray(y_val)))
    best = max(grid, key=lambda C: (scores[C], -C))
    return models[best], best, scores


def fit_baseline(config: RunConfig, task, splits, features: str = "auto") -> tuple[list[dict], dict[str, list[dict]], dict]:
    """Fit on train, select C on val, score the config's evaluation splits: (rows in the evaluator's format
    without stage fields, per-example predictions by split, the record written to ``baseline.json``)."""
    from biopost.tasks.base import LabelTask

    started = time.time()
    if not isinstance(task, LabelTask):
        raise ConfigError(f"baseline: task {task.name} is not a single-label task; a classifier baseline needs one label")
    if "encoder" in features.split("+"):  # as for training: no held-out payload in the encoder's pretraining data
        from biopost.pipeline import check_encoder_inputs

        check_encoder_inputs(config, splits)
    featurizer, features = build_featurizer(features, config, task, list(splits.train))
    transform = lambda examples: featurizer.transform(list(examples))  # noqa: E731
    model, C, val_scores = fit_and_select(transform(splits.train), [e.answer for e in splits.train],
                                          transform(splits.val), [e.answer for e in splits.val])
    cfg, rows, predictions = config.eval, [], {}
    for name in cfg.splits:
        chosen = subset(splits[name], cfg.max_examples, cfg.seed)
        if not chosen:
            continue
        predicted = model.predict(transform(chosen))
        correct = np.array([p == e.answer for p, e in zip(predicted, chosen)], dtype=float)
        lo, hi = bootstrap_ci(correct, cfg.bootstrap, cfg.seed)
        rows.append({"step": 0, "epoch": None, "split": name, "metric": "accuracy", "value": float(correct.mean()),
                     "n": len(chosen), "ci_low": lo, "ci_high": hi, "fingerprint": fingerprint(chosen),
                     "num_samples": 1, "features": features, "classifier": "logistic_regression", "C": C})
        predictions[name] = [{"id": e.id, "answer": e.answer, "prediction": str(p)} for e, p in zip(chosen, predicted)]
    info = {"task": task.name, "features": features, "classifier": "logistic_regression (MaxAbsScaler, lbfgs)",
            "C_grid": list(C_GRID), "val_accuracy_by_C": {str(c): s for c, s in val_scores.items()}, "C": C,
            "sizes": splits.sizes(), "seconds": round(time.time() - started, 2)}
    return rows, predictions, info


def run_baseline(config: RunConfig, output_dir: Path, features: str = "auto") -> list[dict]:
    """``biopost baseline``: load the task, fit, write ``stage: baseline`` rows into ``output_dir`` (replacing
    earlier ones); returns the rows written. In a pipeline the ``baseline`` stage does the same."""
    from biopost.pipeline import load_task_and_splits, tracker_identity

    check_installed(config.report_to)
    output_dir = Path(output_dir)
    with DirectoryLock(output_dir, "run"):  # a run training in output_dir appends to the same metrics.jsonl
        task, splits = load_task_and_splits(config)
        rows, predictions, info = fit_baseline(config, task, splits, features)
        common = {"run_id": config.run_id(), "run": config.name, "task": task.name, "task_version": task.version,
                  "split_fingerprints": splits.fingerprints()}
        trackers = open_trackers(config.report_to, output_dir, tracker_identity(config, task.name))
        with RunLog(output_dir, common, trackers) as log:
            log.drop_rows(STAGE)
            rows = [{**common, "stage": STAGE, "stage_index": -1, **row} for row in rows]
            log.write(rows)
            for name, records in predictions.items():
                log.write_predictions(f"{STAGE}-{name}", records)
        durable.write_json(output_dir / "baseline.json", info)
    return rows
