"""The fused single-cell encoder: rank-value gene tokens, Geneformer-style dictionaries and checkpoints, tiny-cell
pretraining and its leakage guard, and a fused SFT + RL run that leaves the encoder untouched."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from biopost.config import ConfigError, EncoderConfig, validate_config
from biopost.data.splits import LeakageError
from biopost.models.cell_encoder import CellEncoder, GeneTokenizer, gene_medians, gene_tokenizer_for, read_mapping
from biopost.models.encoders import FeatureCache, load_encoder
from biopost.models.tiny_cell import build_tiny_cell, cell_key
from biopost.models.tiny_encoders import check_encoder_leakage
from conftest import PBMC, digest_dir

pytestmark = pytest.mark.usefixtures("one_thread")

CELLS = [{"genes": ["CD3E", "LYZ", "MS4A1", "NKG7"], "values": [3.0, 1.0, 0.5, 2.0]},
         {"genes": ["LYZ", "CD3E", "GNLY"], "values": [6.0, 1.0, 1.0]},
         {"genes": ["NKG7", "MS4A1"], "values": [1.0, 4.0]}]
ENSEMBL = {"CD3E": "ENSG00000198851", "LYZ": "ENSG00000090382", "MS4A1": "ENSG00000156738", "NKG7": "ENSG00000105374"}


@pytest.fixture(scope="module")
def tiny_cell_dir(tmp_path_factory):
    """tiny-cell built by the real builder with a handful of steps (records its pretraining cells)."""
    path = tmp_path_factory.mktemp("cell") / "tiny-cell-test"
    build_tiny_cell(path, seed=0, steps=3)
    return path


@pytest.fixture(scope="module")
def geneformer_dir(tmp_path_factory):
    """A Geneformer-shaped checkpoint: ``BertForMaskedLM`` weights plus pickled dictionaries keyed by Ensembl id
    (V2 style, with <cls> / <eos>), and a symbol -> Ensembl TSV."""
    from transformers import BertConfig, BertForMaskedLM

    path = tmp_path_factory.mktemp("geneformer")
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{e: 4 + i for i, e in enumerate(ENSEMBL.values())}}
    medians = {ENSEMBL["CD3E"]: 2.0, ENSEMBL["LYZ"]: 4.0, ENSEMBL["MS4A1"]: 0.25, ENSEMBL["NKG7"]: 1.0}
    (path / "token_dictionary.pkl").write_bytes(pickle.dumps(tokens))
    (path / "gene_median_dictionary.pkl").write_bytes(pickle.dumps(medians))
    (path / "symbols.tsv").write_text("symbol\tensembl_id\n" + "".join(f"{s}\t{e}\n" for s, e in ENSEMBL.items()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
    BertForMaskedLM(config).save_pretrained(path / "model")
    return path


def geneformer_config(path, **kw) -> EncoderConfig:
    return EncoderConfig(name=str(path / "model"), gene_tokens=str(path / "token_dictionary.pkl"),
                         gene_medians=str(path / "gene_median_dictionary.pkl"), gene_symbols=str(path / "symbols.tsv"),
                         **kw)


# ---------------------------------------------------------------- rank-value encoding and dictionaries
def test_rank_value_tokens_divide_by_the_reference_median_and_map_symbols(geneformer_dir):
    tokenizer = gene_tokenizer_for(geneformer_config(geneformer_dir, max_length=16), geneformer_dir / "model")
    ids = {g: tokenizer.token_ids[e] for g, e in ENSEMBL.items()}
    got = tokenizer(CELLS[0])
    assert got[0] == 2 and got[-1] == 3  # <cls> ... <eos>
    # MS4A1 .5/.25 = 2 and NKG7 2/1 = 2 (a tie keeps the cell's order), CD3E 3/2 = 1.5, LYZ 1/4 = .25
    assert got[1:-1] == [ids["MS4A1"], ids["NKG7"], ids["CD3E"], ids["LYZ"]]
    assert tokenizer.unmatched(CELLS) == ["GNLY"]  # no Ensembl id for it: dropped and counted
    short = gene_tokenizer_for(geneformer_config(geneformer_dir, max_length=4), geneformer_dir / "model")
    assert short(CELLS[0]) == [2, ids["MS4A1"], ids["NKG7"], 3]  # truncated to max_length in all


def test_gene_medians_ignore_zeros_and_the_order_follows_them():
    medians = gene_medians(CELLS)
    assert medians == {"CD3E": 2.0, "GNLY": 1.0, "LYZ": 3.5, "MS4A1": 2.25, "NKG7": 1.5}
    tokens = {"<pad>": 0, **{g: i + 1 for i, g in enumerate(sorted(medians))}}
    order = GeneTokenizer(tokens, medians, 8)(CELLS[1])  # LYZ 6/3.5, GNLY 1/1, CD3E 1/2
    assert order == [tokens["LYZ"], tokens["GNLY"], tokens["CD3E"]]


def test_dictionaries_read_from_json_tsv_and_pickle_but_a_pickle_cannot_build_objects(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"<pad>": 0, "A": 1}))
    (tmp_path / "t.csv").write_text("gene,id\n<pad>,0\nA,1\n")
    (tmp_path / "t.pkl").write_bytes(pickle.dumps({"<pad>": 0, "A": 1}))
    assert {read_mapping(tmp_path / f"t.{s}", int, "gene token")["A"] for s in ("json", "csv", "pkl")} == {1}

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"A": Payload()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing builtins.print"):
        read_mapping(tmp_path / "evil.pkl", int, "gene token")
    with pytest.raises(FileNotFoundError, match="gene median file not found"):
        read_mapping(tmp_path / "missing.json", float, "gene median")


def test_gene_files_belong_to_the_cell_encoder_only():
    with pytest.raises(ConfigError, match="only apply to the cell encoder"):
        validate_config({"task": {"name": PBMC}, "stages": [{"kind": "sft"}],
                         "model": {"encoders": {"dna": {"name": "tiny-dna", "gene_tokens": "x.json"}}}})


def test_a_run_whose_cells_lose_most_genes_is_a_config_error_naming_gene_symbols(geneformer_dir, pbmc, tmp_path):
    """Dictionaries keyed by Ensembl id over data named by symbol (no ``gene_symbols``) read almost no gene."""
    from biopost.pipeline import prepare_cell_encoder

    cfg = geneformer_config(geneformer_dir).model_dump(exclude={"gene_symbols"})
    config = validate_config({"task": {"name": PBMC}, "stages": [{"kind": "sft"}], "model": {"encoders": {"cell": cfg}}})
    with pytest.raises(ConfigError, match=r"reads only 0 of the task's \d+ expressed genes .*set model.encoders.cell.gene_symbols"):
        prepare_cell_encoder(config, pbmc[1], tmp_path)
    assert json.loads((tmp_path / "encoders.json").read_text())["cell"]["unmatched_genes"] > 0  # recorded first


def test_a_cell_the_encoder_cannot_read_is_refused_naming_its_record(geneformer_dir):
    from types import SimpleNamespace

    from biopost.models.cell_encoder import check_cells_readable

    policy = SimpleNamespace(encoders={"cell": load_encoder(geneformer_config(geneformer_dir, max_length=16), "cell")})
    check_cells_readable(policy, [("in.jsonl:1", CELLS[0])])
    with pytest.raises(ValueError, match=r"^in.jsonl:2: the model's cell encoder knows none of the cell's 2 expressed"):
        check_cells_readable(policy, [("in.jsonl:1", CELLS[0]), ("in.jsonl:2", {"genes": ["FOO", "BAR", "CD3E"],
                                                                                 "values": [1.0, 2.0, 0.0]})])
    check_cells_readable(SimpleNamespace(), [("in.jsonl:1", {"genes": ["FOO"], "values": [1.0]})])  # no cell encoder


# ---------------------------------------------------------------- checkpoints and features
def test_a_geneformer_checkpoint_loads_from_a_local_path_and_batches_match_one_at_a_time(geneformer_dir, tmp_path):
    cfg = geneformer_config(geneformer_dir, max_length=16, batch_size=2)
    encoder = load_encoder(cfg, "cell")
    assert isinstance(encoder, FeatureCache) and isinstance(encoder.encoder, CellEncoder)
    plain = encoder.encoder
    batch = plain.encode(CELLS)
    single = [plain.encode([c])[0] for c in CELLS]
    assert [f.shape for f in batch] == [(6, 32), (4, 32), (4, 32)]
    assert [plain.num_positions(c) for c in CELLS] == [6, 4, 4]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(batch, single))
    # the same weights saved as a bare BertModel load too, and give the same features
    plain.model.save_pretrained(tmp_path / "bert")
    bare = CellEncoder(tmp_path / "bert", plain.tokenizer)
    assert torch.allclose(bare.encode(CELLS[:1])[0], batch[0], atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no gene-token dictionary"):
        load_encoder(EncoderConfig(name=str(geneformer_dir / "model")), "cell")


def test_tiny_cell_pretrains_on_training_cells_only(tiny_cell_dir, pbmc):
    _, splits = pbmc
    report = json.loads((tiny_cell_dir / "pretraining.json").read_text())
    record = json.loads((tiny_cell_dir / "cells.json").read_text())
    assert record["train"] == [cell_key(e) for e in splits.train]
    assert record["heldout"] == [cell_key(e) for e in splits.val]
    assert record["split_fingerprints"] == splits.fingerprints()
    assert report["train_cells"] == len(splits.train) and report["heldout_mlm_loss"] > 0
    assert json.loads((tiny_cell_dir / "gene_medians.json").read_text()) == gene_medians(e.cell for e in splits.train)
    check_encoder_leakage(str(tiny_cell_dir), "cell", splits)  # the default split: no test cell was seen


class Resplit:
    """The PBMC splits with one training cell moved into ood_test (as another split seed would do)."""

    def __init__(self, splits):
        self.splits = splits

    def __getitem__(self, name):
        return self.splits[name] + (self.splits.train[:1] if name == "ood_test" else ())


def test_leakage_guard_refuses_a_test_cell_seen_in_pretraining(tiny_cell_dir, pbmc):
    _, splits = pbmc
    with pytest.raises(LeakageError, match="held-out cells were in the pretraining data"):
        check_encoder_leakage(str(tiny_cell_dir), "cell", Resplit(splits))


def test_leakage_guard_knows_a_pretraining_cell_under_another_option_seed_and_max_cells(tiny_cell_dir, pbmc):
    """Another ``task.options.seed`` breaks expression ties in another order and ``max_cells`` keeps other cells, so
    a pretraining cell's payload lists its genes differently; the guard still knows it by its id and its values."""
    from biopost.data.splits import TEST_SPLITS
    from biopost.pipeline import load_task_and_splits

    _, splits = pbmc
    pretrained = {e.id: e for e in splits.train}
    config = validate_config({"task": {"name": PBMC, "split": {"seed": 1},
                                       "options": {"rationale": False, "seed": 7, "max_cells": 600}},
                              "stages": [{"kind": "sft"}]})
    _, other = load_task_and_splits(config)
    seen = [e for name in TEST_SPLITS for e in other[name] if e.id in pretrained]
    assert seen and any(e.cell["genes"] != pretrained[e.id].cell["genes"] for e in seen)
    with pytest.raises(LeakageError, match=f"{len(seen)} held-out cells were in the pretraining data"):
        check_encoder_leakage(str(tiny_cell_dir), "cell", other)


