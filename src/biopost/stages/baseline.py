"""The ``baseline`` stage: no model. A classical classifier on task features (:mod:`biopost.baselines`),
fitted on train and chosen on val, scored on the run's evaluation splits, so a study's baseline arm is an
ordinary run and its accuracies are rows of the results table like any stage's."""

from __future__ import annotations

from biopost import distributed, durable
from biopost.baselines import fit_baseline
from biopost.stages.context import StageContext


def run_baseline_stage(ctx: StageContext) -> None:
    rows, predictions, info = fit_baseline(ctx.config, ctx.task, ctx.splits, ctx.stage.features)
    ctx.log.drop_rows(ctx.name)  # an interrupted attempt's rows
    ctx.log.write([{"stage": ctx.name, "stage_index": ctx.index, **row} for row in rows])
    for split, records in predictions.items():
        ctx.log.write_predictions(f"{ctx.name}-{split}", records)
    if distributed.is_main():
        durable.write_json(ctx.stage_dir / "baseline.json", info)
