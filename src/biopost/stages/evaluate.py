"""The ``eval`` stage: no training. Scores its init checkpoint with the shared evaluator at step 0 and
passes the model on unchanged, so a study's 'base only' arm is an ordinary run."""

from __future__ import annotations

from biopost.stages.context import StageContext


def run_eval(ctx: StageContext):
    policy = ctx.load_policy(ctx.init_path)
    ctx.resume_from(-1)
    ctx.evaluate_and_save(policy, 0, epoch=0.0)
    return ctx.save_final(policy)
