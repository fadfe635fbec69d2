"""Generation backends: the transformers default, and the vLLM backend's plumbing and weight sync checked against
a fake engine with vLLM's surface (``generate``, ``reset_prefix_cache``, the in-process
``llm_engine.model_executor.driver_worker``, and ``collective_rpc`` refusing callables as the multiprocess engine's
msgpack does): vllm itself is a GPU-only extra and is never imported here."""

from __future__ import annotations

import copy
import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

from biopost.cli import main
from biopost.config import ConfigError, EvalConfig, GenerationConfig, validate_config
from biopost.evaluation import encode_prompts, evaluate
from biopost.models import generation
from biopost.models.adapters import prepare_for_training
from biopost.models.generation import Sampling, TransformersBackend, VLLMBackend, engine_prompts, engine_weights
from biopost.models.policy import load_policy
from biopost.models.weights import merged
from biopost.pipeline import run
from biopost.runlog import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeEngine:
    """vLLM's ``LLM`` surface on a plain transformers copy of the model, loaded once from disk and afterwards
    changed only through the in-process model's ``load_weights``, as a real engine's weights are. As in vLLM v1,
    that model is reachable only when the engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), and
    ``collective_rpc`` refuses a Python callable (the multiprocess engine cannot serialize one)."""

    def __init__(self, path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.syncs, self.cache_resets, self.prompts, self.seeds = 0, 0, [], []

    @property
    def llm_engine(self):
        assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0", "the engine core runs in another process"
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self.load_weights))
        return SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)))

    def load_weights(self, weights):
        params = dict(self.model.named_parameters())
        names = [name for name, _ in weights]
        assert set(names) == set(params), sorted(set(names) ^ set(params))  # every weight, under the engine's names
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
        self.syncs += 1

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if callable(method):
            raise TypeError("Object of type function is not serializable (VLLM_ALLOW_INSECURE_SERIALIZATION)")
        raise NotImplementedError(method)

    def reset_prefix_cache(self):
        self.cache_resets += 1

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=True):
        per_request = params if isinstance(params, list) else [params] * len(prompts)
        assert len(per_request) == len(prompts)
        self.prompts += prompts
        outputs = []
        for prompt, (sampling, options) in zip(prompts, per_request):
            self.seeds.append(sampling.seed)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            if "prompt_embeds" in prompt:
                inputs = {"inputs_embeds": prompt["prompt_embeds"][None]}
            else:
                inputs = {"input_ids": torch.tensor([prompt["prompt_token_ids"]])}
            samples = []
            for _ in range(sampling.num_samples):
                out = self.model.generate(**inputs, max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
                                          eos_token_id=options["stop_token_ids"], pad_token_id=0,
                                          **({} if sampling.greedy else {"temperature": sampling.temperature}))
                new = out[0] if "prompt_embeds" in prompt else out[0, inputs["input_ids"].shape[1]:]
                ids = new.tolist()
                stop = next((i for i, t in enumerate(ids) if t in options["stop_token_ids"]), len(ids) - 1)
                samples.append(SimpleNamespace(token_ids=ids[: stop + 1]))
            outputs.append(SimpleNamespace(outputs=samples))
        return outputs


@pytest.fixture(autouse=True)
def engine_env_restored(monkeypatch):
    """The backend sets the in-process engine's environment (generation.engine_env): restored after each test."""
    for key in generation.engine_env():
        monkeypatch.setenv(key, "")  # recorded, so an absent variable is absent again afterwards
        monkeypatch.delenv(key)


def fake_backend(engine) -> VLLMBackend:
    os.environ.update(generation.engine_env())  # what make_backend sets before an engine starts
    return VLLMBackend(engine, sampling_params=lambda sampling, **options: (sampling, options))


