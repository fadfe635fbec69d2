"""Weight interpolation (WiSE-FT, Wortsman et al. 2022) and checkpoint averaging as a stage.

Scores ``(1 - a) * start + a * end`` for each ``a`` of ``alphas`` with the shared evaluator: point ``i`` is
``step`` i, its rows carry ``alpha``. By default ``end`` is the previous stage's final checkpoint and ``start``
is what that stage started from (``start: init``), so ``a = 0`` is the model before the stage and ``a = 1`` the
model after it. With ``average_last: k`` the end is the uniform average of the end stage's last k evaluation
checkpoints. ``selection.json`` names the point best on ``val`` (ties go to the smaller ``a``) and its
``alpha``; ``final/`` is a copy of that point, so both ``<stage>`` and ``<stage>:best`` give it to later stages.

Every point is saved as full weights (adapters merged), like any evaluation checkpoint.
"""

from __future__ import annotations

import json

from biopost import distributed, durable
from biopost.config import ConfigError
from biopost.models.policy import CHECKPOINT_FILE, copy_checkpoint
from biopost.models.weights import average, interpolate, load_weights, merged, weights_of
from biopost.stages.context import StageContext


def run_interpolate(ctx: StageContext):
    stage = ctx.stage
    # ---- setup: both ends as plain weights; the end's policy is the container every point is loaded into
    start_ref = start_reference(ctx)
    start = load_merged(ctx, ctx.resolve(start_ref))
    policy = load_merged(ctx, ctx.init_path)
    if start.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
        raise ValueError(f"stage {ctx.name}: start {start_ref!r} and end {stage.end!r} have different tokenizers")
    start_w = weights_of(start)
    end_w = averaged_end(ctx) if stage.average_last else {k: v.clone() for k, v in weights_of(policy).items()}
    about = {"start": start_ref, "end": stage.end, "average_last": stage.average_last}
    # ---- loop: one evaluation point per alpha (an interrupted stage resumes after its last saved point)
    done = saved_points(ctx)
    ctx.resume_from(done - 1)
    for step, alpha in enumerate(stage.alphas[done:], start=done):
        print(f"stage {ctx.name}: point {step} alpha={alpha}")
        load_weights(policy, interpolate(start_w, end_w, alpha))
        policy.info = {**policy.info, "interpolation": {**about, "alpha": alpha}}
        ctx.evaluate_and_save(policy, step, epoch=None, labels={"alpha": alpha})
    # ---- save: the point selected on val is the stage's final
    return distributed.on_main(lambda: save_selected(ctx, stage.alphas))


def start_reference(ctx: StageContext) -> str:
    """``start: init`` means the checkpoint the end's stage started from (the weights before fine-tuning)."""
    stage = ctx.stage
    if stage.start != "init":
        return stage.start
    end = stage.end.partition(":")[0]
    if end == "previous":
        if ctx.index == 0:
            raise ConfigError(f"stage {ctx.name}: start: init needs a stage before it; set start and end")
        end = ctx.config.stage_name(ctx.index - 1)
    if end == "base":
        raise ConfigError(f"stage {ctx.name}: start: init needs end to name a stage, not base")
    return f"{end}:init"


def averaged_end(ctx: StageContext) -> dict:
    """Uniform average of the last ``average_last`` evaluation checkpoints of the end stage, adapters merged."""
    k = ctx.stage.average_last
    folder = ctx.init_path.parent / "checkpoints"  # init_path is the end stage's final/
    found = sorted(p for p in folder.glob("step-*") if (p / CHECKPOINT_FILE).is_file())
    if len(found) < k:
        raise ValueError(f"stage {ctx.name}: average_last={k} but {folder} holds {len(found)} evaluation checkpoints")
    print(f"stage {ctx.name}: averaging {', '.join(p.name for p in found[-k:])}")
    return average(weights_of(load_merged(ctx, p)) for p in found[-k:])


def load_merged(ctx: StageContext, path):
    """A checkpoint (or the backbone) on the run's device, its adapter merged into the weights."""
    return merged(ctx.load_policy(path))


def saved_points(ctx: StageContext) -> int:
    """How many points an interrupted attempt finished (a checkpoint's marker file is written last)."""
    done = 0
    while (ctx.stage_dir / "checkpoints" / f"step-{done:06d}" / CHECKPOINT_FILE).is_file():
        done += 1
    return done


def save_selected(ctx: StageContext, alphas: list[float]):
    path = ctx.stage_dir / "selection.json"
    if not path.is_file():
        raise ValueError(f"stage {ctx.name}: no val rows to select a point on; give the task a val split")
    selection = json.loads(path.read_text())
    selection["alpha"] = alphas[selection["best_step"]]
    durable.write_json(path, selection)
    final = ctx.stage_dir / "final"
    return copy_checkpoint(path.parent / selection["checkpoint"], final)
