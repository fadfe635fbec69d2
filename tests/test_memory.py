"""Memory options: gradient checkpointing changes no loss or gradient, the dtype rule, 4-bit weights' errors,
and RL's reference log-probabilities without a copy on the device."""

from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from biopost.config import ConfigError, LoraConfig, RLStage, validate_config
from biopost.models import memory
from biopost.models.adapters import prepare_for_training
from biopost.models.device import resolve_dtype
from biopost.models.memory import checkpoint_in_eval_mode, enable_gradient_checkpointing
from biopost.models.policy import load_policy
from biopost.stages import rl
from biopost.stages.context import StageContext
from biopost.stages.grpo import grpo_loss
from biopost.stages.trainer import training_arguments

pytestmark = pytest.mark.usefixtures("one_thread")


def rollouts(policy, task, examples, seed=0):
    torch.manual_seed(seed)
    stage = RLStage(num_generations=2, max_completion_length=8)
    return rl.rollout(policy, task, examples, stage)


def policy_for(path, tmp_path, lora: bool):
    policy = prepare_for_training(load_policy(path), LoraConfig(rank=4, alpha=8.0, dropout=0.0) if lora else None,
                                  tmp_path)
    if lora:  # B != 0, so the adapter's gradients flow through every layer
        with torch.no_grad():
            for name, param in policy.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.3)
    return policy


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_backbone, pbmc_task, pbmc_splits, tmp_path,
                                                                   lora):
    """The RL loss's forward and backward with and without checkpointing (eval mode, as RL runs): same loss,
    same gradients; and the checkpointed layers really run their forward again in the backward pass."""
    plain = policy_for(tiny_backbone, tmp_path, lora)
    plain.model.eval()
    batch = rollouts(plain, pbmc_task, list(pbmc_splits.train)[:2])
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed.model)
    checkpointed.model.eval()
    checkpoint_in_eval_mode(checkpointed.model)

    def loss_and_grads(policy):
        calls = []
        # the first module inside the first layer (hooks on the checkpointed layer itself stay outside the
        # recompute, and the recompute may stop early, before later modules run)
        first = next(m for n, m in policy.model.named_modules() if n.endswith("layers.0.input_layernorm"))
        hook = first.register_forward_pre_hook(lambda *a: calls.append(1))
        logps, _ = rl.sequence_logps(policy, batch, 1.0)
        advantages = torch.tensor([1.0, -0.5, 0.5, 0.25])
        loss, _ = grpo_loss(logps, logps.detach(), None, advantages, batch.mask)
        loss.backward()
        hook.remove()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, len(calls)

    loss_a, grads_a, calls_a = loss_and_grads(plain)
    loss_b, grads_b, calls_b = loss_and_grads(checkpointed)
    assert (calls_a, calls_b) == (1, 2)  # recomputed in the backward pass: checkpointing is on
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys() and grads_a
    assert any(float(g.abs().sum()) > 0 for g in grads_a.values())
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_stages_checkpoint_when_the_model_says_so(fast_config, tmp_path):
    raw = fast_config()
    raw["model"]["gradient_checkpointing"] = True
    config = validate_config(raw)
    ctx = SimpleNamespace(stage=config.stages[0], stage_dir=tmp_path, device="cpu", dtype="float32", config=config)
    args = training_arguments(ctx, total=4, every=2)
    assert args.activation_checkpointing is True and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert training_arguments(SimpleNamespace(**{**vars(ctx), "dtype": "bfloat16"}), total=4, every=2).bf16


def test_dtype_auto_is_bfloat16_on_gpus_that_have_it_else_float32(monkeypatch):
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float16", "cpu") == "float16"  # an explicit choice is kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == "float32"
    assert validate_config({"task": {"name": "cell_type/pbmc68k"}, "stages": [{"kind": "sft"}]}).model.dtype == "auto"


