"""Backbones: thinking tokens added per backbone with the embedding matrix resized, and errors for bad specs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from biopost.config import EvalConfig, LoraConfig, validate_config
from biopost.data import Example
from biopost.evaluation import generate_completions
from biopost.models.adapters import prepare_for_training
from biopost.models.backbones import ensure_think_tokens
from biopost.models.policy import load_policy
from biopost.models.tiny import CHAT_TEMPLATE, THINK, build_tiny_backbone
from biopost.pipeline import run
from biopost.rewards import format_reward
from biopost.stages.sft import tokenize_example
from biopost.stages.trainer import collate
from conftest import COLOURS, ColourLabels


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


def test_padded_vocabulary_gives_free_rows_to_new_tokens(plain_backbone, tmp_path):
    """Like Qwen2.5 (config.vocab_size > len(tokenizer)): new tokens take free rows and the matrix never
    shrinks; input and (untied) output rows start at the mean of the tag's text pieces."""
    from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(plain_backbone)
    config = AutoConfig.from_pretrained(plain_backbone)
    config.vocab_size, config.tie_word_embeddings = len(tokenizer) + 6, False
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")

    policy = load_policy(tmp_path / "padded")
    n, rows = len(policy.tokenizer), len(policy.tokenizer) + 6
    pieces = [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in THINK]
    before = [policy.model.get_input_embeddings().weight.detach().clone(),
              policy.model.get_output_embeddings().weight.detach().clone()]
    assert not torch.equal(*before)  # untied
    assert ensure_think_tokens(policy) == THINK
    assert policy.tokenizer.convert_tokens_to_ids(THINK) == [n, n + 1]
    after = [policy.model.get_input_embeddings().weight, policy.model.get_output_embeddings().weight]
    for old, new in zip(before, after):
        assert new.shape[0] == rows
        for token_id, ids in zip([n, n + 1], pieces):
            torch.testing.assert_close(new[token_id], old[ids].mean(0))
        assert torch.equal(new[:n], old[:n]) and torch.equal(new[n + 2:], old[n + 2:])

    # LoRA trains the new rows of both matrices
    policy.save(tmp_path / "think")
    tuned = prepare_for_training(load_policy(tmp_path / "think"), LoraConfig(rank=2), tmp_path / "stage",
                                 source=tmp_path / "think")
    trainable = [name for name, p in tuned.model.named_parameters() if p.requires_grad and "lora_" not in name]
    assert len(trainable) == 2 and any("lm_head" in name for name in trainable), trainable


# ---------------------------------------------------------------- added <think> tokens are learnable with LoRA
class ColourFormat(ColourLabels):
    """The prompt repeats a colour; the target reasons in a <think> block, then answers with the colour."""

    name = "toy/colour-format"

    def messages(self, example):
        return [{"role": "user", "content": "Colour: " + " ".join([example.answer] * 4)}]

    def reasoning(self, example):
        return f"The repeated word is {example.answer}."


def colour_examples(n: int = 32) -> list[Example]:
    return [Example(id=str(i), fields={}, answer=COLOURS[i % len(COLOURS)]) for i in range(n)]


def sft_steps(policy, task, examples, steps: int, lr: float) -> None:
    """Plain teacher-forced training of whatever the policy leaves trainable (full model or adapter)."""
    rows = [tokenize_example(policy, task, e, 256) for e in examples]
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    order = random.Random(0)
    policy.model.train()
    for _ in range(steps):
        policy.model(**collate(order.sample(rows, 8), policy.tokenizer.pad_token_id)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    policy.model.eval()


@torch.no_grad()
def tag_probabilities(policy, task, examples) -> tuple[float, float]:
    """Teacher-forced p(right tag) and p(the other tag), averaged over every target position holding a tag."""
    tags = policy.tokenizer.convert_tokens_to_ids(THINK)
    batch = collate([tokenize_example(policy, task, e, 256) for e in examples], policy.tokenizer.pad_token_id)
    probs = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
    right, wrong = [], []
    for row, pos in (batch["labels"][:, 1:] == tags[0]).logical_or(batch["labels"][:, 1:] == tags[1]).nonzero().tolist():
        label = int(batch["labels"][row, pos + 1])  # position pos predicts token pos + 1
        right.append(float(probs[row, pos, label]))
        wrong.append(float(probs[row, pos, tags[1] if label == tags[0] else tags[0]]))
    assert len(right) == 2 * len(examples)
    return float(np.mean(right)), float(np.mean(wrong))


@pytest.fixture(scope="module")
def pretrained_plain(tmp_path_factory, one_thread):
    """A tiny model without <think> tokens, briefly trained on the format with the tags as text."""
    import jinja2

    task, examples = ColourFormat(), colour_examples()
    template = jinja2.Template(CHAT_TEMPLATE)
    texts = [template.render(messages=task.messages(e) + [{"role": "assistant", "content": task.target(e)}])
             for e in examples]
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    policy = load_policy(build_tiny_backbone("tiny-s", texts * 4, root / "init", think_tokens=False))
    sft_steps(policy, task, examples, steps=40, lr=1e-2)
    return policy.save(root / "pretrained")


def test_added_think_tokens_start_apart_and_are_learned_with_lora(pretrained_plain, tmp_path):
    task, examples = ColourFormat(), colour_examples()
    policy = load_policy(pretrained_plain)
    assert ensure_think_tokens(policy) == THINK
    embeddings = policy.model.get_input_embeddings().weight.detach()
    opening, closing = embeddings[policy.tokenizer.convert_tokens_to_ids(THINK)]
    assert float((opening - closing).norm()) > 0.1 * float(embeddings.norm(dim=1).mean())
    policy.save(tmp_path / "think")  # as the pipeline does: stages start from the backbone with the tokens

    torch.manual_seed(0)
    lora = LoraConfig(rank=8, alpha=16.0, dropout=0.0)
    policy = prepare_for_training(load_policy(tmp_path / "think"), lora, tmp_path / "stage", source=tmp_path / "think")
    sft_steps(policy, task, examples, steps=40, lr=1e-2)
    right, wrong = tag_probabilities(policy, task, examples)
    assert right > 0.9 and wrong < 0.05, (right, wrong)
    cfg = EvalConfig(max_new_tokens=24, batch_size=4)
    completions, _ = generate_completions(policy, task, examples[:4], cfg)
    assert format_reward(None, [c for (c,) in completions]) == [1.0] * 4, completions

    # the trained rows travel with the adapter and come back on load; the base's rows are untouched
    reloaded = load_policy(policy.save(tmp_path / "adapter"))
    assert tag_probabilities(reloaded, task, examples) == pytest.approx((right, wrong), abs=1e-5)
    base_rows = load_policy(tmp_path / "think").model.get_input_embeddings().weight
    ids = policy.tokenizer.convert_tokens_to_ids(THINK)
    assert torch.equal(base_rows[ids], torch.stack([opening, closing]))
    assert not torch.allclose(reloaded.model.get_input_embeddings()(torch.tensor(ids)), base_rows[ids])
