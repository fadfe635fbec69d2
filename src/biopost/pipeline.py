"""One run: config -> task -> splits -> stages in order -> run directory.

Run directory: ``config.yaml`` (resolved), ``env.json``, ``splits.json``, ``metrics.jsonl``,
``predictions/``, and per stage ``stages/<i>-<name>/`` with ``checkpoints/``, ``final/`` and
``selection.json``. Rerunning a finished run is a no-op; finished stages of an interrupted run are kept, and
resuming it is refused when its splits (ids or content) differ from those in ``splits.json``.

Everything checkable before training is checked before the directory is claimed (``config.yaml`` written),
under a lock that keeps a second runner out. A directory whose earlier run stopped before finishing any stage
takes a corrected config: that attempt's files move to ``attempts/`` and a line is added to
``attempts/attempts.jsonl``. One holding finished stages of another config is refused.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

from transformers import set_seed

from biopost import distributed, durable
from biopost.config import ConfigError, ModelConfig, RunConfig, dump_config, load_config
from biopost.data import SplitRule
from biopost.data.splits import check_leakage, cut_splits
from biopost.forgetting import load_forgetting
from biopost.models.backbones import ensure_think_tokens, resolve_backbone
from biopost.models.device import resolve_device, resolve_dtype
from biopost.models.generation import check_backends
from biopost.models.memory import check_quantization
from biopost.models.fusion import build_fused_base
from biopost.models.policy import load_policy
from biopost.locks import HOLDER_FILE, LOCK_FILE, DirectoryLock, check_directory
from biopost.mixture import load_mixed_tasks
from biopost.preflight import check_run
from biopost.registry import get_task, plugin_errors
from biopost.resources import explained
from biopost.runlog import DONE, RunLog
from biopost.stages.context import StageContext
from biopost.trackers import Identity, check_installed, open_trackers


def stage_runners():
    from biopost.stages.baseline import run_baseline_stage
    from biopost.stages.cpt import run_cpt
    from biopost.stages.evaluate import run_eval
    from biopost.stages.interpolate import run_interpolate
    from biopost.stages.rl import run_rl
    from biopost.stages.sft import run_sft

    return {"cpt": run_cpt, "sft": run_sft, "rl": run_rl, "interpolate": run_interpolate, "eval": run_eval,
            "baseline": run_baseline_stage}


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
        group_field=task.split_group_field,
    )


def load_task_and_splits(config: RunConfig, fused_modalities: frozenset[str] | None = None):
    """The task, fitted on train, and its checked splits. ``fused_modalities``: the payloads read through an
    encoder (default: the config's ``model.encoders``); they become prompt placeholders, which the leakage check
    compares as trained."""
    task = get_task(config.task.name, config.task.options, config.task.prompt.model_dump())
    task.fused_modalities = frozenset(config.model.encoders) if fused_modalities is None else fused_modalities
    with plugin_errors(task.name, "load its data"):
        examples = task.load()
    rule = split_rule(config, task)
    try:
        splits = cut_splits(examples, rule)
    except ValueError as err:
        raise ConfigError(f"task.split: {err}") from None
    # Prompts are checked, and compared across splits, as trained: after fit (e.g. a label set the prompt shows).
    task.fit(splits.train)
    task.check_prompts(examples)
    if not rule.allow_overlap:
        try:
            check_leakage(splits, task.input_key, task.overlap_remedy, rule.group_field)
        except ValueError as err:
            raise ConfigError(f"task.split: {err}") from None
    return task, splits


def task_state(config: RunConfig, task, splits) -> dict:
    """Saved in every checkpoint: what `eval` and `predict` need to rebuild the task and its splits."""
    options = task.recorded_options(config.task.options)
    return {"name": task.name, "version": task.version, "options": options,
            "config_task": {**config.task.model_dump(mode="json"), "options": options}, "eval": config.eval.model_dump(mode="json"),
            "split_fingerprints": splits.fingerprints(), "fused_modalities": sorted(task.fused_modalities),
            "labels": getattr(task, "labels", None), "markers": getattr(task, "markers", None)}


def run(config: RunConfig, run_dir: Path, snapshots: dict[int, list[int]] | None = None,
        group: str | None = None) -> Path:
    """Run (or resume) ``config`` in ``run_dir``. ``snapshots``: stage index -> steps at which to keep a
    resumable state for runs that share this one's prefix (see biopost.study.plan); it changes no result.
    ``group``: the study this run belongs to, for experiment trackers (the run is then named by its id)."""
    run_dir = Path(run_dir)
    device = resolve_device(config.model.device)
    distributed.init(device)
    check_run_dir(config, run_dir)  # under a launcher every process runs this; only the main one writes files
    check_installed(config.report_to)
    check_quantization(config.model.quantization, device)
    check_backends(config)
    if (run_dir / DONE).is_file():
        if distributed.is_main():
            print(f"{run_dir}: run {config.run_id()} already finished; nothing to do")
        return run_dir
    # ---- validate: all that can fail before training fails here, before the directory is claimed
    task, splits = load_task_and_splits(config)
    if config.model.encoders:
        check_encoder_inputs(config, splits)
    mixed = load_mixed_tasks(config)
    forgetting = load_forgetting(config, task, splits, mixed)
    check_run(config, task, splits, forgetting.tasks if forgetting else ())  # corpora vs every scored task
    distributed.barrier()  # every process has read the directory before the main one claims it
    with distributed.main_lock(DirectoryLock(run_dir, "run")), explained(config, run_dir):
        with distributed.main_writes() as main:
            if main:
                claim_run_dir(config, run_dir)
        return run_stages(config, run_dir, task, splits, forgetting, device, snapshots, group, mixed)


def run_stages(config: RunConfig, run_dir: Path, task, splits, forgetting, device, snapshots, group,
               mixed: dict | None = None) -> Path:
    with distributed.main_writes() as main:
        if main:
            durable.remove_partial(run_dir)
            check_same_splits(splits, run_dir)
            durable.write_json(run_dir / "splits.json", {
                "sizes": splits.sizes(), "fingerprints": splits.fingerprints(),
                "content_fingerprints": splits.content_fingerprints(),
                "ood_test_groups": splits.ood_test_groups, "ood_val_groups": splits.ood_val_groups,
            })
    common = {"run_id": config.run_id(), "run": config.name, "task": task.name, "task_version": task.version,
              "split_fingerprints": splits.fingerprints()}
    main = distributed.is_main()
    trackers = open_trackers(config.report_to, run_dir, tracker_identity(config, task.name, group)) if main else []
    with RunLog(run_dir, common, trackers, writer=main) as log:
        return stages_in_order(config, run_dir, task, splits, forgetting, device, snapshots, log, mixed or {})


def stages_in_order(config: RunConfig, run_dir: Path, task, splits, forgetting, device, snapshots, log,
                    mixed: dict) -> Path:
    state = task_state(config, task, splits)
    # a tiny tokenizer learns the run's task alone: runs with and without a mixture start from the same backbone
    base = distributed.on_main(lambda: prepare_base(config, run_dir, task, splits))  # may write into run_dir
    say = print if distributed.is_main() else lambda *_: None  # one line per stage, not one per process
    finals: dict[str, Path] = {}
    inits: dict[str, Path] = {}
    previous = base
    for index, stage in enumerate(config.stages):
        name = config.stage_name(index)
        stage_dir = run_dir / "stages" / f"{index}-{name}"
        resolve = partial(resolve_init, previous=previous, base=base, finals=dict(finals), inits=dict(inits), name=name)
        init = inits[name] = resolve(stage.init)
        if (stage_dir / DONE).is_file():
            check_intact(stage_dir / "final", stage_dir)
            say(f"stage {name}: finished earlier, reusing {stage_dir / 'final'}")
        else:
            say(f"stage {name} ({stage.kind}) from {init}")
            stage_dir.mkdir(parents=True, exist_ok=True)
            ctx = StageContext(config, index, name, task, splits, log, stage_dir, init, dict(state), device=device,
                               resolve=resolve, forgetting=forgetting, mixed=mixed,
                               snapshot_steps=tuple((snapshots or {}).get(index, ())))
            set_seed(stage.seed)  # adapter init and sampling are reproducible, and identical on resume
            with explained(config, run_dir, index):
                stage_runners()[stage.kind](ctx)
            with distributed.main_writes() as main:  # the next stage starts from what the main process saved
                if main:
                    durable.write_text(stage_dir / DONE, "")
        log.settle(name)  # a finished stage is never redone: all its rows stay
        finals[name] = stage_dir / "final"
        previous = finals[name]
    if distributed.is_main():
        durable.write_text(run_dir / DONE, "")
    return run_dir


def prepare_base(config: RunConfig, run_dir: Path, task, splits) -> str:
    """The backbone the first stage starts from: built or resolved, with think tokens and encoders as configured."""
    base = resolve_backbone(config.model.backbone, run_dir, lambda: task.training_texts(splits.train), config.seed)
    if config.model.think_tokens == "add":
        base = with_think_tokens(base, run_dir, config.model)
    if config.model.encoders:
        (run_dir / "stages").mkdir(exist_ok=True)  # marks the run directory: the fused base records paths in it relative
        cell = prepare_cell_encoder(config, splits, run_dir)  # the training cells' medians when none are given
        model = config.model.model_copy(update={"encoders": {**config.model.encoders, **cell}})
        base = build_fused_base(base, run_dir, model, config.seed)
    return base


def tracker_identity(config: RunConfig, task: str, group: str | None = None) -> Identity:
    """A lone run is named by its config's name; a study's run by its id, grouped under the study."""
    return Identity(name=config.run_id() if group else config.name, run_id=config.run_id(), task=task, group=group,
                    config=config.model_dump(mode="json", exclude={"report_to"}))


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
        chosen = selection.parent / json.loads(selection.read_text())["checkpoint"]
        check_intact(chosen, finals[stage].parent)
        return chosen
    if which:
        raise ConfigError(f"stage {name}: init {init!r}: only ':best' or ':init' may follow a stage name")
    return finals[stage]


def check_intact(checkpoint: Path, stage_dir: Path) -> None:
    """A finished stage's checkpoint still matches its checksum manifest (checkpoints written before
    manifests existed carry none and are taken as they are)."""
    if (checkpoint / durable.MANIFEST).is_file() and (problem := durable.check_manifest(checkpoint)):
        raise ConfigError(f"{checkpoint}: {problem}; the checkpoint was damaged after it was saved: "
                          f"delete {stage_dir} to train that stage again")


def with_think_tokens(base: str, run_dir: Path, model: ModelConfig) -> str:
    """The backbone with <think> tokens added (saved once in the run directory when any were missing)."""
    target = run_dir / "backbone-think"
    if (target / "config.json").is_file():
        return str(target)
    dtype = resolve_dtype(model.dtype, resolve_device(model.device))
    policy = load_policy(base, dtype, revision=model.revision, trust_remote_code=model.trust_remote_code)
    added = ensure_think_tokens(policy)
    if not added:
        return base
    policy.save(target)
    rows = policy.model.get_input_embeddings().weight.shape[0]
    print(f"added tokens {added} to {base} (embedding rows: {rows}, initialised from the tags' text pieces)")
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
    from biopost.models.cell_encoder import MAX_UNMATCHED, gene_medians, gene_tokenizer_for, has_medians
    from biopost.models.encoders import cell_encoder_source

    cfg = config.model.encoders.get("cell")
    source = None if cfg is None else cell_encoder_source(cfg)
    if source is None:
        return {}
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
    if len(unmatched) > MAX_UNMATCHED * expressed:  # the cells would reach the encoder nearly empty
        raise ConfigError(f"model.encoders.cell: {cfg.name} reads only {expressed - len(unmatched)} of the task's "
                          f"{expressed} expressed genes (e.g. not {', '.join(unmatched[:3])}); if its dictionaries "
                          "use Ensembl ids and the data gene symbols, set model.encoders.cell.gene_symbols")
    return {"cell": cfg}


def check_run_dir(config: RunConfig, run_dir: Path) -> RunConfig | None:
    """The config of another run that ``run_dir`` holds and that may be replaced (none of its stages
    finished), or None when the directory is free or holds this run; refuse one with finished stages."""
    check_directory(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    other = load_config(saved)
    if other.run_id() == config.run_id():
        return None
    finished = sorted(p.parent.name for p in run_dir.glob("stages/*/DONE"))
    if finished or (run_dir / DONE).is_file():
        raise ConfigError(
            f"{run_dir} holds another run ({other.run_id()}, this config is {config.run_id()}) with finished stages "
            f"({', '.join(finished) or 'all'}); choose another --output-dir"
        )
    return other


def claim_run_dir(config: RunConfig, run_dir: Path) -> None:
    """Write this run's ``config.yaml`` and ``env.json``, setting aside an unfinished attempt of another config."""
    other = check_run_dir(config, run_dir)  # again: the directory may have changed before we held the lock
    if other is not None:
        set_aside_attempt(run_dir, other, config.run_id())
    dtype = resolve_dtype(config.model.dtype, resolve_device(config.model.device))
    check_resolved_dtype(run_dir, config, dtype)
    dump_config(config, run_dir / "config.yaml")
    durable.write_json(run_dir / "env.json", {**environment(), "dtype": dtype})