def test_stages_load_weights_in_the_resolved_dtype(fast_config, tiny_backbone):
    config = validate_config({**fast_config(), "model": {"backbone": str(tiny_backbone), "dtype": "bfloat16"}})
    ctx = SimpleNamespace(config=config, device="cpu", dtype="bfloat16")
    policy = StageContext.load_policy(ctx, tiny_backbone)
    assert next(policy.model.parameters()).dtype == torch.bfloat16
    auto = SimpleNamespace(config=config.model_copy(update={"model": config.model.model_copy(update={"dtype": "auto"})}),
                           device="cpu")
    assert StageContext.dtype.fget(auto) == "float32"


def hide(monkeypatch, module: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


def test_four_bit_weights_are_refused_in_one_line_where_they_cannot_run(fast_config, monkeypatch):
    memory.check_quantization(None, "cpu")  # nothing asked, nothing checked
    with pytest.raises(ConfigError, match="CUDA GPU only"):
        memory.check_quantization("4bit", "cpu")
    hide(monkeypatch, "bitsandbytes")
    with pytest.raises(ConfigError, match=r"needs bitsandbytes.*pip install 'biopost\[qlora\]'"):
        memory.check_quantization("4bit", "cuda")
    raw = fast_config()
    raw["model"]["quantization"] = "4bit"
    raw["stages"][0]["lora"] = "full"
    with pytest.raises(ConfigError, match="stage sft needs a LoRA adapter"):
        validate_config(raw)
    raw["stages"][0]["lora"] = "inherit"
    assert validate_config(raw).model.quantization == "4bit"


def test_four_bit_loading_asks_transformers_for_nf4():
    config = memory.quantization_config("4bit", "bfloat16")
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert memory.quantization_config(None, "float32") is None


def test_reference_on_the_cpu_gives_the_copy_s_kl(tiny_backbone, pbmc_task, pbmc_splits, tmp_path):
    """Full fine-tuning: the reference kept on the CPU and moved in per batch scores as the on-device copy does,
    and is back on the CPU afterwards; ``none`` computes nothing."""
    policy = policy_for(tiny_backbone, tmp_path, lora=False)
    policy.model.eval()
    copied = rl.Reference.of(policy, tiny_backbone, "new", "copy")
    offloaded = rl.Reference.of(policy, tiny_backbone, "new", "cpu_offload")
    assert rl.Reference.of(policy, tiny_backbone, "new", "none").logps(policy, None, 1.0) is None
    with torch.no_grad():  # the policy moves away from its start
        for param in policy.model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    batch = rollouts(policy, pbmc_task, list(pbmc_splits.train)[:2])
    logps, _ = rl.sequence_logps(policy, batch, 1.0)
    advantages = torch.zeros(len(batch.examples))
    kl = {}
    for name, reference in {"copy": copied, "cpu_offload": offloaded}.items():
        _, stats = grpo_loss(logps, logps, reference.logps(policy, batch, 1.0), advantages, batch.mask, beta=0.1)
        kl[name] = stats["kl"]
    assert kl["copy"] > 0 and kl["cpu_offload"] == pytest.approx(kl["copy"], rel=1e-6)
    assert offloaded.frozen.device.type == "cpu"
    lora = policy_for(tiny_backbone, tmp_path / "lora", lora=True)
    assert rl.Reference.of(lora, tiny_backbone, "new", "cpu_offload").frozen is None  # adapters need no copy


def test_reference_none_needs_no_kl_term():
    with pytest.raises(ValueError, match="reference: none leaves nothing"):
        RLStage(reference="none", beta=0.01)
    assert RLStage(reference="none", beta=0.0).reference == "none"


def test_rl_layers_recompute_at_every_optimise_after_evaluations(fast_config, tmp_path, monkeypatch):
    """Evaluation puts the model in eval mode and back: RL's checkpointed layers (training flag set alone, under a
    policy in eval mode) must still recompute in every optimiser step after it, including after eval_at_start."""
    from biopost.pipeline import run

    ratios, real = [], rl.optimise

    def counted(policy, *args, **kwargs):
        calls = {"embed": 0, "layer": 0}
        base = policy.model.get_base_model()
        hooks = [base.get_input_embeddings().register_forward_pre_hook(lambda *a: calls.__setitem__("embed", calls["embed"] + 1)),
                 base.model.layers[0].input_layernorm.register_forward_pre_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))]
        try:
            return real(policy, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            ratios.append(calls["layer"] / calls["embed"])  # 2: the layer's forward ran again in the backward pass

    monkeypatch.setattr(rl, "optimise", counted)
    raw = fast_config()
    raw["model"]["gradient_checkpointing"] = True
    raw["eval"].update(splits=["val"], max_examples=2, max_new_tokens=4)
    raw["stages"] = [{"kind": "rl", "max_steps": 3, "prompts_per_step": 1, "num_generations": 2,
                      "max_completion_length": 4, "eval_every_steps": 1, "eval_at_start": True}]
    run(validate_config(raw), tmp_path / "run")
    assert ratios == [2.0, 2.0, 2.0]


def test_a_stage_s_old_gradient_checkpointing_key_names_where_it_moved(fast_config):
    raw = fast_config()
    raw["stages"][0]["gradient_checkpointing"] = True
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    message = str(err.value)
    assert "\n" not in message and "'stages.0.gradient_checkpointing' moved to model.gradient_checkpointing" in message


def test_memory_settings_leave_the_run_id_as_it_was(fast_config):
    """Following an out-of-memory advice resumes the same run: memory-only settings are not its identity."""
    raw = fast_config()
    raw["stages"] = [{"kind": "rl", "init": "base", "max_steps": 1}]
    base = validate_config(raw).run_id()
    variants = [
        ("model", {"gradient_checkpointing": True}),
        ("eval", {"generation": {"backend": "transformers", "gpu_memory_utilization": 0.5, "max_model_len": 512}}),
        ("stage", {"reference": "cpu_offload"}),
        ("stage", {"generation": {"gpu_memory_utilization": 0.6, "max_model_len": 256}}),
    ]
    for where, change in variants:
        other = copy.deepcopy(raw)
        (other["stages"][0] if where == "stage" else other[where]).update(change)
        assert validate_config(other).run_id() == base, change
    for where, change in [("stage", {"lr": 1e-3}), ("stage", {"reference": "none", "beta": 0.0}),
                          ("eval", {"generation": {"backend": "vllm"}})]:  # these do change results
        other = copy.deepcopy(raw)
        (other["stages"][0] if where == "stage" else other[where]).update(change)
        assert validate_config(other).run_id() != base, change


def test_a_run_resumes_only_on_the_dtype_it_started_with(fast_config, tmp_path):
    """dtype auto resolves per machine: env.json records the resolved dtype, and a resume resolving another one
    is refused in one line naming the fix."""
    import json

    from biopost.pipeline import claim_run_dir

    config = validate_config(fast_config())  # dtype auto: float32 on this CPU machine
    claim_run_dir(config, tmp_path)
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["dtype"] == "float32"
    claim_run_dir(config, tmp_path)  # the same machine resumes
    (tmp_path / "env.json").write_text(json.dumps({**env, "dtype": "bfloat16"}))  # as a GPU machine records it
    with pytest.raises(ConfigError, match=r"bfloat16 weights .* set model.dtype: bfloat16 to resume") as err:
        claim_run_dir(config, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reference_none_computes_no_reference_and_logs_no_kl(fast_config, tmp_path, monkeypatch, lora):
    """reference: none (beta 0) is honoured with or without an adapter: no reference log-probs are computed, and
    the kl row says nothing was measured (None) rather than 0.0."""
    from biopost.pipeline import run
    from biopost.runlog import read_metrics

    scored = []
    real = rl.Reference.logps
    monkeypatch.setattr(rl.Reference, "logps", lambda self, *a: scored.append(self.kind) or real(self, *a))
    raw = fast_config()
    if not lora:
        raw["model"]["lora"] = None
    raw["eval"].update(splits=["val"], max_examples=2, max_new_tokens=4)
    raw["stages"] = [{"kind": "rl", "max_steps": 2, "prompts_per_step": 1, "num_generations": 2, "beta": 0.0,
                      "reference": "none", "max_completion_length": 4, "eval_every_steps": 2, "eval_at_start": False}]
    run_dir = run(validate_config(raw), tmp_path / "run")
    assert scored == ["none", "none"]
    kl = [r["value"] for r in read_metrics(run_dir) if r["split"] == "train" and r["metric"] == "kl"]
    assert kl == [None, None]