def test_leakage_guard_refuses_a_record_keyed_the_old_way(tiny_cell_dir, pbmc, tmp_path):
    old = tmp_path / "old-cell"
    shutil.copytree(tiny_cell_dir, old)
    record = json.loads((old / "cells.json").read_text())
    del record["key"]
    (old / "cells.json").write_text(json.dumps(record))
    with pytest.raises(LeakageError, match="keys cells the old way"):
        check_encoder_leakage(str(old), "cell", pbmc[1])


# ---------------------------------------------------------------- a fused run
def test_fused_cell_sft_rl_leaves_the_encoder_unchanged_and_reloads(tmp_path, tiny_cell_dir, monkeypatch):
    """SFT then RL of a fused model reading cells through a local cell encoder without its own medians (the run's
    training cells give them): the encoder's files stay bit-identical, the unmatched-gene count is recorded, and
    the final checkpoint reloads from the moved run directory and reproduces the run's own predictions."""
    from biopost.evaluation import generate_completions
    from biopost.inference import predict_file, task_for_checkpoint
    from biopost.models.policy import load_policy
    from biopost.pipeline import run
    from biopost.runlog import read_metrics

    monkeypatch.setenv("BIOPOST_CACHE", str(tmp_path / "cache"))
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_cell_dir, encoder)
    (encoder / "gene_medians.json").unlink()
    before = digest_dir(encoder)
    config = validate_config({
        "name": "cell-fused", "task": {"name": PBMC, "options": {"top_k_genes": 8}},
        "model": {"backbone": "tiny-s", "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0},
                  "encoders": {"cell": {"name": str(encoder), "max_length": 32, "num_tokens": 4}}},
        "eval": {"splits": ["val", "ood_test"], "max_examples": 4, "batch_size": 4, "max_new_tokens": 8, "bootstrap": 0},
        "stages": [{"kind": "sft", "max_steps": 3, "eval_every_steps": 3, "batch_size": 4, "lr": 1e-2, "eval_at_start": False},
                   {"kind": "rl", "max_steps": 2, "eval_every_steps": 2, "prompts_per_step": 2, "num_generations": 2,
                    "max_completion_length": 8, "lr": 1e-2, "eval_at_start": False}],
    })
    run_dir = run(config, tmp_path / "run")
    assert digest_dir(encoder) == before
    task, splits = task_for_checkpoint(run_dir / "stages" / "1-rl" / "final", PBMC)
    recorded = json.loads((run_dir / "encoders.json").read_text())["cell"]
    assert recorded["medians"] == "training cells"
    medians = json.loads((run_dir / "gene_medians.json").read_text())
    assert recorded["unmatched_genes"] == len(recorded["unmatched"]) > 0  # genes only test cells express
    assert set(recorded["unmatched"]).isdisjoint(medians)
    rows = read_metrics(run_dir)
    assert {(r["stage"], r["split"]) for r in rows if r["metric"] == "accuracy"} >= {
        ("sft", "val"), ("sft", "ood_test"), ("rl", "val"), ("rl", "ood_test")}
    for checkpoint in (run_dir / "backbone-fused", run_dir / "stages" / "1-rl" / "final"):
        encoder_config = json.loads((checkpoint / "biopost_checkpoint.json").read_text())["fusion"]["encoders"]["cell"]
        assert not Path(encoder_config["gene_medians"]).is_absolute()  # the run's medians move with the run
    moved = Path(shutil.move(run_dir, tmp_path / "moved"))  # run directories are portable (DESIGN rule 10)
    final = moved / "stages" / "1-rl" / "final"
    saved = [json.loads(line) for line in (moved / "predictions" / "rl-step000002-val.jsonl").read_text().splitlines()]
    examples = {e.id: e for e in task.load()}
    again, _ = generate_completions(load_policy(final), task, [examples[r["id"]] for r in saved], config.eval)
    assert again == [r["completions"] for r in saved]
    unreadable = tmp_path / "in.jsonl"
    unreadable.write_text(json.dumps({"id": "c1", "expression": {"LYZ": 2.0}}) + "\n" +
                          json.dumps({"id": "c2", "expression": {"NOT-A-GENE": 2.0}}) + "\n")
    with pytest.raises(ValueError, match="^in.jsonl:2: the model's cell encoder knows none"):
        predict_file(final, PBMC, unreadable, max_new_tokens=4, device="cpu")


