"""Classical baselines: k-mer / expression features fitted on train, C chosen on val, evaluator-format rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from genomics_data import coding_rows, write

from biopost.baselines import (C_GRID, FEATURIZERS, EncoderFeatures, KmerFeatures, fit_and_select, register_featurizer,
                               run_baseline)
from biopost.cli import main
from biopost.config import ConfigError, load_config, validate_config
from biopost.data import Example
from biopost.data.splits import fingerprint
from biopost.evaluation import subset
from biopost.models.encoders import Encoder
from biopost.pipeline import load_task_and_splits
from biopost.runlog import read_metrics

TEXT_DEMO = Path(__file__).parents[1] / "configs" / "demo" / "genomics-text-tiny.yaml"


def accuracy(rows: list[dict]) -> dict[str, dict]:
    return {r["split"]: r for r in rows if r["metric"] == "accuracy"}


@pytest.fixture(scope="module")
def genomics_baseline(tmp_path_factory):
    """The baseline of the genomics text demo, on full splits."""
    config = load_config(TEXT_DEMO, ["eval.max_examples=null"])
    out = tmp_path_factory.mktemp("baseline")
    return config, out, run_baseline(config, out)


def test_genomics_baseline_rows_in_evaluator_format_with_a_real_shift(genomics_baseline):
    config, out, rows = genomics_baseline
    acc = accuracy(rows)
    assert set(acc) == {"val", "id_test", "ood_test"}
    assert acc["id_test"]["value"] > acc["ood_test"]["value"] + 0.05  # the held-out taxa are harder
    assert acc["id_test"]["value"] > 0.5  # far above the 0.3 majority class
    _, splits = load_task_and_splits(config)
    for name, row in acc.items():
        assert row["stage"] == "baseline" and row["n"] == len(splits[name])
        assert row["fingerprint"] == splits.fingerprint(name)
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
        assert row["run_id"] == config.run_id() and row["split_fingerprints"] == splits.fingerprints()
    assert read_metrics(out) == rows
    saved = json.loads((out / "baseline.json").read_text())
    assert saved["C"] == acc["val"]["C"] and saved["val_accuracy_by_C"][str(saved["C"])] == acc["val"]["value"]
    predictions = (out / "predictions" / "baseline-ood_test.jsonl").read_text().splitlines()
    assert len(predictions) == len(splits.ood_test)


def test_baseline_scores_the_evaluators_subsets_and_rerun_replaces_rows(tmp_path):
    config = load_config(TEXT_DEMO)  # eval.max_examples: 64, as the trained stages are scored
    first = run_baseline(config, tmp_path)
    second = run_baseline(config, tmp_path)
    assert first == second and len(read_metrics(tmp_path)) == len(first)
    _, splits = load_task_and_splits(config)
    for row in first:
        chosen = subset(splits[row["split"]], 64, config.eval.seed)
        assert row["n"] == len(chosen) == 64 and row["fingerprint"] == fingerprint(chosen)


def test_selection_uses_val_and_ties_go_to_stronger_regularisation():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = np.where(X[:, 0] > 0, "a", "b")
    X[:, 0] *= 10  # separable by a wide margin: most C values are perfect on val
    _, C, scores = fit_and_select(X[:40], y[:40], X[40:], y[40:])
    best = [c for c in scores if scores[c] == max(scores.values())]
    assert set(scores) == set(C_GRID) and len(best) >= 2 and C == min(best)
    # flipped val labels score 1 - accuracy: the choice follows val to the worst-fitting C
    flipped = np.where(y[40:] == "a", "b", "a")
    _, C_flipped, _ = fit_and_select(X[:40], y[:40], X[40:], flipped)
    worst = [c for c in scores if scores[c] == min(scores.values())]
    assert C_flipped == min(worst) and C_flipped != C


def test_kmer_features_show_a_single_base_variant():
    ref = "ACGTACGTAC" * 3
    alt = ref[:15] + "G" + ref[16:]
    features = KmerFeatures(("dna",)).transform([Example("a", {}, "x", dna=(ref, alt)), Example("b", {}, "x", dna=(ref, ref))])
    half = features.shape[1] // 2
    assert np.allclose(features[0, :half], features[1, :half])  # same reference profile
    assert np.abs(features[0, half:]).sum() > 0 and np.abs(features[1, half:]).sum() == 0


def test_variant_baseline_learns_the_substitution(tmp_path):
    source = write(coding_rows(n=160), tmp_path / "coding.jsonl")
    config = validate_config({"task": {"name": "variant_effect/coding", "options": {"source": str(source)}},
                              "eval": {"splits": ["val", "id_test", "ood_test"]}, "stages": [{"kind": "sft"}]})
    acc = accuracy(run_baseline(config, tmp_path / "out"))
    assert acc["id_test"]["value"] == 1.0 and acc["ood_test"]["value"] == 1.0  # C>T vs A>G, on any chromosome


def test_cell_type_baseline_uses_expression(tmp_path):
    config = validate_config({"task": {"name": "cell_type/pbmc68k"}, "eval": {"splits": ["val", "id_test", "ood_test"]},
                              "stages": [{"kind": "sft"}]})
    acc = accuracy(run_baseline(config, tmp_path))
    assert acc["id_test"]["features"] == "expression"
    assert acc["id_test"]["value"] > acc["ood_test"]["value"] > 0.4


def test_a_registered_featurizer_plugs_in(tmp_path):
    class Length:
        def fit(self, train):
            return self

        def transform(self, examples):
            return np.array([[len(e.dna)] for e in examples], dtype=float)

    register_featurizer("test_length")(lambda config, task, modalities: Length())
    try:
        rows = run_baseline(load_config(TEXT_DEMO), tmp_path, features="kmer+test_length")
    finally:
        FEATURIZERS.pop("test_length")
    assert rows[0]["features"] == "kmer+test_length"


def test_cli_baseline_and_its_errors(tmp_path, capsys):
    assert main(["baseline", str(TEXT_DEMO), "--output-dir", str(tmp_path), "eval.splits=[val,ood_test]"]) == 0
    out = capsys.readouterr().out
    assert "ood_test  accuracy" in out and "id_test" not in out
    assert main(["baseline", str(TEXT_DEMO), "--output-dir", str(tmp_path), "--features", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown features ['nope']" in err and "kmer" in err
    assert main(["baseline", str(TEXT_DEMO), "--output-dir", str(tmp_path), "--features", "expression"]) == 2
    assert "need cell payloads" in capsys.readouterr().err


def test_a_baseline_scored_on_one_example_prints_and_writes_no_interval(tmp_path, capsys):
    """One example per split: the CLI says n/a where the interval would be, and metrics.jsonl holds null, not NaN."""
    assert main(["baseline", str(TEXT_DEMO), "--output-dir", str(tmp_path), "eval.splits=[val,ood_test]",
                 "eval.max_examples=1"]) == 0
    out = capsys.readouterr().out
    assert "(n=1, 95% CI n/a)" in out and "nan" not in out
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["n"], r["ci_low"], r["ci_high"]) for r in rows] == [("val", 1, None, None),
                                                                              ("ood_test", 1, None, None)]


def test_a_baseline_stage_comes_last_and_selects_on_val():
    stages = {"task": {"name": "cell_type/pbmc68k"}}
    with pytest.raises(ConfigError, match="put it last"):
        validate_config({**stages, "stages": [{"kind": "baseline"}, {"kind": "sft"}]})
    with pytest.raises(ConfigError, match="add val to eval.splits"):
        validate_config({**stages, "eval": {"splits": ["id_test"]}, "stages": [{"kind": "baseline"}]})
    assert validate_config({**stages, "stages": [{"kind": "sft"}, {"kind": "baseline"}]}).stages[1].features == "auto"


# ---------------------------------------------------------------- pooled features of a frozen encoder
FUSED_DEMO = TEXT_DEMO.with_name("genomics-fused-tiny.yaml")


@pytest.mark.usefixtures("one_thread")
def test_encoder_baseline_on_the_fused_demo(tmp_path, capsys):
    assert main(["baseline", str(FUSED_DEMO), "--output-dir", str(tmp_path), "--features", "encoder"]) == 0
    assert "features encoder" in capsys.readouterr().out
    acc = accuracy(read_metrics(tmp_path))
    assert {"id_test", "ood_test"} <= set(acc) and all(r["features"] == "encoder" for r in acc.values())
    assert acc["id_test"]["value"] > 0.3  # above the 0.295 majority class: tiny-dna's features carry the class
    both = accuracy(run_baseline(load_config(FUSED_DEMO), tmp_path / "both", features="kmer+encoder"))
    assert both["ood_test"]["features"] == "kmer+encoder"


class Counting(Encoder):
    """Features ``[len(item), 2]`` of an item: its position and its letter's code, so means are checkable."""

    modality, hidden_size, identity = "dna", 2, "counting"

    def num_positions(self, item):
        return len(item)

    def encode(self, items):
        return [torch.tensor([[i, ord(c)] for i, c in enumerate(item)], dtype=torch.float32) for item in items]


