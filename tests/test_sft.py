"""SFT through the pipeline on the tiny backbone: it learns, trains only LoRA, and leaves a complete run dir."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from biopost.config import ConfigError, validate_config
from biopost.models.policy import load_policy
from biopost.pipeline import run
from biopost.runlog import read_metrics
from biopost.stages.sft import sample_fraction, tokenize_example

IGNORE = -100  # the label PyTorch's cross-entropy skips


def test_training_loss_goes_down(sft_run):
    losses = [r["value"] for r in sorted(read_metrics(sft_run.dir), key=lambda r: r["step"])
              if r["split"] == "train" and r["metric"] == "loss"]
    assert len(losses) == sft_run.config.stages[0].max_steps
    assert sum(losses[-2:]) < sum(losses[:2])


def test_only_lora_weights_are_trained(sft_run):
    assert sft_run.backbone_digest() == sft_run.backbone_digest_before  # base directory untouched
    saved = load_file(sft_run.final / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)
    info = json.loads((sft_run.final / "biopost_checkpoint.json").read_text())
    assert info["kind"] == "adapter" and info["base"] == str(sft_run.backbone.resolve())

    tuned = load_policy(sft_run.final)
    base = dict(load_policy(sft_run.backbone).model.named_parameters())
    lora_b = {}
    for name, param in tuned.model.named_parameters():
        if "lora_" in name:
            if "lora_B" in name:
                lora_b[name] = param
            continue
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(param, base[original]), name
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # lora_B starts at zero


def test_labels_mask_the_prompt_and_end_with_end_of_turn(pbmc_task, pbmc_splits, tiny_backbone):
    policy = load_policy(tiny_backbone)
    example = pbmc_splits.train[0]
    row = tokenize_example(policy, pbmc_task, example, max_length=2048)
    prompt = policy.tokenizer(policy.render_prompt(pbmc_task.messages(example)), add_special_tokens=False)["input_ids"]
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels) > len(prompt)
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert labels[-1] == policy.end_of_turn_id
    assert policy.tokenizer.decode(labels[len(prompt):-1]) == pbmc_task.target(example)
    short = tokenize_example(policy, pbmc_task, example, max_length=len(prompt) + 2)  # the answer's end is cut
    assert len(short["input_ids"]) == len(short["labels"]) == len(prompt) + 2 and short["labels"][-1] != IGNORE


def test_run_directory_holds_config_env_splits_metrics_predictions_checkpoints(sft_run, pbmc_splits):
    d = sft_run.dir
    for name in ("config.yaml", "env.json", "splits.json", "metrics.jsonl", "stages/0-sft/final/biopost_checkpoint.json"):
        assert (d / name).is_file(), name
    assert json.loads((d / "splits.json").read_text())["fingerprints"] == pbmc_splits.fingerprints()
    rows = read_metrics(d)
    assert all({"stage", "step", "split", "metric", "value", "n"} <= row.keys() for row in rows)
    assert all(row["split_fingerprints"] == pbmc_splits.fingerprints() for row in rows)
    for split in ("id_test", "ood_test"):
        scored = [r for r in rows if r["split"] == split and r["metric"] == "accuracy"]
        assert len({r["step"] for r in scored}) >= 3
        assert all(r["n"] == 8 and 0.0 <= r["value"] <= 1.0 for r in scored)
    predictions = sorted((d / "predictions").glob("*.jsonl"))
    assert predictions and all(p.read_text().strip() for p in predictions)
    selection = json.loads((d / "stages/0-sft/selection.json").read_text())
    assert selection["split"] == "val"
    assert selection["best_step"] in {r["step"] for r in rows if r["split"] == "val"}


def test_rerun_is_a_no_op_and_another_config_is_refused(sft_run):
    before = (sft_run.dir / "metrics.jsonl").read_bytes()
    run(sft_run.config, sft_run.dir)
    assert (sft_run.dir / "metrics.jsonl").read_bytes() == before
    other = sft_run.config.model_dump(mode="json")
    other["eval"]["max_new_tokens"] = 17
    with pytest.raises(ConfigError, match="another run"):
        run(validate_config(other), sft_run.dir)
    assert (sft_run.dir / "metrics.jsonl").read_bytes() == before


def test_data_fractions_are_nested_for_one_seed():
    """A data-scaling axis compares amounts of the same examples: each smaller subset lies in every larger one."""
    examples = [f"e{i}" for i in range(200)]
    subsets = [sample_fraction(examples, f, seed=3) for f in (0.2, 0.4, 0.6, 0.8, 1.0)]
    assert [len(s) for s in subsets] == [40, 80, 120, 160, 200]
    for small, large in zip(subsets, subsets[1:]):
        assert set(small) < set(large)
    assert all(s == sorted(s, key=examples.index) for s in subsets)  # split order kept
    assert sample_fraction(examples, 0.4, seed=3) == subsets[1] != sample_fraction(examples, 0.4, seed=4)


def test_training_arguments_and_lora_raise_no_deprecation_warnings(fast_config, tmp_path):
    """Our calls use transformers' current names (``activation_checkpointing``); peft's read of the renamed
    ``is_gradient_checkpointing`` is silenced where we call it, so ``biopost train`` prints no FutureWarning."""
    import warnings
    from types import SimpleNamespace

    from biopost.models.adapters import prepare_for_training
    from biopost.stages.trainer import training_arguments

    config = validate_config(fast_config())
    config.model.gradient_checkpointing = True
    ctx = SimpleNamespace(stage=config.stages[0], stage_dir=tmp_path, device="cpu", dtype="float32", config=config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = training_arguments(ctx, total=6, every=3)
        prepare_for_training(load_policy(config.model.backbone), config.model.lora, tmp_path)
    assert args.activation_checkpointing is True
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_a_diverged_step_is_logged_as_nan_and_the_flops_estimate_is_the_trainers(fast_config, tmp_path, monkeypatch):
    """The Trainer by default logs a NaN loss as the running mean, which hides a divergence; ours logs it as it
    is. PolicyTrainer's cached FLOPs estimate equals the Trainer's own (which recounts parameters every step)."""
    import math

    from transformers import Trainer

    from biopost.stages.trainer import PolicyTrainer

    real_loss, calls, flops = PolicyTrainer.compute_loss, [], []

    def loss_nan_at_step_2(self, model, inputs, *args, **kwargs):
        flops.append((self.floating_point_ops(inputs), Trainer.floating_point_ops(self, inputs)))
        calls.append(1)
        loss = real_loss(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(PolicyTrainer, "compute_loss", loss_nan_at_step_2)
    raw = fast_config()
    raw["stages"][0].update(max_steps=3, eval_every_steps=3, eval_at_start=False)
    raw["eval"].update(splits=["val"], max_examples=2, max_new_tokens=2)
    run_dir = run(validate_config(raw), tmp_path / "run")
    losses = {r["step"]: r["value"] for r in read_metrics(run_dir) if r["split"] == "train" and r["metric"] == "loss"}
    assert math.isnan(losses[2]) and math.isfinite(losses[1])
    assert flops and all(ours == theirs > 0 for ours, theirs in flops)


def test_a_step_without_a_label_token_logs_nan_and_the_steps_after_it_their_own_loss(fast_config, tmp_path,
                                                                                      monkeypatch):
    """A batch whose labels are all masked (e.g. a prompt truncated at max_length) has a 0/0 loss and zero
    gradients: that step logs NaN, and the later steps, which train on as before, log their own finite loss (the
    Trainer resets its loss sum by subtracting it from itself, which keeps a NaN forever)."""
    import math

    from biopost.stages import sft
    from biopost.stages.trainer import PolicyTrainer

    real_tokenize, real_loss, seen = sft.tokenize_example, PolicyTrainer.compute_loss, []

    def every_other_unlabelled(policy, task, example, max_length):
        row = real_tokenize(policy, task, example, max_length)
        if len(seen) % 2:
            row["labels"] = [IGNORE] * len(row["labels"])
        seen.append(example)
        return row

    true = []

    def spy(self, model, inputs, *args, **kwargs):
        loss = real_loss(self, model, inputs, *args, **kwargs)
        true.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(sft, "tokenize_example", every_other_unlabelled)
    monkeypatch.setattr(PolicyTrainer, "compute_loss", spy)
    raw = fast_config()
    raw["stages"][0].update(max_steps=8, eval_every_steps=8, eval_at_start=False, batch_size=1)
    raw["eval"].update(splits=["val"], max_examples=2, max_new_tokens=2)
    run_dir = run(validate_config(raw), tmp_path / "run")
    logged = [r["value"] for r in sorted(read_metrics(run_dir), key=lambda r: r["step"])
              if r["split"] == "train" and r["metric"] == "loss"]
    first_nan = next(i for i, v in enumerate(true) if math.isnan(v))
    assert any(math.isfinite(v) for v in true[first_nan:])  # a step after the masked one trains on labels
    assert len(logged) == len(true) == 8
    assert logged == pytest.approx(true, nan_ok=True)  # NaN exactly where the step's own loss is


def test_an_example_whose_prompt_fills_max_length_is_an_error_naming_the_fix(pbmc_task, pbmc_splits, tiny_backbone):
    """Truncation may cut an answer's end, never the whole answer: such a row would teach nothing (a 0/0 loss)."""
    policy = load_policy(tiny_backbone)
    example = pbmc_splits.train[0]
    prompt = len(policy.tokenize([policy.render_prompt(pbmc_task.messages(example))])[0])
    row = tokenize_example(policy, pbmc_task, example, prompt + 1)
    assert sum(label != IGNORE for label in row["labels"]) == 1  # one answer token kept
    with pytest.raises(ValueError, match=f"example {example.id}: its prompt has {prompt} tokens, so "
                                         f"max_length={prompt} leaves no answer token to learn; raise the stage"):
        tokenize_example(policy, pbmc_task, example, prompt)


def test_answers_cut_by_max_length_are_counted_once(fast_config, tmp_path, capsys):
    """A row whose answer max_length cut still trains, without its end-of-turn token: the stage says how many."""
    from biopost.models.policy import load_policy
    from biopost.pipeline import load_task_and_splits

    raw = fast_config()
    config = validate_config(raw)
    task, splits = load_task_and_splits(config)
    policy = load_policy(config.model.backbone)
    rows = [(len(policy.tokenize([policy.render_prompt(task.messages(e))])[0]), len(policy.tokenize([task.target(e)])[0]))
            for e in splits.train]
    max_length = max(prompt for prompt, _ in rows) + 2
    cut = sum(prompt + answer + 1 > max_length for prompt, answer in rows)  # + 1: the end-of-turn token
    assert 0 < cut
    raw["stages"][0].update(max_steps=1, eval_every_steps=1, eval_at_start=False, max_length=max_length)
    raw["eval"].update(splits=["val"], max_examples=2, max_new_tokens=2)
    run(validate_config(raw), tmp_path / "run")
    line = f"stages.0 (sft): {cut} of {len(rows)} training answers are cut at max_length={max_length} and lose"
    assert capsys.readouterr().err.count(line) == 1