def lora_policy(path, tmp_path, seed=0):
    """A LoRA policy whose adapter is not the identity (B != 0), so merged weights differ from the base."""
    from biopost.config import LoraConfig

    policy = prepare_for_training(load_policy(path), LoraConfig(rank=4, alpha=8.0, dropout=0.0), tmp_path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return policy


def test_sync_loads_the_merged_policy_and_leaves_the_adapter_as_it_was(tiny_backbone, tmp_path):
    policy = lora_policy(tiny_backbone, tmp_path)
    engine = FakeEngine(tiny_backbone)
    adapter_before = {k: v.clone() for k, v in policy.model.named_parameters() if "lora_" in k}
    ids = torch.tensor([[3, 4, 5, 6]])
    logits_before = policy.model(input_ids=ids).logits

    fake_backend(engine).sync(policy)

    want = merged(copy.deepcopy(policy)).model.state_dict()
    for name, tensor in engine.model.state_dict().items():
        torch.testing.assert_close(tensor, want[name], msg=name)
    assert engine.syncs == 1 and engine.cache_resets == 1  # prefixes cached with the old weights are dropped
    assert policy.is_adapter and all(torch.equal(v, adapter_before[k]) for k, v in policy.model.named_parameters()
                                     if "lora_" in k)
    torch.testing.assert_close(policy.model(input_ids=ids).logits, logits_before)  # unmerged again
    torch.testing.assert_close(engine.model(input_ids=ids).logits, logits_before, rtol=1e-4, atol=1e-5)


def test_sync_after_an_optimiser_step_follows_the_policy(tiny_backbone, tmp_path):
    """Full fine-tuning: the engine holds the old weights until synced, the new ones after."""
    policy = prepare_for_training(load_policy(tiny_backbone), None, tmp_path)
    engine = FakeEngine(tiny_backbone)
    backend = fake_backend(engine)
    backend.sync(policy)
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.5)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    policy.model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    before = engine.model(input_ids=ids).logits
    assert not torch.allclose(before, policy.model(input_ids=ids).logits)
    backend.sync(policy)
    torch.testing.assert_close(engine.model(input_ids=ids).logits, policy.model(input_ids=ids).logits)
    with engine_weights(policy) as weights:
        assert [name for name, _ in weights] == [name for name, _ in policy.model.named_parameters()]


def test_vllm_backend_sends_unpadded_prompts_and_returns_what_transformers_returns(tiny_backbone, pbmc_task,
                                                                                   pbmc_splits, tmp_path):
    """Greedy: the same new tokens, right-padded alike, from a left-padded batch of prompts of unequal length."""
    policy = lora_policy(tiny_backbone, tmp_path)
    policy.model.eval()
    engine = FakeEngine(tiny_backbone)
    backend = fake_backend(engine)
    backend.sync(policy)
    examples = list(pbmc_splits.val)[:4]
    texts = [policy.render_prompt(pbmc_task.messages(e)) for e in examples]
    enc = encode_prompts(policy, texts)
    assert (enc["attention_mask"] == 0).any()  # some prompts are padded on the left
    sampling = Sampling(max_new_tokens=12)

    ours = backend.generate(policy, enc["input_ids"], enc["attention_mask"], {}, sampling)

    assert [p["prompt_token_ids"] for p in engine.prompts] == policy.tokenize(texts)
    rows = [TransformersBackend().generate(policy, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), {},
                                           sampling)[0] for ids in policy.tokenize(texts)]
    assert [policy.decode(row) for row in ours] == [policy.decode(row) for row in rows]
    pad, eot = policy.tokenizer.pad_token_id, policy.end_of_turn_id
    for row in ours.tolist():  # right padding after end-of-turn, as Policy.generate pads
        if eot in row:
            assert all(t == pad for t in row[row.index(eot) + 1:])


def test_fused_prompts_go_in_as_embeddings_without_padding():
    """A fused model's prompts reach the engine as its own input embeddings (features spliced in), one
    (length, hidden) tensor per prompt with the left padding cut off."""
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    policy = SimpleNamespace(embed=lambda input_ids, payloads: input_ids.float()[..., None].repeat(1, 1, 3) + 0.5)
    prompts = engine_prompts(policy, ids, mask, {"cell": ["a", "b"]})
    assert [p["prompt_embeds"].shape for p in prompts] == [(2, 3), (4, 3)]
    assert prompts[0]["prompt_embeds"][:, 0].tolist() == [5.5, 6.5]
    assert "prompt_token_ids" in engine_prompts(policy, ids, mask, {})[0]


def test_evaluator_scores_the_same_through_either_backend(tiny_backbone, pbmc_task, pbmc_splits, tmp_path):
    policy = lora_policy(tiny_backbone, tmp_path)
    engine = FakeEngine(tiny_backbone)
    backend = fake_backend(engine)
    backend.sync(policy)
    cfg = EvalConfig(max_examples=6, batch_size=3, max_new_tokens=10, bootstrap=20)
    splits = {"val": list(pbmc_splits.val)}
    rows_hf, records_hf = evaluate(policy, pbmc_task, splits, cfg)
    rows_vllm, records_vllm = evaluate(policy, pbmc_task, splits, cfg, backend)
    assert [r["completions"] for r in records_vllm["val"]] == [r["completions"] for r in records_hf["val"]]
    assert rows_vllm == rows_hf
    assert len(engine.prompts) == 6


