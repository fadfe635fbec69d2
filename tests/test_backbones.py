"""Backbones: thinking tokens added per backbone with the embedding matrix resized, and errors for bad specs."""

from __future__ import annotations

import json

import pytest

from biopost.config import validate_config
from biopost.models.backbones import ensure_think_tokens
from biopost.models.policy import load_policy
from biopost.models.tiny import build_tiny_backbone
from biopost.pipeline import run


@pytest.fixture(scope="module")
def plain_backbone(tmp_path_factory, pbmc_task, pbmc_splits):
    """A tiny backbone whose tokenizer has no <think> tokens (like SmolLM2)."""
    texts = pbmc_task.training_texts(pbmc_splits.train)
    return build_tiny_backbone("tiny-s", texts, tmp_path_factory.mktemp("plain") / "b", think_tokens=False)


def test_think_tokens_added_and_embeddings_resized(plain_backbone):
    policy = load_policy(plain_backbone)
    before = policy.model.get_input_embeddings().weight.shape[0]
    assert "<think>" not in policy.tokenizer.get_vocab()
    assert ensure_think_tokens(policy) == ["<think>", "</think>"]
    assert policy.model.get_input_embeddings().weight.shape[0] == before + 2 == len(policy.tokenizer)
    assert len(policy.tokenizer("<think>", add_special_tokens=False)["input_ids"]) == 1
    assert ensure_think_tokens(policy) == []  # idempotent


def test_run_records_the_added_tokens(plain_backbone, tmp_path):
    config = validate_config({
        "task": {"name": "cell_type/pbmc68k", "options": {"top_k_genes": 16}},
        "model": {"backbone": str(plain_backbone), "lora": None, "think_tokens": "add"},
        "eval": {"splits": ["id_test"], "max_examples": 2, "max_new_tokens": 4, "bootstrap": 0},
        "stages": [{"kind": "sft", "max_steps": 1, "eval_every_steps": 1, "eval_at_start": False}],
    })
    run_dir = run(config, tmp_path / "r")
    info = json.loads((run_dir / "stages" / "0-sft" / "final" / "biopost_checkpoint.json").read_text())
    assert info["added_tokens"] == ["<think>", "</think>"]
    assert "<think>" in load_policy(run_dir / "stages" / "0-sft" / "final").tokenizer.get_vocab()


def test_missing_local_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_policy(tmp_path / "does-not-exist")


def test_model_revision_reaches_every_hub_load(tiny_backbone, tmp_path, monkeypatch):
    """A hub backbone is loaded at ``model.revision`` by the stage, and again under an adapter checkpoint."""
    import transformers

    hub_id, asked = "some-org/some-model", []
    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tokenizer = transformers.AutoTokenizer.from_pretrained

    def from_hub(real):
        def load(source, *args, **kwargs):
            if str(source) != hub_id:
                return real(source, *args, **kwargs)
            asked.append((real.__self__.__name__, kwargs.get("revision")))
            kwargs.pop("revision", None)
            loaded = real(tiny_backbone, *args, **kwargs)  # stands in for the hub download
            if hasattr(loaded, "config"):
                loaded.name_or_path = loaded.config._name_or_path = hub_id
            return loaded
        return load

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_hub(real_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_hub(real_tokenizer))
    config = validate_config({
        "task": {"name": "cell_type/pbmc68k", "options": {"top_k_genes": 16}},
        "model": {"backbone": hub_id, "revision": "abc123", "lora": {"rank": 2, "alpha": 4.0, "dropout": 0.0}},
        "eval": {"splits": ["val"], "max_examples": 1, "max_new_tokens": 2, "bootstrap": 0},
        "stages": [{"kind": "sft", "max_steps": 1, "eval_every_steps": 1, "eval_at_start": False}],
    })
    final = run(config, tmp_path / "r") / "stages" / "0-sft" / "final"
    assert asked == [("AutoModelForCausalLM", "abc123"), ("AutoTokenizer", "abc123")]
    assert json.loads((final / "biopost_checkpoint.json").read_text())["base"] == hub_id
    load_policy(final)  # the adapter's base comes from the hub again, at the same revision
    assert asked[2:] == [("AutoModelForCausalLM", "abc123"), ("AutoTokenizer", "abc123")]
