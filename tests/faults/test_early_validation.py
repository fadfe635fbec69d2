"""Everything checkable before training is checked before the run directory is claimed; a directory whose
run stopped before finishing a stage takes a corrected config (the attempt is kept aside); one holding
finished stages of another config is refused."""

from __future__ import annotations

import json

import pytest
from faultkit import write_yaml

from biopost.cli import main
from biopost.runlog import DONE


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    """PBMC cells as a user's h5ad file: label column ``bulk_labels``, groups ``phase``."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    adata = adata.raw.to_adata()
    path = tmp_path_factory.mktemp("h5ad") / "pbmc.h5ad"
    adata.write_h5ad(path)
    return path


def h5ad_config(fast_config, h5ad, label_key: str) -> dict:
    raw = fast_config()
    raw["task"] = {"name": "cell_type/h5ad", "options": {"path": str(h5ad), "label_key": label_key,
                                                         "group_key": "phase", "top_k_genes": 16},
                   "split": {"ood_test_groups": ["G2M"]}}
    raw["eval"].update(splits=["val"], max_examples=4, max_new_tokens=8)
    raw["stages"][0].update(max_steps=2, eval_every_steps=2)
    return raw


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_bad_task_option_fails_before_the_directory_is_claimed_and_the_fix_runs_there(fast_config, h5ad, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    bad = write_yaml(h5ad_config(fast_config, h5ad, "bulk_label"), tmp_path / "bad.yaml")
    assert main(["train", str(bad), "--output-dir", str(out)]) == 2
    assert "bulk_label" in one_line_error(capsys)
    assert not (out / "config.yaml").exists()
    good = write_yaml(h5ad_config(fast_config, h5ad, "bulk_labels"), tmp_path / "good.yaml")
    assert main(["train", str(good), "--output-dir", str(out)]) == 0
    assert (out / DONE).is_file()


@pytest.mark.parametrize("change, names", [
    ({"model": {"backbone": "./no/such/model"}}, "model.backbone ./no/such/model: no model there"),
    ({"model": {"encoders": {"cell": {"name": "/no/such/encoder"}}}}, "model.encoders.cell.name /no/such/encoder"),
    ({"stages": [{"kind": "sft", "max_steps": 2}, {"kind": "rl", "init": "sft:best", "max_steps": 2}],
      "eval": {"splits": ["id_test"]}}, "selects on val, but the run evaluates no val examples"),
    ({"stages": [{"kind": "cpt", "max_steps": 2, "corpus": {"source": "files", "paths": ["/no/such/corpus.txt"]}}]},
     "corpus: corpus file not found: /no/such/corpus.txt"),
])
def test_late_failures_are_found_before_the_directory_is_claimed(change, names, fast_config, tmp_path, capsys):
    raw = fast_config()
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    config = write_yaml(raw, tmp_path / "c.yaml")
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    assert names in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_an_unfinished_run_of_another_config_is_set_aside_but_finished_stages_block(fast_config, tmp_path, capsys, monkeypatch, one_thread):
    from biopost.stages import sft

    out = tmp_path / "run"
    first = fast_config()
    first["eval"].update(splits=["val"], max_examples=4, max_new_tokens=8)
    first["stages"][0].update(max_steps=2, eval_every_steps=1)
    monkeypatch.setattr(sft, "sample_fraction", lambda *a: (_ for _ in ()).throw(RuntimeError("died in the stage")))
    with pytest.raises(RuntimeError):
        main(["train", str(write_yaml(first, tmp_path / "first.yaml")), "--output-dir", str(out)])
    monkeypatch.undo()
    failed_config = (out / "config.yaml").read_text()
    second = {**first, "seed": 1}
    assert main(["train", str(write_yaml(second, tmp_path / "second.yaml")), "--output-dir", str(out)]) == 0
    log = [json.loads(line) for line in (out / "attempts" / "attempts.jsonl").read_text().splitlines()]
    assert len(log) == 1 and "config.yaml" in log[0]["files"]
    assert (out / "attempts" / log[0]["to"] / "config.yaml").read_text() == failed_config
    assert (out / DONE).is_file()

    third = {**first, "seed": 2}  # the directory now holds finished stages of `second`
    capsys.readouterr()
    assert main(["train", str(write_yaml(third, tmp_path / "third.yaml")), "--output-dir", str(out)]) == 2
    assert "with finished stages (0-sft); choose another --output-dir" in one_line_error(capsys)