def test_rl_stage_syncs_the_engine_after_every_optimiser_step(fast_config, tmp_path, monkeypatch):
    """An RL stage with generation.backend vllm (the evaluator too): rollouts and evaluations come from the engine,
    which is synced once at the start and after every optimiser step, and ends holding the final policy."""
    engines = []

    def start(cfg, policy, model_dir, seed):
        engines.append(FakeEngine(policy.base_path))
        return engines[-1]

    monkeypatch.setattr(generation, "check_backend", lambda cfg, where: None)  # vllm "installed"
    monkeypatch.setattr(generation, "start_engine", start)
    monkeypatch.setattr(generation, "vllm_sampling_params", lambda sampling, **options: (sampling, options))
    raw = fast_config()
    raw["eval"].update(splits=["val"], max_examples=4, max_new_tokens=8, generation={"backend": "vllm"})
    raw["stages"] = [{"kind": "rl", "init": "base", "max_steps": 3, "prompts_per_step": 2, "num_generations": 2,
                      "max_completion_length": 8, "lr": 1e-2, "eval_every_steps": 3, "eval_at_start": True,
                      "generation": {"backend": "vllm"}, "schedule": {"name": "constant", "warmup_ratio": 0.0}}]
    run_dir = run(validate_config(raw), tmp_path / "run")

    (engine,) = engines  # one engine serves the rollouts and the evaluator
    rollouts = 3 * 2 * 2
    evaluated = [r for r in read_metrics(run_dir) if r["split"] == "val" and r["metric"] == "accuracy"]
    assert len(evaluated) == 2 and len(engine.prompts) == rollouts + 2 * 4
    assert engine.syncs == 1 + 3 + 2  # at the start, after each of 3 steps, before each of 2 evaluations
    final = load_policy(run_dir / "stages" / "0-rl" / "final")
    want = merged(final).model.state_dict()
    for name, tensor in engine.model.state_dict().items():
        torch.testing.assert_close(tensor, want[name], msg=name)