def test_pooled_tuple_payloads_add_each_further_items_difference():
    features = EncoderFeatures({"dna": None}, "cpu", "float32")
    features.encoders = {"dna": Counting()}
    X = features.transform([Example("a", {}, "x", dna=("AC", "AAA")), Example("b", {}, "x", dna=("C", "C"))])
    mean = lambda s: np.array([(len(s) - 1) / 2, np.mean([ord(c) for c in s])])  # noqa: E731
    np.testing.assert_allclose(X[0], np.concatenate([mean("AC"), mean("AAA") - mean("AC")]))
    np.testing.assert_allclose(X[1], np.concatenate([mean("C"), [0.0, 0.0]]))
    with pytest.raises(ValueError, match="same number of dna items"):
        features.transform([Example("a", {}, "x", dna=("AC", "AAA")), Example("b", {}, "x", dna="C")])


@pytest.mark.usefixtures("one_thread")
def test_pooled_features_of_a_padded_batch_equal_each_sequence_alone():
    from biopost.config import EncoderConfig

    config = {"dna": EncoderConfig(name="tiny-dna", max_length=64, cache=False, batch_size=8)}
    features = EncoderFeatures(config, "cpu", "float32").fit([])
    seqs = ["ACGTTGCA" * 4, "GGC", "TTTACGTAAAC"]  # padded to 34 tokens in one batch
    together = features.transform([Example(s, {}, "x", dna=s) for s in seqs])
    encoder = features.encoders["dna"]
    for row, seq in zip(together, seqs):
        alone = features.transform([Example(seq, {}, "x", dna=seq)])[0]
        np.testing.assert_allclose(row, alone, atol=1e-5, rtol=1e-5)
        real = encoder.encode([seq])[0]  # the positions the encoder attends: <cls>, the bases, <eos>
        assert len(real) == len(seq) + 2
        np.testing.assert_allclose(row, real.mean(0).numpy(), atol=1e-6, rtol=1e-6)


