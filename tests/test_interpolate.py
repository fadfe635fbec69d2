"""The interpolate stage (WiSE-FT and checkpoint averaging) and forgetting rows, on one short full-FT SFT run.

The run: SFT (full fine-tuning, eval at steps 0, 2, 4), then ``interpolate`` between SFT's init and its final
at a = 0, .5, 1, then ``avg`` (the uniform average of SFT's last two evaluation checkpoints). Every evaluation
point also scores a Gene Ontology corpus and another task (``cell_type/h5ad`` on a small file written here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from biopost.config import ConfigError, validate_config
from biopost.models.policy import load_policy
from biopost.models.weights import average, interpolate, merged, weights_of
from biopost.pipeline import load_task_and_splits, resolve_init, run
from biopost.report.run_summary import metric_table
from biopost.runlog import read_metrics

ALPHAS = [0.0, 0.5, 1.0]
H5AD = "cell_type/h5ad"
PBMC = "cell_type/pbmc68k"
LABELS = ("where", "stage", "stage_index", "step", "epoch", "alpha")


def write_h5ad(path):
    """60 synthetic cells: 3 types with their own high genes, 4 donors (the OOD groups)."""
    import anndata

    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, size=(60, 30)).astype(np.float32)
    types = np.repeat(["alpha cell", "beta cell", "delta cell"], 20)
    for k in range(3):
        counts[types == types[k * 20], k * 10 : k * 10 + 5] += 20
    adata = anndata.AnnData(counts)
    adata.var_names = [f"GENE{j}" for j in range(30)]
    adata.obs_names = [f"islet{i}" for i in range(60)]
    adata.obs["cell_type"] = types
    adata.obs["donor"] = [f"d{i % 4}" for i in range(60)]
    adata.write_h5ad(path)
    return path


def interpolate_config(fast_config, h5ad) -> dict:
    raw = fast_config()
    raw["model"]["lora"] = None  # full fine-tuning: the SFT checkpoints are the exact ends
    raw["eval"]["forgetting"] = {
        "corpora": {"go": {"source": "go", "take": 120, "heldout": 12}},
        "tasks": [{"name": H5AD, "options": {"path": str(h5ad), "label_key": "cell_type", "group_key": "donor",
                                              "top_k_genes": 8}, "splits": ["ood_test"]}],
        "seq_length": 64,
    }
    raw["stages"] = [
        {"kind": "sft", "max_steps": 4, "eval_every_steps": 2, "batch_size": 8, "lr": 1e-2,
         "schedule": {"name": "constant", "warmup_ratio": 0.0}},
        {"kind": "interpolate", "alphas": ALPHAS},
        {"kind": "interpolate", "name": "avg", "end": "sft", "average_last": 2, "alphas": [1.0]},
    ]
    return raw


@pytest.fixture(scope="module")
def interp_run(tmp_path_factory, fast_config, one_thread):
    tmp = tmp_path_factory.mktemp("interp")
    config = validate_config(interpolate_config(fast_config, write_h5ad(tmp / "islets.h5ad")))
    return config, run(config, tmp / "run")


def rows_at(run_dir, stage: str, step: int) -> dict:
    """Evaluation rows of one point, keyed by (task, split, metric), without where they were taken."""
    found = {}
    for r in read_metrics(run_dir):
        if r["stage"] == stage and r["step"] == step and r["split"] != "train":
            found[(r["task"], r["split"], r["metric"])] = {k: v for k, v in r.items() if k not in LABELS}
    return found


def stage_dir(run_dir, index: int, name: str):
    return run_dir / "stages" / f"{index}-{name}"


@pytest.mark.parametrize("point, sft_step", [(0, 0), (2, 4)])
def test_alpha_0_and_1_reproduce_the_ends_rows_exactly(interp_run, point, sft_step):
    _, run_dir = interp_run
    ends, ours = rows_at(run_dir, "sft", sft_step), rows_at(run_dir, "interpolate", point)
    assert len(ours) >= 9 and ours == ends  # own splits, general/go, the other task: values, n, intervals
    for split in ("val", "ood_test"):
        a = (run_dir / "predictions" / f"interpolate-step{point:06d}-{split}.jsonl").read_text()
        assert a == (run_dir / "predictions" / f"sft-step{sft_step:06d}-{split}.jsonl").read_text()


def test_middle_point_is_the_weight_average_of_the_ends(interp_run, tiny_backbone):
    _, run_dir = interp_run
    start = load_policy(tiny_backbone).model.state_dict()
    end = load_policy(stage_dir(run_dir, 0, "sft") / "final").model.state_dict()
    middle = load_policy(stage_dir(run_dir, 1, "interpolate") / "checkpoints" / "step-000001").model.state_dict()
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert changed  # SFT moved the weights
    for key in start:
        torch.testing.assert_close(middle[key], 0.5 * start[key] + 0.5 * end[key])
    info = json.loads((stage_dir(run_dir, 1, "interpolate") / "checkpoints" / "step-000001" /
                       "biopost_checkpoint.json").read_text())
    assert info["interpolation"] == {"start": "sft:init", "end": "previous", "average_last": None, "alpha": 0.5}


def test_forgetting_rows_at_every_evaluation_point(interp_run):
    config, run_dir = interp_run
    _, h5ad_splits = load_task_and_splits(config.model_copy(update={"task": config.eval.forgetting.tasks[0]}))
    rows = [r for r in read_metrics(run_dir) if r["split"] != "train"]
    points = {(r["stage"], r["step"]) for r in rows if r["split"] == "val"}
    assert points == {("sft", 0), ("sft", 2), ("sft", 4), ("interpolate", 0), ("interpolate", 1),
                      ("interpolate", 2), ("avg", 0)}
    for stage, step in points:
        here = [r for r in rows if (r["stage"], r["step"]) == (stage, step)]
        go = {r["metric"]: r for r in here if r["split"] == "general/go"}
        assert set(go) == {"loss", "perplexity"} and go["perplexity"]["n"] > 100
        assert go["perplexity"]["value"] == pytest.approx(np.exp(go["loss"]["value"]))
        other = [r for r in here if r["task"] == H5AD and r["metric"] == "accuracy"]
        assert [r["split"] for r in other] == ["ood_test"] and other[0]["n"] == 8
        assert other[0]["split_fingerprints"] == h5ad_splits.fingerprints()
        assert (run_dir / "predictions" / f"{stage}-step{step:06d}-cell_type_h5ad_ood_test.jsonl").is_file()
    own = {r["split"] for r in rows if r["task"] == config.task.name}
    assert own == {"val", "id_test", "ood_test", "general/go"}


def test_rows_carry_alpha_and_selection_is_on_val(interp_run):
    _, run_dir = interp_run
    rows = [r for r in read_metrics(run_dir) if r["stage"] == "interpolate"]
    assert rows and all(r["alpha"] == ALPHAS[r["step"]] and r["epoch"] is None for r in rows)
    val = {r["step"]: r["value"] for r in rows if r["split"] == "val" and r["metric"] == "accuracy"}
    here = stage_dir(run_dir, 1, "interpolate")
    selection = json.loads((here / "selection.json").read_text())
    best = max(val, key=lambda s: (val[s], -s))
    assert selection["split"] == "val" and selection["best_step"] == best and selection["alpha"] == ALPHAS[best]
    final = load_policy(here / "final").model.state_dict()
    chosen = load_policy(here / "checkpoints" / f"step-{best:06d}").model.state_dict()
    assert all(torch.equal(final[k], chosen[k]) for k in final)
    finals = {"sft": stage_dir(run_dir, 0, "sft") / "final", "interpolate": here / "final"}
    best_path = resolve_init("interpolate:best", finals["interpolate"], run_dir, finals, {}, "next")
    assert best_path == here / "checkpoints" / f"step-{best:06d}"
    table = metric_table(run_dir)
    assert {"general/go_ppl", f"{H5AD} ood_test", "id_test"} <= set(table.columns)
    assert table.loc[("interpolate", 2), "id_test"] == table.loc[("sft", 4), "id_test"]


def test_averaging_the_last_checkpoints(interp_run):
    _, run_dir = interp_run
    checkpoints = stage_dir(run_dir, 0, "sft") / "checkpoints"
    a, b = (load_policy(checkpoints / f"step-{s:06d}").model.state_dict() for s in (2, 4))
    averaged = load_policy(stage_dir(run_dir, 2, "avg") / "final").model.state_dict()
    for key in a:
        torch.testing.assert_close(averaged[key], (a[key] + b[key]) / 2)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    rows = [r for r in read_metrics(run_dir) if r["stage"] == "avg" and r["split"] == "id_test"]
    assert rows and all(r["alpha"] == 1.0 and r["step"] == 0 for r in rows)


def test_averaging_identical_checkpoints_changes_nothing(sft_run):
    once, twice = (weights_of(merged(load_policy(sft_run.final))) for _ in range(2))
    for result in (average([once, twice]), average([once, twice, once]), interpolate(once, twice, 0.3)):
        assert result.keys() == once.keys() and all(torch.equal(result[k], once[k]) for k in once)


def test_a_lora_end_is_merged_into_the_same_model(sft_run, pbmc_splits, one_thread):
    adapter = load_policy(sft_run.final)
    assert adapter.is_adapter
    plain = merged(load_policy(sft_run.final))
    assert not plain.is_adapter and all(k.startswith("model.") and "lora" not in k for k in weights_of(plain))
    ids = plain.tokenizer(plain.render_prompt([{"role": "user", "content": "CD3D CD3E"}]), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain.logits(ids["input_ids"], ids["attention_mask"]),
                                   adapter.logits(ids["input_ids"], ids["attention_mask"]), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def fused_start(tmp_path_factory, tiny_backbone):
    """A fused checkpoint: the tiny backbone reading a tiny DNA encoder through a new projector."""
    from biopost.config import EncoderConfig
    from biopost.models.fusion import fuse
    from biopost.models.tiny_encoders import build_tiny_encoder

    tmp = tmp_path_factory.mktemp("fused")
    build_tiny_encoder("tiny-dna", tmp / "encoder", seed=0, steps=3)
    encoders = {"dna": EncoderConfig(name=str(tmp / "encoder"), num_tokens=3)}
    return fuse(load_policy(tiny_backbone), encoders).save(tmp / "start")


@pytest.mark.parametrize("lora", [False, True])
def test_a_fused_checkpoint_interpolates_its_projectors_too(fused_start, tmp_path, lora, one_thread):
    from biopost.config import LoraConfig
    from biopost.models.adapters import prepare_for_training
    from biopost.models.weights import load_weights

    tuned = prepare_for_training(load_policy(fused_start), LoraConfig(rank=4, alpha=8) if lora else None, tmp_path)
    with torch.no_grad():  # what a fused stage trains: the adapter (or the LM) and the projectors
        for param in [*tuned.projector_parameters(), *(p for p in tuned.model.parameters() if p.requires_grad)]:
            param.add_(0.05 * torch.randn_like(param))
    tuned.save(tmp_path / "end")
    start, end = (weights_of(merged(load_policy(path))) for path in (fused_start, tmp_path / "end"))
    projectors = [k for k in start if k.startswith("projectors.")]
    assert projectors and any(not torch.equal(start[k], end[k]) for k in projectors)
    container = merged(load_policy(tmp_path / "end"))
    load_weights(container, interpolate(start, end, 0.5))
    container.save(tmp_path / "middle")
    middle = weights_of(load_policy(tmp_path / "middle"))
    assert middle.keys() == start.keys()
    for key in start:
        torch.testing.assert_close(middle[key], 0.5 * start[key] + 0.5 * end[key])


def test_interrupted_interpolation_resumes_after_its_last_point(interp_run, tmp_path):
    config, run_dir = interp_run
    cut = shutil.copytree(run_dir, tmp_path / "cut")
    here = stage_dir(cut, 1, "interpolate")
    for gone in (cut / "DONE", here / "DONE", here / "final", here / "checkpoints" / "step-000002"):
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    run(config, cut)
    keys = [(r["step"], r["task"], r["split"], r["metric"]) for r in read_metrics(cut) if r["stage"] == "interpolate"]
    assert len(keys) == len(set(keys)) and {k[0] for k in keys} == {0, 1, 2}
    assert rows_at(cut, "interpolate", 2) == rows_at(run_dir, "interpolate", 2)
    chosen = json.loads((here / "selection.json").read_text())["checkpoint"]  # relative: the copy's own
    assert not Path(chosen).is_absolute() and (here / chosen / "biopost_checkpoint.json").is_file()


@pytest.mark.parametrize("stage, message", [
    ({"kind": "interpolate", "alphas": [0.5, 0.0]}, "strictly increasing"),
    ({"kind": "interpolate", "end": "sft:best", "average_last": 2}, "average_last needs end"),
    ({"kind": "interpolate", "seed": 1}, "unknown key 'stages.1.seed'; valid keys here: alphas, average_last"),
])
def test_interpolate_config_errors(stage, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"task": {"name": "cell_type/pbmc68k"}, "stages": [{"kind": "sft"}, stage]})


def test_interpolation_needs_val_and_a_stage_to_start_from(fast_config, tmp_path):
    raw = fast_config()
    raw["eval"]["splits"] = ["id_test"]
    raw["stages"].append({"kind": "interpolate"})
    with pytest.raises(ConfigError, match="add val to eval.splits"):
        validate_config(raw)
    raw = fast_config()
    raw["stages"] = [{"kind": "interpolate"}]
    with pytest.raises(ConfigError, match="start: init needs a stage before it"):
        run(validate_config(raw), tmp_path / "first")


def test_a_study_plans_interpolation_as_a_stage_without_steps_on_the_shared_sft_trunk():
    from biopost.study.config import study_from_dict
    from biopost.study.plan import make_plan

    wsd = {"name": "warmup_stable_decay", "warmup_steps": 2, "decay_ratio": 0.25}
    raw = {"name": "wise", "base": {"task": {"name": "cell_type/pbmc68k"}, "stages": [
        {"kind": "sft", "max_steps": 32, "eval_every_steps": 4, "schedule": wsd}, {"kind": "interpolate"}]},
        "pipelines": {"sft": ["sft"], "wise": ["sft", "interpolate"]},
        "blocks": {"b": {"pipeline": ["sft", "wise"], "grid": {"stages.sft.max_steps": [16, 32]}}}}
    plan = make_plan(study_from_dict(raw), load_data=False)
    shapes = sorted(tuple((s["kind"], s["steps"]) for s in r.stages) for r in plan.runs)
    assert shapes == [(("sft", 16),), (("sft", 16), ("interpolate", 0)),
                      (("sft", 32),), (("sft", 32), ("interpolate", 0))]
    assert plan.steps_executed == 32 + 4  # the 16-step SFT branches off the 32-step trunk where its decay starts


def test_a_study_collects_alpha_and_forgetting_rows(fast_config, tmp_path, one_thread):
    """Interpolation points and forgetting rows (another task's too) reach the study's results table."""
    from biopost.study.config import study_from_dict
    from biopost.study.execute import execute
    from biopost.study.plan import prepare
    from biopost.study.results import write_results

    base = interpolate_config(fast_config, write_h5ad(tmp_path / "islets.h5ad"))
    base["eval"].update(splits=["val", "ood_test"], max_examples=4, max_new_tokens=8)
    base["eval"]["forgetting"]["corpora"]["go"].update(take=40, heldout=4)
    base["stages"] = [{"kind": "sft", "max_steps": 2, "eval_every_steps": 2, "batch_size": 8, "eval_at_start": False},
                      {"kind": "interpolate", "alphas": [0.0, 1.0]}]
    raw = {"name": "wise", "base": base, "pipelines": {"wise": ["sft", "interpolate"]},
           "blocks": {"b": {"pipeline": ["wise"]}}}
    study_dir = tmp_path / "study"
    assert execute(prepare(study_from_dict(raw), study_dir), study_dir) == []
    frame = write_results(study_dir)[2]
    points = frame[(frame.stage_kind == "interpolate") & (frame.split == "ood_test") & (frame.metric == "accuracy")]
    assert sorted(zip(points.task, points.alpha)) == [(H5AD, 0.0), (H5AD, 1.0), (PBMC, 0.0), (PBMC, 1.0)]
    assert frame[frame.stage_kind == "sft"].alpha.isna().all()
    general = frame[frame.split == "general/go"]
    assert set(zip(general.stage, general.step)) == {("sft", 2), ("interpolate", 0), ("interpolate", 1)}
    other = frame[frame.task == H5AD]
    own = frame[frame.task == PBMC]
    assert other.split_fingerprint.notna().all() and not set(other.split_fingerprint) & set(own.split_fingerprint)