def test_training_steps_move_the_projector_and_leave_the_encoder_bit_identical(tiny_backbone, tiny_cell_dir, pbmc):
    """Optimiser steps on everything trainable of a fused LoRA policy: the cell encoder's weights stay exactly
    the same in memory (no gradient reaches them), while the projector and adapter move."""
    from biopost.config import LoraConfig
    from biopost.models.adapters import prepare_for_training
    from biopost.models.fusion import fuse
    from biopost.models.policy import load_policy
    from biopost.stages.sft import tokenize_example
    from biopost.stages.trainer import collate

    task, splits = pbmc
    cfg = EncoderConfig(name=str(tiny_cell_dir), max_length=32, num_tokens=4, cache=False)
    policy = fuse(load_policy(tiny_backbone), {"cell": cfg}, seed=0)
    policy = prepare_for_training(policy, LoraConfig(rank=4, alpha=8.0, dropout=0.0), None)
    encoder = policy.encoders["cell"].model
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    projector = {k: v.clone() for k, v in policy.projector_state().items()}
    task.fused_modalities = frozenset({"cell"})
    try:
        batch = collate([tokenize_example(policy, task, e, 1024) for e in splits.train[:4]], policy.tokenizer.pad_token_id)
    finally:
        task.fused_modalities = frozenset()
    params = [p for p in policy.model.parameters() if p.requires_grad] + policy.projector_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        embeds = policy.embed(batch["input_ids"], batch["payloads"])
        policy.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert any(not torch.equal(projector[k], v) for k, v in policy.projector_state().items())


def test_a_users_cell_reaches_the_cell_encoder_with_its_values(pbmc):
    task, _ = pbmc
    record = {"id": "c1", "expression": {"MS4A1": 5.0, "CD79A": 3.0, "ACTB": 0.0}}
    assert task.example_from_input(record, "in:1").cell == {"genes": ["MS4A1", "CD79A"], "values": [5.0, 3.0]}
    task.fused_modalities = frozenset({"cell"})
    try:
        with pytest.raises(ValueError, match="needs expression values"):
            task.example_from_input({"id": "c2", "genes": ["MS4A1"]}, "in:2")
    finally:
        task.fused_modalities = frozenset()
