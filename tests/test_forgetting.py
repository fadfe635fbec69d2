"""Forgetting checks: what they refuse (training on a scored corpus, the run's own task, another task's
inputs seen in training) before any model loads. Rows at every evaluation point: tests/test_interpolate.py
(SFT and interpolation) and tests/test_cpt.py (CPT)."""

from __future__ import annotations

import pytest

from biopost.config import ConfigError, validate_config
from biopost.data import LeakageError
from biopost.forgetting import load_forgetting
from biopost.pipeline import load_task_and_splits, run
from conftest import same_cells_h5ad_options

PBMC = "cell_type/pbmc68k"


def test_cpt_refuses_to_train_on_documents_a_forgetting_corpus_scores(fast_config, tmp_path):
    raw = fast_config()
    raw["eval"]["forgetting"] = {"corpora": {"go-small": {"source": "go", "take": 100, "heldout": 10}}}
    raw["stages"] = [{"kind": "cpt", "corpus": {"source": "go", "take": 400, "heldout": 40}, "max_steps": 1}]
    with pytest.raises(LeakageError, match="10 documents of forgetting corpus 'go-small'"):
        run(validate_config(raw), tmp_path / "run")


def test_the_runs_own_task_is_not_a_forgetting_task(fast_config, pbmc):
    raw = fast_config()
    raw["eval"]["forgetting"] = {"tasks": [{"name": PBMC}]}
    config = validate_config(raw)
    with pytest.raises(ConfigError, match="the run's own task"):
        load_forgetting(config, *pbmc)


def test_another_task_with_the_runs_training_inputs_is_refused(fast_config, tmp_path):
    """The same cells through cell_type/h5ad: identical prompts and payloads, so scoring them is not forgetting."""
    raw = fast_config()
    options = same_cells_h5ad_options(tmp_path)
    other = {"name": "cell_type/h5ad", "options": options}
    raw["eval"]["forgetting"] = {"tasks": [other]}
    config = validate_config(raw)
    task, splits = load_task_and_splits(config)
    with pytest.raises(LeakageError, match="forgetting task cell_type/h5ad have the inputs of training examples"):
        load_forgetting(config, task, splits)
    other["split"] = {"allow_overlap": True}
    checks = load_forgetting(validate_config(raw), task, splits)
    assert [t.task.name for t in checks.tasks] == ["cell_type/h5ad"]
    assert set(checks.tasks[0].splits) == {"id_test", "ood_test"}


def test_no_checks_configured_means_none(fast_config, pbmc):
    assert load_forgetting(validate_config(fast_config()), *pbmc) is None
