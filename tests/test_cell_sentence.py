"""Cell sentences (genes by descending expression) and the h5ad loader."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from biopost.config import ConfigError
from biopost.registry import get_task
from biopost.tasks.transcriptomics.cell_type import cell_sentence

GENES = np.array([f"G{i}" for i in range(10)])


@pytest.mark.parametrize("to_matrix", [np.asarray, sp.csr_matrix], ids=["dense", "sparse"])
def test_genes_by_descending_expression_without_zeros(to_matrix):
    matrix = to_matrix(np.array([[0.0, 3.0, 1.0, 5.0, 0.0, 0.5, 0.0, 0.0, 0.0, 2.0]]))
    names, values = cell_sentence(matrix, 0, GENES)
    assert names == ["G3", "G1", "G9", "G2", "G5"]
    assert values == [5.0, 3.0, 2.0, 1.0, 0.5]


def test_ties_are_broken_by_a_seeded_shuffle():
    row = np.array([[2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    orders = {seed: cell_sentence(row, 0, GENES, seed=seed)[0] for seed in range(10)}
    assert all(order[0] == "G0" and sorted(order[1:]) == [f"G{i}" for i in range(1, 9)] for order in orders.values())
    assert cell_sentence(row, 0, GENES, seed=3)[0] == orders[3]
    assert len({tuple(order) for order in orders.values()}) > 1


def test_ties_are_shuffled_per_cell():
    rows = np.ones((6, 10))
    assert len({tuple(cell_sentence(rows, i, GENES, seed=0)[0]) for i in range(6)}) > 1


def test_pbmc_prompts_hold_the_top_genes(pbmc_task, pbmc_splits):
    example = pbmc_splits.train[0]
    assert example.fields["genes"] == example.cell["genes"][:32]
    values = example.cell["values"]
    assert all(a >= b > 0 for a, b in zip(values, values[1:]))
    prompt = pbmc_task.user_prompt(example)
    assert "The 32 most highly expressed genes" in prompt and " ".join(example.fields["genes"]) in prompt
    assert all(label in prompt for label in pbmc_task.labels)


def write_h5ad(path, matrix, obs_columns=("cell_type", "donor")):
    obs = pd.DataFrame({"cell_type": ["T", "B", "T"], "donor": ["d1", "d2", "d3"]}, index=["c0", "c1", "c2"])
    adata = anndata.AnnData(matrix, obs=obs[list(obs_columns)], var=pd.DataFrame(index=["A", "B", "C", "D"]))
    adata.write_h5ad(path)
    return path


def h5ad_task(path, **options):
    return get_task("cell_type/h5ad", {"path": str(path), "label_key": "cell_type", "group_key": "donor", **options})


COUNTS = np.array([[5, 0, 1, 2], [0, 3, 3, 0], [1, 1, 0, 4]], dtype=np.int64)


def test_h5ad_raw_counts_are_normalised_and_log_transformed(tmp_path):
    path = write_h5ad(tmp_path / "counts.h5ad", sp.csr_matrix(COUNTS))
    task = h5ad_task(path, top_k_genes=2)
    cells = {e.id: e for e in task.load()}
    c0 = cells["c0"]
    assert c0.cell["genes"] == ["A", "D", "C"]
    assert c0.cell["values"][0] == pytest.approx(np.log1p(5 / 8 * 1e4), abs=1e-3)
    assert c0.fields["genes"] == ["A", "D"]  # top_k_genes
    assert "The 2 most highly expressed genes" in task.user_prompt(c0)
    assert c0.answer == "T" and c0.meta["donor"] == "d1"
    assert task.labels == ["B", "T"] and task.default_ood_field == "donor"


def test_h5ad_normalised_values_are_kept(tmp_path):
    logged = np.log1p(COUNTS.astype(np.float32) / 3)
    task = h5ad_task(write_h5ad(tmp_path / "logged.h5ad", logged))
    c2 = {e.id: e for e in task.load()}["c2"]
    assert c2.cell["values"][0] == pytest.approx(float(logged[2, 3]), abs=1e-3)


def test_h5ad_missing_obs_column_names_the_columns(tmp_path):
    path = write_h5ad(tmp_path / "x.h5ad", COUNTS.astype(np.float32), obs_columns=("donor",))
    with pytest.raises(ValueError) as err:
        h5ad_task(path).load()
    assert "'cell_type'" in str(err.value) and "donor" in str(err.value)


def test_h5ad_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.h5ad"):
        h5ad_task(tmp_path / "missing.h5ad").load()


def test_h5ad_needs_its_options():
    with pytest.raises(ConfigError, match="task.options.path"):
        get_task("cell_type/h5ad", {})
    with pytest.raises(ConfigError, match="valid keys here:.*label_key"):
        get_task("cell_type/h5ad", {"path": "x", "label_key": "a", "group_key": "b", "lable_key": "c"})
