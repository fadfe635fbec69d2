"""Shared fixtures: the embedded PBMC task loaded once, a tiny backbone built once, one short SFT run."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from biopost.config import validate_config
from biopost.models.tiny import build_tiny_backbone
from biopost.pipeline import load_task_and_splits, run
from biopost.tasks.base import LabelTask

PBMC = "cell_type/pbmc68k"


class Interrupt(Exception):
    """A run stopped as a kill would stop it (raised by :func:`interrupt_at`)."""


def interrupt_at(monkeypatch, step: int, stage: str | None = None):
    """Make the stage named ``stage`` (any stage when None) raise :class:`Interrupt` as it evaluates and saves
    at ``step``; returns the function that puts the real method back, for the resumed run."""
    from biopost.stages.context import StageContext

    original = StageContext.evaluate_and_save

    def crash(self, policy, at, *args, **kwargs):
        if at == step and stage in (None, self.name):
            raise Interrupt
        return original(self, policy, at, *args, **kwargs)

    monkeypatch.setattr(StageContext, "evaluate_and_save", crash)
    return lambda: monkeypatch.setattr(StageContext, "evaluate_and_save", original)


COLOURS = ["red", "green", "blue", "yellow"]


class ColourLabels(LabelTask):
    """A toy task over four colour words, learnable by a tiny model; a subclass says how its prompt shows the colour."""

    domain = "toy"
    default_ood_field = "colour"
    default_ood_test_groups = []

    def __init__(self):
        super().__init__()
        self.labels = list(COLOURS)


def fast_config_dict(backbone: str | Path = "tiny-s") -> dict:
    """A run config that trains for a few steps and evaluates 8 examples per split with short generations."""
    return copy.deepcopy({
        "name": "fast",
        "task": {"name": PBMC, "options": {"top_k_genes": 16}},
        "model": {"backbone": str(backbone), "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0}},
        "eval": {"splits": ["val", "id_test", "ood_test"], "max_examples": 8, "batch_size": 8,
                 "max_new_tokens": 16, "bootstrap": 20},
        "stages": [{"kind": "sft", "max_steps": 6, "eval_every_steps": 3, "batch_size": 8, "lr": 1e-2,
                    "schedule": {"name": "constant", "warmup_ratio": 0.0}}],
    })


def digest_dir(path: Path) -> str:
    """Hash of every file in a directory (names and bytes), to prove it was not modified."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()


def same_cells_h5ad_options(directory: Path) -> dict:
    """cell_type/h5ad options over the PBMC cells themselves: the same cells as cell_type/pbmc68k under another task."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    full = adata.raw.to_adata()
    full.obs = adata.obs.copy()
    full.write_h5ad(directory / "same-cells.h5ad")
    return {"path": str(directory / "same-cells.h5ad"), "label_key": "bulk_labels", "group_key": "phase",
            "top_k_genes": 16}


def assert_prompt_shows_placeholder(task, example, modality: str) -> None:
    """With ``modality`` read through an encoder, the prompt holds its placeholder instead of the sequence."""
    from biopost.data.example import PLACEHOLDERS

    sequence = getattr(example, modality)
    task.fused_modalities = frozenset({modality})
    try:
        prompt = task.user_prompt(example)
        assert PLACEHOLDERS[modality] in prompt and sequence not in prompt
    finally:
        task.fused_modalities = frozenset()


@pytest.fixture(scope="session")
def pbmc():
    """The embedded task with its default split: (task, splits)."""
    config = validate_config({"task": {"name": PBMC}, "stages": [{"kind": "sft"}]})
    return load_task_and_splits(config)


@pytest.fixture(scope="session")
def pbmc_task(pbmc):
    return pbmc[0]


@pytest.fixture(scope="session")
def pbmc_splits(pbmc):
    return pbmc[1]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory, pbmc) -> Path:
    task, splits = pbmc
    return build_tiny_backbone("tiny-s", task.training_texts(splits.train), tmp_path_factory.mktemp("backbone") / "tiny-s")


@pytest.fixture(scope="session")
def fast_config(tiny_backbone):
    """``fast_config()`` -> a fresh config dict on the shared tiny backbone, safe to modify."""
    return lambda: fast_config_dict(tiny_backbone)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, tiny_backbone, fast_config):
    """One short LoRA SFT run shared by the SFT and CLI tests."""
    base_digest = digest_dir(tiny_backbone)
    config = validate_config(fast_config())
    run_dir = run(config, tmp_path_factory.mktemp("runs") / "sft")
    return SimpleNamespace(config=config, dir=run_dir, final=run_dir / "stages" / "0-sft" / "final",
                           backbone=tiny_backbone, backbone_digest_before=base_digest,
                           backbone_digest=lambda: digest_dir(tiny_backbone))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are overhead-bound: one intra-op thread is as fast, and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
