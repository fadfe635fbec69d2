"""One run: config -> task -> splits -> stages in order -> run directory.

Run directory: ``config.yaml`` (resolved), ``env.json``, ``splits.json``, ``metrics.jsonl``,
``predictions/``, and per stage ``stages/<i>-<name>/`` with ``checkpoints/``, ``final/`` and
``selection.json``. Rerunning a finished run is a no-op; finished stages of an interrupted run are kept.
"""

from __future__ import annotations

import json
import platform
import sys
from functools import partial
from pathlib import Path

from transformers import set_seed

from biopost.config import ConfigError, RunConfig, dump_config, load_config
from biopost.data import SplitRule, make_splits
from biopost.forgetting import load_forgetting
from biopost.models.backbones import ensure_think_tokens, resolve_backbone
from biopost.models.device import resolve_device
from biopost.models.fusion import build_fused_base
from biopost.models.policy import load_policy
from biopost.registry import get_task
from biopost.runlog import DONE, RunLog
from biopost.stages.context import StageContext


def stage_runners():
    from biopost.stages.cpt import run_cpt
    from biopost.stages.evaluate import run_eval
    from biopost.stages.interpolate import run_interpolate
    from biopost.stages.rl import run_rl
    from biopost.stages.sft import run_sft

    return {"cpt": run_cpt, "sft": run_sft, "rl": run_rl, "interpolate": run_interpolate, "eval": run_eval}


def split_rule(config: RunConfig, task) -> SplitRule:
    s = config.task.split
    tuple_or = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    return SplitRule(
        ood_field=s.ood_field or task.default_ood_field,
        ood_test_groups=tuple_or(s.ood_test_groups if s.ood_test_groups is not None else task.default_ood_test_groups),
        ood_val_groups=tuple_or(s.ood_val_groups if s.ood_val_groups is not None else task.default_ood_val_groups),
        val_fraction=s.val_fraction,
        id_test_fraction=s.id_test_fraction,
        seed=s.seed,
        allow_overlap=s.allow_overlap,
    )


def load_task_and_splits(config: RunConfig):
    task = get_task(config.task.name, config.task.options, config.task.prompt.model_dump())
    task.fused_modalities = frozenset(config.model.encoders)  # these payloads become prompt placeholders
    examples = task.load()
    if examples:
        task.check_prompt(examples[0])
    try:
        splits = make_splits(examples, split_rule(config, task), task.input_key, task.overlap_remedy)
    except ValueError as err:
        raise ConfigError(f"task.split: {err}") from None
    task.fit(splits.train)
    return task, splits


def task_state(config: RunConfig, task, splits) -> dict:
    """Saved in every checkpoint: what `eval` and `predict` need to rebuild the task and its splits."""
    return {"name": task.name, "version": task.version, "options": config.task.options,
            "config_task": config.task.model_dump(mode="json"), "eval": config.eval.model_dump(mode="json"),
            "split_fingerprints": splits.fingerprints(), "fused_modalities": sorted(task.fused_modalities),
            "labels": getattr(task, "labels", None), "markers": getattr(task, "markers", None)}


def run(config: RunConfig, run_dir: Path, snapshots: dict[int, list[int]] | None = None) -> Path:
    """Run (or resume) ``config`` in ``run_dir``. ``snapshots``: stage index -> steps at which to keep a
    resumable state for runs that share this one's prefix (see biopost.study.plan); it changes no result."""
    run_dir = Path(run_dir)
    check_run_dir(config, run_dir)
    device = resolve_device(config.model.device)
    if (run_dir / DONE).is_file():
        print(f"{run_dir}: run {config.run_id()} already finished; nothing to do")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    (run_dir / "env.json").write_text(json.dumps(environment(), indent=2))

    task, splits = load_task_and_splits(config)
    forgetting = load_forgetting(config, task, splits)
    (run_dir / "splits.json").write_text(json.dumps({
        "sizes": splits.sizes(), "fingerprints": splits.fingerprints(),
        "ood_test_groups": splits.ood_test_groups, "ood_val_groups": splits.ood_val_groups,
    }, indent=2))
    common = {"run_id": config.run_id(), "run": config.name, "task": task.name, "task_version": task.version,
              "split_fingerprints": splits.fingerprints()}
    log = RunLog(run_dir, common)
    state = task_state(config, task, splits)
    base = resolve_backbone(config.model.backbone, run_dir, lambda: task.training_texts(splits.train), config.seed)
    if config.model.think_tokens == "add":
        base = with_think_tokens(base, run_dir, config.model.dtype, config.model.revision)
    if config.model.encoders:
        check_encoder_inputs(config, splits)
        encoders = {**config.model.encoders, **prepare_cell_encoder(config, splits, run_dir)}
        base = build_fused_base(base, run_dir, encoders, config.model.dtype, config.seed)

    finals: dict[str, Path] = {}
    inits: dict[str, Path] = {}
    previous = base
    for index, stage in enumerate(config.stages):
        name = config.stage_name(index)
        stage_dir = run_dir / "stages" / f"{index}-{name}"
        resolve = partial(resolve_init, previous=previous, base=base, finals=dict(finals), inits=dict(inits), name=name)
        init = inits[name] = resolve(stage.init)
        if (stage_dir / DONE).is_file():
            print(f"stage {name}: finished earlier, reusing {stage_dir / 'final'}")
        else:
            print(f"stage {name} ({stage.kind}) from {init}")
            stage_dir.mkdir(parents=True, exist_ok=True)
            ctx = StageContext(config, index, name, task, splits, log, stage_dir, init, dict(state), device=device,
                               resolve=resolve, forgetting=forgetting,
                               snapshot_steps=tuple((snapshots or {}).get(index, ())))
            set_seed(stage.seed)  # adapter init and sampling are reproducible, and identical on resume
            stage_runners()[stage.kind](ctx)
            (stage_dir / DONE).write_text("")
        finals[name] = stage_dir / "final"
        previous = finals[name]
    (run_dir / DONE).write_text("")
    return run_dir