def hide(monkeypatch, module: str) -> None:
    """Make ``module`` look uninstalled (as vllm and bitsandbytes are on CPU machines)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


def test_requesting_vllm_without_it_is_one_clear_error(fast_config, tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "vllm")
    with pytest.raises(ConfigError, match=r"pip install 'biopost\[vllm\]'"):
        generation.check_backend(GenerationConfig(backend="vllm"), "eval")
    generation.check_backend(GenerationConfig(), "eval")  # transformers needs nothing more

    from biopost.config import write_yaml

    raw = fast_config()
    raw["stages"] = [{"kind": "rl", "init": "base", "max_steps": 1, "generation": {"backend": "vllm"}}]
    config = tmp_path / "c.yaml"
    write_yaml(raw, config)
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "stages.0.generation.backend: vllm" in err and "pip install 'biopost[vllm]'" in err
    assert not (tmp_path / "run" / "stages").exists()  # refused before anything ran


def test_transformers_backend_batches_left_padded_with_a_kv_cache(tiny_backbone, pbmc_task, pbmc_splits, monkeypatch):
    """The default path: the evaluator and the rollouts each call ``generate`` once per batch, on prompts padded
    on the left (new tokens append on the right), with the KV cache on."""
    from biopost.config import RLStage
    from biopost.evaluation import generate_completions
    from biopost.stages import rl

    policy = load_policy(tiny_backbone)
    calls = []
    real = policy.model.generate

    def recording(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(policy.model, "generate", recording)
    examples = list(pbmc_splits.val)[:5]
    generate_completions(policy, pbmc_task, examples, EvalConfig(batch_size=3, max_new_tokens=4))
    rl.rollout(policy, pbmc_task, examples[:3], RLStage(num_generations=2, max_completion_length=4))
    assert [len(c["input_ids"]) for c in calls] == [3, 2, 6]  # two evaluation batches, one batch of 3 x 2 rollouts
    assert all(c["use_cache"] for c in calls)
    for c in calls:
        mask = c["attention_mask"]
        assert bool(mask[:, -1].all()), "every prompt ends at the right edge: padding is on the left"
    assert any(bool((c["attention_mask"][:, 0] == 0).any()) for c in calls)  # prompts of unequal length were padded


def test_rollout_requests_carry_seeds_from_the_stage_seed(fast_config, tmp_path, monkeypatch):
    """vLLM rollouts: every sequence is its own request seeded by (stage seed, step, row), not by the engine's seed
    (the evaluator's, when the engine is shared), so they follow stages[i].seed as transformers rollouts do."""
    from biopost.sampling import row_seeds

    engines = []
    monkeypatch.setattr(generation, "check_backend", lambda cfg, where: None)
    monkeypatch.setattr(generation, "start_engine", lambda cfg, policy, model_dir, seed: engines.append(
        FakeEngine(policy.base_path)) or engines[-1])
    monkeypatch.setattr(generation, "vllm_sampling_params", lambda sampling, **options: (sampling, options))
    raw = fast_config()
    raw["eval"].update(splits=["val"], max_examples=2, max_new_tokens=4, seed=0, generation={"backend": "vllm"})
    raw["stages"] = [{"kind": "rl", "init": "base", "seed": 7, "max_steps": 2, "prompts_per_step": 2,
                      "num_generations": 2, "max_completion_length": 4, "eval_every_steps": 2,
                      "eval_at_start": False, "generation": {"backend": "vllm"}}]
    run(validate_config(raw), tmp_path / "run")
    (engine,) = engines
    assert engine.seeds[:8] == row_seeds(7, 0, range(4)) + row_seeds(7, 1, range(4))
    assert engine.seeds[8:] == [0, 0]  # the evaluator's requests keep eval.seed


def test_the_engine_starts_in_process_as_trl_colocates_it(tiny_backbone, tmp_path, monkeypatch):
    """start_engine asks vLLM for the external launcher's executor (the engine core in this process), after
    make_backend set VLLM_ENABLE_V1_MULTIPROCESSING=0 and a torch.distributed world for it."""
    import sys

    seen = {}

    def llm(**kwargs):
        seen.update(kwargs, env={k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "RANK", "WORLD_SIZE",
                                                                 "MASTER_PORT")})
        return FakeEngine(tiny_backbone)

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=llm))
    monkeypatch.setattr(generation, "check_backend", lambda cfg, where: None)
    policy = lora_policy(tiny_backbone, tmp_path)
    backend = generation.make_backend(GenerationConfig(backend="vllm"), policy, tmp_path)
    assert seen["distributed_executor_backend"] == "external_launcher" and seen["enforce_eager"]
    assert seen["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and seen["env"]["RANK"] == "0"
    assert seen["env"]["WORLD_SIZE"] == "1" and seen["env"]["MASTER_PORT"]
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)  # a one-process run does not look launched after
    assert backend.engine.syncs == 1 and not (tmp_path / "vllm-model" / "model.safetensors").exists()
    with pytest.raises(TypeError):  # what the multiprocess engine answers a function: the sync must not send one
        backend.engine.collective_rpc(lambda worker: None)


def test_a_vllm_evaluated_checkpoint_evaluates_and_predicts_with_backend_transformers(sft_run, pbmc_splits, tmp_path,
                                                                                      monkeypatch, capsys):
    """A checkpoint whose evaluator used vLLM: without vllm, eval / predict say to pass --backend transformers,
    which works; --backend vllm without vllm is refused the same way."""
    import json
    import shutil

    hide(monkeypatch, "vllm")
    checkpoint = tmp_path / "ck"
    shutil.copytree(sft_run.final, checkpoint)
    state_file = checkpoint / "biopost_checkpoint.json"
    state = json.loads(state_file.read_text())
    state["task"]["eval"]["generation"] = {"backend": "vllm"}
    state_file.write_text(json.dumps(state))
    cells = tmp_path / "cells.jsonl"
    cells.write_text(json.dumps({"id": "a", "genes": pbmc_splits.id_test[0].fields["genes"]}) + "\n")
    task = state["task"]["name"]
    eval_args = ["eval", str(checkpoint), "--task", task, "--splits", "val", "--max-examples", "2"]
    predict_args = ["predict", str(checkpoint), "--task", task, "--input", str(cells), "--max-new-tokens", "4"]
    for args, said in [(eval_args, "the checkpoint's eval.generation.backend: vllm"),
                       (predict_args, "the checkpoint's eval.generation.backend: vllm"),
                       (predict_args + ["--backend", "vllm"], "--backend: vllm")]:
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err and "pass --backend transformers" in err, err
    for args in (eval_args, predict_args):
        assert main(args + ["--backend", "transformers"]) == 0
        assert capsys.readouterr().out.strip()
