"""The RL stage end to end: rewards cannot be gamed, reward rises on a learnable task, and the pipeline's
start policies (continue the SFT adapter, a new adapter of another rank, cold start from the base)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from biopost.config import RLStage, validate_config
from biopost.data import Example
from biopost.models.policy import CHECKPOINT_FILE, load_policy
from biopost.models.tiny import CHAT_TEMPLATE, build_tiny_backbone
from biopost.pipeline import run, stage_runners
from biopost.rewards import correctness_reward, format_reward
from biopost.runlog import read_metrics
from biopost.stages import rl
from biopost.stages.grpo import group_advantages
from conftest import COLOURS, ColourLabels


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- reward hacking on the real task
def think(text: str) -> str:
    return f"<think>\n{text}\n</think>\n\n"


def test_gamed_completions_earn_no_correctness(pbmc_task, pbmc_splits):
    example = pbmc_splits.train[0]
    right = example.answer
    wrong = next(label for label in pbmc_task.labels if label != right)
    reward = correctness_reward(pbmc_task)
    cases = {
        "single correct answer": (think("CD markers are high.") + f"Answer: {right}", 1.0),
        "single correct answer, other case": (think("x") + f"Answer: {right.lower()}.", 1.0),
        "single wrong answer": (think("x") + f"Answer: {wrong}", 0.0),
        "all labels on one line": (think("x") + "Answer: " + "; ".join(pbmc_task.labels), 0.0),
        "all labels, one Answer line each": (think("x") + "\n".join(f"Answer: {lab}" for lab in pbmc_task.labels), 0.0),
        "two labels, hedged": (think("x") + f"Answer: {right} or {wrong}", 0.0),
        "reasoning names the answer but gives none": (think(f"This is a {right} cell."), 0.0),
        "correct answer repeated": (think("x") + "\n".join([f"Answer: {right}"] * 3), 0.0),
        "wrong then correct": (think("x") + f"Answer: {wrong}\nAnswer: {right}", 0.0),
        "empty": ("", 0.0),
    }
    texts = [text for text, _ in cases.values()]
    got = reward(None, texts, examples=[example] * len(texts))
    assert dict(zip(cases, got)) == {name: want for name, (_, want) in cases.items()}


def test_format_reward_multiline_reasoning():
    answer = "Answer: CD19+ B"
    assert format_reward(None, [think("line one\nline two\n\nline four") + answer]) == [1.0]
    assert format_reward(None, ["<think>one line</think>" + answer]) == [1.0]
    bad = [
        answer,  # no reasoning block
        think("a\nb") + answer + "\nAnswer: CD14+ Monocyte",  # two answers
        think("a") + answer + "\nand some trailing text",  # text after the answer line
        think("a") + think("b") + answer,  # two think blocks
        think("a\nb"),  # reasoning only
    ]
    assert format_reward(None, bad) == [0.0] * len(bad)


# ---------------------------------------------------------------- reward rises on a learnable toy task
class ColourTask(ColourLabels):
    """The prompt repeats one colour word; the answer is that word. Learnable by a 2-layer model."""

    name = "toy/colour"

    def messages(self, example):
        return [{"role": "user", "content": self.user_prompt(example)}]

    def user_prompt(self, example):
        return "Colour: " + " ".join([example.fields["cue"]] * 8)

    def target(self, example):
        return f"Answer: {example.answer}"


def colour(cue: str, answer: str | None = None, id: str = "x") -> Example:
    return Example(id=id, fields={"cue": cue}, answer=answer or cue)


def sft_rows(policy, task, examples) -> dict:
    """Teacher-forced batch: loss on the target and end-of-turn only."""
    tok, rows = policy.tokenizer, []
    for e in examples:
        prompt = tok(policy.render_prompt(task.messages(e)), add_special_tokens=False)["input_ids"]
        target = tok(task.target(e), add_special_tokens=False)["input_ids"] + [policy.end_of_turn_id]
        rows.append((prompt + target, [-100] * len(prompt) + target))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_ids)] = torch.tensor(row_labels)
        attention[i, : len(row_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def mean_p_correct(policy, task) -> float:
    """Teacher-forced probability of the right colour token, averaged over the four cues."""
    batch = sft_rows(policy, task, [colour(c) for c in COLOURS])
    with torch.no_grad():
        logits = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    pos = int((labels != labels[0]).any(0).float().argmax())  # the one target position where the cues differ
    logp = torch.log_softmax(logits[:, pos - 1], -1)  # position pos - 1 predicts token pos
    return float(logp.gather(1, labels[:, pos : pos + 1]).exp().mean())


def test_mean_reward_rises_on_learnable_task(tmp_path):
    """Warm up with SFT only until the policy is right ~40% of the time (chance is 25%), then GRPO.

    The warm-up stops on a measured probability, not a step count, so the starting point is comparable
    across platforms; every RL batch holds each colour equally often, so a bias towards one colour
    cannot raise the mean reward - only reading the cue can.
    """
    import jinja2

    torch.manual_seed(0)
    rng = random.Random(0)
    task = ColourTask()
    template = jinja2.Template(CHAT_TEMPLATE)
    texts = [template.render(messages=task.messages(colour(c)) + [{"role": "assistant", "content": task.target(colour(c))}])
             for c in COLOURS] * 20
    path = build_tiny_backbone("tiny-s", texts, tmp_path / "tiny")
    policy = load_policy(path)

    warm = [colour(rng.choice(COLOURS), id=str(i)) for i in range(64)]
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-2)
    for step in range(100):
        policy.model(**sft_rows(policy, task, rng.sample(warm, 16))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 10 and mean_p_correct(policy, task) >= 0.4:
            break
    assert 0.4 <= mean_p_correct(policy, task) < 0.9

    stage = RLStage(num_generations=8, prompts_per_step=4, lr=2e-3, beta=0.0, max_completion_length=6,
                    schedule={"name": "constant", "warmup_ratio": 0.0}, rewards={"format": 0.0})
    policy.model.eval()
    reference = rl.Reference.of(policy, path, "new")
    rewards = rl.reward_functions(task, stage)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr)
    scheduler = rl.make_scheduler(stage, optimizer, 40)
    history = []
    for step in range(40):
        examples = [colour(c, id=f"{step}-{c}") for c in COLOURS]
        batch = rl.rollout(policy, task, examples, stage)
        scores = rl.score_rollouts(batch, rewards, stage)
        advantages = group_advantages(scores["reward"], stage.num_generations, stage.scale_rewards)
        with torch.no_grad():
            batch.old_logps, _ = rl.sequence_logps(policy, batch, stage.temperature)
            batch.ref_logps = reference.logps(policy, batch, stage.temperature)
        rl.optimise(policy, optimizer, scheduler, params, batch, advantages, stage)
        history.append(float(scores["reward_correctness"].mean()))
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    assert last >= first + 0.2, history


# ---------------------------------------------------------------- the pipeline: sft -> rl, three start policies
RL_COMMON = {"kind": "rl", "max_steps": 2, "prompts_per_step": 2, "num_generations": 2, "micro_batch_size": 2,
             "max_completion_length": 16, "lr": 2e-3, "eval_every_steps": 2, "eval_at_start": False,
             "schedule": {"name": "constant", "warmup_ratio": 0.0}}


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory, fast_config):
    """One run: SFT, then RL continuing the SFT adapter from its val-best checkpoint, RL with a new adapter of
    another rank, RL cold-started from the base model, a second new adapter on the SFT model and full RL
    from the val-best SFT checkpoint. Records each stage's init path.

    A tiny model after a few SFT steps never earns task or format reward, so every advantage would be 0 and
    nothing would train. An extra ``probe`` reward (a fixed function of the completion text) is added to the
    stage's rewards so the plumbing - which weights train, which stay frozen - is exercised for real.
    """
    raw = fast_config()
    raw["stages"] = [
        # no evaluation at step 0 (an untrained adapter): val ties then select step 2, not the final step 4
        {"kind": "sft", "max_steps": 4, "eval_every_steps": 2, "eval_at_start": False, "batch_size": 8, "lr": 1e-2,
         "schedule": {"name": "constant", "warmup_ratio": 0.0}},
        {**RL_COMMON, "init": "sft:best", "adapter": "continue"},
        {**RL_COMMON, "name": "rl_new", "init": "sft", "adapter": "new",
         "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0}},
        {**RL_COMMON, "name": "rl_cold", "init": "base"},
        # disk: a second new adapter on the SFT model shares its merged copy; full fine-tuning keeps none
        {**RL_COMMON, "name": "rl_new2", "init": "sft", "adapter": "new"},
        {**RL_COMMON, "name": "rl_full", "init": "sft:best", "adapter": "new", "lora": "full"},
    ]
    config = validate_config(raw)
    inits: dict[str, Path] = {}
    runners = stage_runners()

    def recording(kind):
        def runner(ctx):
            inits[ctx.name] = Path(ctx.init_path)
            return runners[kind](ctx)
        return runner

    real_rewards = rl.reward_functions

    def with_probe(task, stage, mixed=()):
        probe = lambda prompts, completions, **_: [sum(map(ord, c)) % 7 / 6 for c in completions]  # noqa: E731
        return {**real_rewards(task, stage, mixed), "probe": (1.0, probe)}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("biopost.pipeline.stage_runners", lambda: {k: recording(k) for k in runners})
        mp.setattr(rl, "reward_functions", with_probe)
        run_dir = run(config, tmp_path_factory.mktemp("runs") / "sft-rl")
    stages = {p.name.split("-", 1)[1]: p for p in (run_dir / "stages").iterdir()}
    return run_dir, read_metrics(run_dir), inits, stages, Path(config.model.backbone)


def train_value(rows, stage, metric, step):
    found = [r["value"] for r in rows if r["stage"] == stage and r["split"] == "train" and r["metric"] == metric
             and r["step"] == step]
    assert len(found) == 1, (stage, metric, step)
    return found[0]


def adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def test_pipeline_logs_eval_and_train_rows(rl_run):
    _, rows, _, _, _ = rl_run
    for stage in ("sft", "rl"):
        for split in ("id_test", "ood_test"):
            assert any(r["stage"] == stage and r["split"] == split and r["metric"] == "accuracy" for r in rows), (stage, split)
    for metric in ("reward", "reward_correctness", "reward_format", "kl", "clip_fraction", "entropy", "completion_length"):
        for step in (1, 2):
            value = train_value(rows, "rl", metric, step)
            assert np.isfinite(value)
    assert 0 < train_value(rows, "rl", "completion_length", 1) <= 16
    assert train_value(rows, "rl", "entropy", 1) > 0


def test_rl_init_best_is_the_val_selected_checkpoint(rl_run):
    _, _, inits, stages, _ = rl_run
    selection = json.loads((stages["sft"] / "selection.json").read_text())
    assert selection["split"] == "val"
    assert inits["rl"] == stages["sft"] / selection["checkpoint"]  # recorded relative to selection.json
    assert inits["rl"].parent.name == "checkpoints" and inits["rl"].is_dir()
    assert inits["rl_new"] == stages["sft"] / "final"


def test_continue_trains_the_sft_adapter_against_a_frozen_copy(rl_run):
    _, rows, inits, stages, _ = rl_run
    # the SFT adapter really changed the model, so a wrong reference (base, or a fresh adapter) would show KL
    sft = load_policy(inits["rl"])
    ids = sft.tokenizer("Organism: Homo sapiens. CD74 HLA-DRA", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with_adapter = torch.log_softmax(sft.model(input_ids=ids).logits, -1)
        with sft.model.disable_adapter():
            without = torch.log_softmax(sft.model(input_ids=ids).logits, -1)
    assert (with_adapter - without).abs().max() > 1e-3
    # the reference is the init adapter itself: before the first update, policy == reference ...
    assert train_value(rows, "rl", "kl", 1) == pytest.approx(0.0, abs=1e-7)
    # ... and it stays frozen while the policy trains away from it
    assert train_value(rows, "rl", "kl", 2) > 1e-6
    start, final = adapter_weights(inits["rl"]), adapter_weights(stages["rl"] / "final")
    assert set(final) == set(start)  # the same adapter, and no frozen reference copy saved with it
    assert all(final[k].shape == start[k].shape for k in start)
    moved = sum(float((final[k] - start[k]).norm() ** 2) for k in start if "lora_B" in k) ** 0.5
    size = sum(float(start[k].norm() ** 2) for k in start if "lora_B" in k) ** 0.5
    assert moved > 0  # it trained
    assert moved < 0.5 * size  # ... starting from the SFT adapter, not from a fresh one (B = 0)
    assert json.loads((stages["rl"] / "final" / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((stages["rl"] / "final" / CHECKPOINT_FILE).read_text())["kind"] == "adapter"


def test_new_adapter_has_its_own_rank_on_the_merged_sft_model(rl_run):
    _, rows, inits, stages, backbone = rl_run
    final = stages["rl_new"] / "final"
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((inits["rl_new"] / "adapter_config.json").read_text())["r"] == 4
    info = json.loads((final / CHECKPOINT_FILE).read_text())
    base = (final / info["base"]).resolve()  # inside the run directory: recorded relative to the checkpoint
    assert base == (stages["rl_new"].parent.parent / "merged" / "stages--0-sft--final").resolve()
    assert json.loads((base / CHECKPOINT_FILE).read_text())["kind"] == "full"
    # the base is the SFT adapter merged into the backbone
    merged = load_policy(base).model.state_dict()
    expected = load_policy(inits["rl_new"]).model.merge_and_unload().state_dict()
    original = load_policy(backbone).model.state_dict()
    assert set(merged) == set(expected)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=0)
    assert any(not torch.equal(merged[k], original[k]) for k in original)
    assert train_value(rows, "rl_new", "kl", 1) == pytest.approx(0.0, abs=1e-7)  # reference = adapter disabled
    assert train_value(rows, "rl_new", "kl", 2) > 1e-6


def test_cold_start_trains_an_adapter_on_the_base(rl_run):
    _, rows, inits, stages, backbone = rl_run
    assert inits["rl_cold"] == backbone
    info = json.loads((stages["rl_cold"] / "final" / CHECKPOINT_FILE).read_text())
    assert Path(info["base"]).resolve() == backbone.resolve()
    assert json.loads((stages["rl_cold"] / "final" / "adapter_config.json").read_text())["r"] == 4
    assert train_value(rows, "rl_cold", "kl", 1) == pytest.approx(0.0, abs=1e-7)
    assert train_value(rows, "rl_cold", "kl", 2) > 1e-6
    assert any(r["stage"] == "rl_cold" and r["split"] == "ood_test" for r in rows)


# ---------------------------------------------------------------- randomness is owned (rule 9)
def test_stage_seed_changes_rollouts_after_an_evaluation(fast_config, tmp_path, monkeypatch):
    """Evaluation at step 0 must not reset the RNG: otherwise every stage seed samples the same rollouts."""
    fixed_prompts = rl.prompts_for_step
    monkeypatch.setattr(rl, "prompts_for_step", lambda train, step, n, seed: fixed_prompts(train, step, n, 0))
    real_rollout, sampled = rl.rollout, []
    monkeypatch.setattr(rl, "rollout", lambda *a, **k: sampled.append(real_rollout(*a, **k)) or sampled[-1])

    def first_rollout(seed: int, attempt: int) -> list[str]:
        raw = fast_config()
        raw["eval"].update(splits=["val"], max_examples=2, max_new_tokens=4)
        raw["stages"] = [{**RL_COMMON, "init": "base", "max_steps": 1, "eval_at_start": True, "seed": seed,
                          "num_generations": 4, "max_completion_length": 12, "temperature": 1.5}]
        sampled.clear()
        run(validate_config(raw), tmp_path / f"seed{seed}-{attempt}")
        return sampled[0].completions

    assert first_rollout(0, 0) == first_rollout(0, 1)  # reproducible ...
    assert first_rollout(0, 2) != first_rollout(1, 0)  # ... and the stage seed matters


def test_one_merged_copy_per_source_only_for_adapters_and_no_resume_state_left(rl_run):
    run_dir, _, inits, stages, _ = rl_run
    assert inits["rl_full"] != inits["rl_new"] == inits["rl_new2"]
    merged = sorted((run_dir / "merged").iterdir())
    assert [p.name for p in merged] == ["stages--0-sft--final"]  # rl_new and rl_new2 share it; rl_full has none
    for name in ("rl_new", "rl_new2"):
        final = stages[name] / "final"
        assert (final / json.loads((final / CHECKPOINT_FILE).read_text())["base"]).resolve() == merged[0].resolve()
    assert json.loads((stages["rl_full"] / "final" / CHECKPOINT_FILE).read_text())["kind"] == "full"
    for stage_dir in stages.values():
        assert (stage_dir / "DONE").is_file()
        assert not (stage_dir / "base").exists() and not (stage_dir / "resume").exists(), stage_dir


def test_merged_copy_lives_in_the_run_holding_its_source(tmp_path):
    """Runs of a study that start from another run's checkpoint share that run's merged copy."""
    from biopost.models.adapters import merged_base_dir

    for run_dir in (tmp_path / "a", tmp_path / "b"):
        (run_dir / "stages" / "0-sft" / "final").mkdir(parents=True)
        (run_dir / "config.yaml").write_text("name: x\n")
    stage_b = tmp_path / "b" / "stages" / "1-rl"
    source = tmp_path / "a" / "stages" / "0-sft" / "final"
    assert merged_base_dir(source, stage_b) == (tmp_path / "a" / "merged" / "stages--0-sft--final").resolve()
    outside = tmp_path / "elsewhere" / "checkpoint"
    outside.mkdir(parents=True)
    assert merged_base_dir(outside, stage_b).parent == (tmp_path / "b" / "merged").resolve()