def check_resolved_dtype(run_dir: Path, config: RunConfig, dtype: str) -> None:
    """Refuse to resume a run on weights of another dtype than its first attempt's (``model.dtype: auto``
    resolves per machine: bfloat16 on a GPU that has it, float32 elsewhere)."""
    env = run_dir / "env.json"
    if not env.is_file():
        return
    recorded = json.loads(env.read_text()).get("dtype")
    if recorded is not None and recorded != dtype:
        raise ConfigError(f"{run_dir} was run with {recorded} weights (model.dtype: {config.model.dtype}), but here "
                          f"they resolve to {dtype}; set model.dtype: {recorded} to resume it on this machine")


def set_aside_attempt(run_dir: Path, other: RunConfig, replaced_by: str) -> Path:
    """Move an unfinished run of another config to ``attempts/<n>-<run id>/`` and log it in
    ``attempts/attempts.jsonl``: kept for inspection, it no longer blocks the directory."""
    attempts = run_dir / "attempts"
    attempts.mkdir(exist_ok=True)
    target = attempts / f"{len(list(attempts.glob('*-*/'))) + 1}-{other.run_id()}"
    target.mkdir()
    moved = []
    for entry in sorted(run_dir.iterdir()):
        if entry.name not in {"attempts", LOCK_FILE, HOLDER_FILE}:
            entry.rename(target / entry.name)
            moved.append(entry.name)
    durable.append_lines(attempts / "attempts.jsonl", [json.dumps({
        "run_id": other.run_id(), "name": other.name, "set_aside": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "to": target.name, "files": moved, "replaced_by": replaced_by})])
    print(f"{run_dir}: an unfinished run of another config ({other.run_id()}) was moved to {target}")
    return target