def test_encoder_features_need_an_encoder_in_the_config(tmp_path, capsys):
    assert main(["baseline", str(TEXT_DEMO), "--output-dir", str(tmp_path), "--features", "encoder"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.encoders" in err and "--features kmer" in err
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.usefixtures("one_thread")
def test_cell_encoder_features_use_training_medians(tmp_path, pbmc_splits):
    """A Geneformer-shaped local encoder without a median dictionary: medians come from the training cells."""
    from transformers import BertConfig, BertModel

    genes = sorted({g for e in pbmc_splits.train for g in e.cell["genes"]})
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: 4 + i for i, g in enumerate(genes)}}
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).save_pretrained(
        tmp_path / "cellbert")
    cell = {"name": str(tmp_path / "cellbert"), "gene_tokens": str(tmp_path / "tokens.json"), "max_length": 64,
            "cache": False}
    config = validate_config({"task": {"name": "cell_type/pbmc68k"}, "model": {"encoders": {"cell": cell}},
                              "eval": {"splits": ["val", "id_test", "ood_test"]}, "stages": [{"kind": "sft"}]})
    acc = accuracy(run_baseline(config, tmp_path / "out", features="encoder"))
    assert acc["id_test"]["features"] == "encoder" and acc["id_test"]["value"] > 0.2  # 10 types: 0.1 by chance
