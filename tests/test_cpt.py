"""Continued pre-training: packing, corpus windows and leakage, perplexity, CPT -> SFT init, backbone axis."""

from __future__ import annotations

import json

import pytest
import torch

from biopost.config import CorpusConfig, validate_config
from biopost.data.corpus import load_corpus
from biopost.data.splits import LeakageError
from biopost.models.policy import load_policy
from biopost.pipeline import run
from biopost.runlog import read_metrics
from biopost.stages.cpt import pack
from biopost.stages.trainer import IGNORE


def test_packing_never_targets_a_document_start():
    eos = 0
    docs = [[5, 6, 7, eos], [8, 9, eos], [10, 11, 12, 13, eos]]
    blocks = pack(docs, seq_length=5, eos=eos)
    ids = [t for b in blocks for t in b["input_ids"]]
    labels = [t for b in blocks for t in b["labels"]]
    assert ids == [t for d in docs for t in d]
    starts = {0, 4, 7}
    for pos, (tok, lab) in enumerate(zip(ids, labels)):
        assert lab == (IGNORE if pos in starts else tok)
    assert all(len(b["input_ids"]) <= 5 for b in blocks)


def local_jsonl(tmp_path, n=40):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i} about gene regulation"}) for i in range(n)))
    return path


def test_streaming_window_is_reproducible(tmp_path):
    cfg = CorpusConfig(source="hf", name="json", data_files=[str(local_jsonl(tmp_path))], skip=5, take=10, heldout=2)
    first, second = load_corpus(cfg), load_corpus(cfg)
    assert first == second
    assert first.train + first.heldout == [f"document {i} about gene regulation" for i in range(5, 15)]


def test_files_corpus_and_missing_file(tmp_path):
    cfg = CorpusConfig(source="files", paths=[local_jsonl(tmp_path, 12)], take=12, heldout=3)
    corpus = load_corpus(cfg)
    assert len(corpus.train) == 9 and len(corpus.heldout) == 3
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(CorpusConfig(source="files", paths=[tmp_path / "nope.txt"]))


def test_corpus_holding_a_test_cell_is_refused(tmp_path, pbmc_task, pbmc_splits):
    leaked = pbmc_splits.ood_test[0]
    path = tmp_path / "leak.jsonl"
    lines = [{"text": f"filler {i}"} for i in range(10)] + [{"text": "cells: " + " ".join(leaked.fields["genes"])}]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    cfg = CorpusConfig(source="files", paths=[path], take=20, heldout=2)
    with pytest.raises(LeakageError, match=leaked.id):
        load_corpus(cfg, pbmc_task, pbmc_splits)


def test_embedded_go_corpus_has_no_test_overlap(pbmc_task, pbmc_splits):
    corpus = load_corpus(CorpusConfig(take=500, heldout=50), pbmc_task, pbmc_splits)
    assert len(corpus.train) == 450 and "GO:" in corpus.train[0]


@pytest.mark.parametrize("source, marker", [("dna_motifs", "binds the DNA motif"), ("peptides", "protein sequence")])
def test_sequence_corpora_are_annotated_and_windowed(source, marker):
    cfg = CorpusConfig(source=source, take=100, heldout=10, seed=1)
    corpus = load_corpus(cfg)
    assert len(corpus.train) == 90 and all(marker in d for d in corpus.train + corpus.heldout)
    assert load_corpus(cfg) == corpus
    assert load_corpus(cfg.model_copy(update={"seed": 2})) != corpus


def cpt_then_sft_config(backbone):
    return validate_config({
        "name": "cpt-sft",
        "task": {"name": "cell_type/pbmc68k", "options": {"top_k_genes": 16}},
        "model": {"backbone": str(backbone), "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0}},
        "eval": {"splits": ["val", "id_test", "ood_test"], "max_examples": 4, "batch_size": 4,
                 "max_new_tokens": 8, "bootstrap": 0,
                 "forgetting": {"corpora": {"go": {"source": "go", "take": 400, "heldout": 40}}, "seq_length": 64}},
        "stages": [
            {"kind": "cpt", "corpus": {"source": "go", "take": 400, "heldout": 40}, "seq_length": 64,
             "batch_size": 8, "lr": 5e-3, "max_steps": 30, "eval_every_steps": 15,
             "schedule": {"name": "constant", "warmup_ratio": 0.0}},
            {"kind": "sft", "max_steps": 1, "eval_every_steps": 1, "batch_size": 4},
        ],
    })


HELDOUT_PASSES: list[int] = []  # target tokens of every held-out perplexity pass of cpt_run


@pytest.fixture(scope="module")
def cpt_run(tmp_path_factory, tiny_backbone):
    import biopost.stages.cpt as cpt

    def counted(policy, blocks, batch_size):
        loss, tokens = heldout_loss(policy, blocks, batch_size)
        HELDOUT_PASSES.append(tokens)
        return loss, tokens

    heldout_loss = cpt.heldout_loss
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpt, "heldout_loss", counted)
        return run(cpt_then_sft_config(tiny_backbone), tmp_path_factory.mktemp("cpt") / "run")


def test_cpt_lowers_heldout_perplexity(cpt_run):
    rows = [r for r in read_metrics(cpt_run)
            if r["stage"] == "cpt" and r["split"] == "heldout" and r["metric"] == "perplexity"]
    assert [r["step"] for r in rows] == [0, 15, 30]
    assert all(r["n"] > 0 for r in rows)
    assert rows[-1]["value"] < 0.8 * rows[0]["value"]


def test_forgetting_corpus_rows_at_every_cpt_and_sft_evaluation_point(cpt_run):
    """The CPT stage's own window as a forgetting corpus scores exactly its held-out documents."""
    rows = [r for r in read_metrics(cpt_run) if r["metric"] == "perplexity"]
    general = {(r["stage"], r["step"]): r for r in rows if r["split"] == "general/go"}
    heldout = {(r["stage"], r["step"]): r for r in rows if r["split"] == "heldout"}
    assert sorted(general) == [("cpt", 0), ("cpt", 15), ("cpt", 30), ("sft", 0), ("sft", 1)]
    for point, row in heldout.items():
        assert general[point]["n"] == row["n"] and general[point]["value"] == pytest.approx(row["value"], rel=1e-6)
    # The window is scored once per evaluation point, its two rows written from one pass (was twice in CPT).
    assert len(HELDOUT_PASSES) == len(general)


def test_cpt_checkpoint_is_the_exact_sft_init(cpt_run):
    cpt_final = load_policy(cpt_run / "stages" / "0-cpt" / "final").model.state_dict()
    # LoRA B starts at zero, so the SFT checkpoint at step 0 merged is exactly its init
    sft_start = load_policy(cpt_run / "stages" / "1-sft" / "checkpoints" / "step-000000").model.merge_and_unload()
    merged = sft_start.state_dict()
    assert cpt_final.keys() == merged.keys()
    assert all(torch.equal(cpt_final[k], merged[k]) for k in cpt_final)


def test_backbone_is_one_field(tmp_path):
    config = validate_config({
        "task": {"name": "cell_type/pbmc68k", "options": {"top_k_genes": 16}},
        "model": {"backbone": "tiny-m", "lora": None},
        "eval": {"splits": ["id_test"], "max_examples": 2, "max_new_tokens": 4, "bootstrap": 0},
        "stages": [{"kind": "sft", "max_steps": 1, "eval_every_steps": 1, "eval_at_start": False}],
    })
    run_dir = run(config, tmp_path / "m")
    model = load_policy(run_dir / "stages" / "0-sft" / "final").model
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4