def check_same_splits(splits, run_dir: Path) -> None:
    """Resuming needs the data the run started on: the same config over an edited table, h5ad or FASTA file
    would otherwise reuse stages trained on the old data next to evaluations on the new."""
    recorded = run_dir / "splits.json"
    if not recorded.is_file():
        return
    saved = json.loads(recorded.read_text())
    now = {"fingerprints": splits.fingerprints(), "content_fingerprints": splits.content_fingerprints()}
    for kind, what in (("fingerprints", "example ids"), ("content_fingerprints", "examples")):
        changed = [name for name, value in saved.get(kind, {}).items() if now[kind].get(name) != value]
        if changed:
            raise ConfigError(f"{run_dir}: the {changed[0]} split's {what} differ from those this run started on "
                              "(splits.json): the task's data changed; rerun into a new --output-dir")


def environment() -> dict:
    import torch
    import transformers

    import biopost

    return {"python": sys.version.split()[0], "platform": platform.platform(), "biopost": biopost.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available(), "argv": sys.argv, "threads": threads_in_use(),
            **distributed.describe()}


def threads_in_use() -> dict[str, int]:
    """torch's threads and each native pool's (a seed's numbers and a run's speed depend on them)."""
    import torch
    from threadpoolctl import threadpool_info

    pools = {f"{p['internal_api']}:{Path(p['filepath']).name}": p["num_threads"] for p in threadpool_info()}
    return {"torch": torch.get_num_threads(), **pools}