def resolve_init(init: str, previous: Path, base: Path, finals: dict[str, Path], inits: dict[str, Path],
                 name: str) -> Path:
    """'previous', 'base', '<stage>' (its final checkpoint), '<stage>:best' (its val-selected one) or
    '<stage>:init' (the checkpoint it started from)."""
    if init == "previous":
        return previous
    if init == "base":
        return base
    stage, _, which = init.partition(":")
    if stage not in finals:
        raise ConfigError(f"stage {name}: init {init!r} names no earlier stage; earlier: {sorted(finals)} or previous/base")
    if which == "init":
        return inits[stage]
    if which == "best":
        selection = finals[stage].parent / "selection.json"
        if not selection.is_file():
            raise ConfigError(f"stage {name}: init {init!r} needs val evaluations in stage {stage}")
        return Path(json.loads(selection.read_text())["checkpoint"])
    if which:
        raise ConfigError(f"stage {name}: init {init!r}: only ':best' or ':init' may follow a stage name")
    return finals[stage]


def with_think_tokens(base: str, run_dir: Path, dtype: str, revision: str | None = None) -> str:
    """The backbone with <think> tokens added (saved once in the run directory when any were missing)."""
    target = run_dir / "backbone-think"
    if (target / "config.json").is_file():
        return str(target)
    policy = load_policy(base, dtype, revision=revision)
    added = ensure_think_tokens(policy)
    if not added:
        return base
    policy.save(target)
    print(f"added tokens {added} to {base}; embeddings resized to {len(policy.tokenizer)}")
    return str(target)


def check_encoder_inputs(config: RunConfig, splits) -> None:
    """Every configured encoder has payloads to read, and none was pretrained on a held-out one."""
    from biopost.models.tiny_encoders import check_encoder_leakage

    for modality, encoder in config.model.encoders.items():
        if not any(getattr(e, modality) is not None for e in splits.train):
            raise ConfigError(f"model.encoders.{modality}: task {config.task.name} has no {modality} payloads; "
                              f"remove the encoder or choose a task with {modality} inputs")
        check_encoder_leakage(encoder.name, modality, splits)


def prepare_cell_encoder(config: RunConfig, splits, run_dir: Path) -> dict:
    """A cell encoder's config, with the training cells' gene medians (saved in the run directory) when neither
    the config nor the encoder supplies a median dictionary; reports (prints and writes ``encoders.json``) how
    many of the cells' genes the encoder cannot read."""
    from biopost.data.splits import SPLIT_NAMES
    from biopost.models.cell_encoder import gene_medians, gene_tokenizer_for, has_medians
    from biopost.models.encoders import ENCODER_BUILDERS
    from biopost.models.tiny_encoders import TINY_ENCODERS, tiny_encoder_path

    cfg = config.model.encoders.get("cell")
    if cfg is None or cfg.name.partition(":")[0] in ENCODER_BUILDERS:
        return {}
    source = tiny_encoder_path(cfg.name) if cfg.name in TINY_ENCODERS else cfg.name
    medians = "encoder"
    if not has_medians(cfg, source):
        path = run_dir / "gene_medians.json"
        path.write_text(json.dumps(gene_medians(e.cell for e in splits.train)))
        cfg, medians = cfg.model_copy(update={"gene_medians": str(path.resolve())}), "training cells"
    elif cfg.gene_medians:
        medians = cfg.gene_medians
    tokenizer = gene_tokenizer_for(cfg, source)
    cells = [e.cell for name in SPLIT_NAMES for e in splits[name] if e.cell is not None]
    unmatched = tokenizer.unmatched(cells)
    expressed = len({g for c in cells for g, v in zip(c["genes"], c["values"]) if v > 0})
    print(f"cell encoder {cfg.name}: {len(unmatched)} of {expressed} expressed genes have no token or median and are "
          f"dropped{' (e.g. ' + ', '.join(unmatched[:5]) + ')' if unmatched else ''}")
    (run_dir / "encoders.json").write_text(json.dumps({"cell": {
        "encoder": cfg.name, "expressed_genes": expressed, "unmatched_genes": len(unmatched),
        "unmatched": unmatched, "medians": medians, "max_length": cfg.max_length}}, indent=2))
    return {"cell": cfg}


def check_run_dir(config: RunConfig, run_dir: Path) -> None:
    saved = run_dir / "config.yaml"
    if saved.is_file():
        other = load_config(saved)
        if other.run_id() != config.run_id():
            raise ConfigError(
                f"{run_dir} holds another run ({other.run_id()}, this config is {config.run_id()}); "
                "choose another --output-dir"
            )


def environment() -> dict:
    import torch
    import transformers

    import biopost

    return {"python": sys.version.split()[0], "platform": platform.platform(), "biopost": biopost.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available(), "argv": sys.argv}
