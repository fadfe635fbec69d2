"""Generation backends: what samples completions for the evaluator and the RL rollouts.

One small interface, :meth:`generate` (a left-padded prompt batch, its payloads and the :class:`Sampling`
settings -> new token ids, right-padded with the pad token) and :meth:`sync` (make the engine's weights the
policy's current ones). Callers decode, mask and score the ids the same way whichever backend made them.

- ``transformers`` (default): ``Policy.generate``, batched with left padding and a KV cache; it samples from
  the live policy, so there is nothing to sync.
- ``vllm`` (optional extra ``biopost[vllm]``, CUDA only): a vLLM engine holding its own copy of the weights,
  run in this process as TRL's colocate mode runs it (``distributed_executor_backend="external_launcher"``,
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one engine per launched process). A fused model's prompts go in as
  prompt embeddings (vLLM's ``enable_prompt_embeds``); text-only prompts as token ids. LoRA is served as merged
  weights: after every optimiser step :meth:`VLLMBackend.sync` hands the policy's merged parameters to the
  in-process model's ``load_weights`` (no copy through another process, which vLLM's default multiprocess
  engine would refuse for a Python callable) and drops the engine's prefix cache, computed with the old weights.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from biopost.config import ConfigError, GenerationConfig
from biopost.environ import temporary_environ
from biopost.sampling import PerRowSampler

VLLM_EXTRA = "pip install 'biopost[vllm]'"


@dataclass(frozen=True)
class Sampling:
    """Decoding settings, whatever the backend. ``num_samples`` completions per prompt, consecutive in the output."""

    max_new_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    seed: int | None = None  # vLLM's per-request seed; transformers samples from torch's RNG, owned by the caller
    # one seed per output sequence (RL under a launcher, biopost.sampling): rollouts then do not depend on how
    # a step's batch is split over processes
    row_seeds: tuple[int, ...] | None = None


class TransformersBackend:
    """``Policy.generate``: the live policy, batched, left-padded, with a KV cache."""

    per_row_seeds = False  # rollouts sample from torch's RNG unless launched (biopost.sampling)

    def generate(self, policy, input_ids, attention_mask, payloads, sampling: Sampling) -> torch.Tensor:
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy, use_cache=True)
        if sampling.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if sampling.num_samples > 1:
            kwargs["num_return_sequences"] = sampling.num_samples
        if sampling.row_seeds is not None:
            kwargs["logits_processor"] = LogitsProcessorList([PerRowSampler(
                list(sampling.row_seeds), policy.device, sampling.temperature, sampling.top_p, sampling.top_k)])
        return policy.generate(input_ids, attention_mask, payloads, **kwargs)

    def sync(self, policy) -> None:
        """Nothing to do: generation reads the policy's own weights."""


class VLLMBackend:
    """A vLLM engine (``vllm.LLM`` in this process, or anything with its ``generate`` / ``reset_prefix_cache`` and
    ``llm_engine.model_executor.driver_worker``) fed with the policy's prompts and kept in step with its weights
    by :meth:`sync`."""

    # RL rollouts: every sequence is its own request with its own seed (stage seed, step, row), so they follow the
    # stage's seed (not the evaluator's engine seed) and do not depend on how processes split a step's batch
    per_row_seeds = True

    def __init__(self, engine, sampling_params=None):
        self.engine = engine
        self.sampling_params = sampling_params or vllm_sampling_params  # replaced in tests (no vllm import)

    def generate(self, policy, input_ids, attention_mask, payloads, sampling: Sampling) -> torch.Tensor:
        options = dict(stop_token_ids=[policy.end_of_turn_id],
                       suppress=sorted(getattr(policy, "placeholder_ids", {}).values()))
        if sampling.row_seeds is None:
            params = self.sampling_params(sampling, **options)
        else:  # one request per sequence (the prompts come repeated), each with its row's seed
            if sampling.num_samples != 1 or len(sampling.row_seeds) != len(input_ids):
                raise ValueError("row_seeds need one prompt row per sequence (num_samples 1)")
            params = [self.sampling_params(replace(sampling, seed=seed, row_seeds=None), **options)
                      for seed in sampling.row_seeds]
        outputs = self.engine.generate(engine_prompts(policy, input_ids, attention_mask, payloads), params,
                                       use_tqdm=False)
        rows = [list(sample.token_ids) for request in outputs for sample in request.outputs]
        return right_padded(rows, policy.tokenizer.pad_token_id, input_ids.device)

    def sync(self, policy) -> None:
        """Load the policy's current (merged) weights into the engine's model, then forget cached prefixes."""
        model = self.engine.llm_engine.model_executor.driver_worker.model_runner.model  # in this process
        with engine_weights(policy) as weights:
            model.load_weights(weights=weights)
        self.engine.reset_prefix_cache()


def engine_prompts(policy, input_ids, attention_mask, payloads) -> list[dict]:
    """vLLM's inputs: each prompt's tokens without its left padding, or for a fused model (payloads) its input
    embeddings with the encoder features spliced in (``Policy.embed``), one (length, hidden) tensor each."""
    keep = attention_mask.bool()
    if payloads:
        with torch.no_grad():
            embeds = policy.embed(input_ids, payloads)
        return [{"prompt_embeds": embeds[i][keep[i]].detach().cpu()} for i in range(len(input_ids))]
    return [{"prompt_token_ids": input_ids[i][keep[i]].tolist()} for i in range(len(input_ids))]


def right_padded(rows: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Token id lists as one tensor padded on the right with ``pad_id`` (what ``Policy.generate`` returns).

    >>> right_padded([[5, 6, 7], [8]], 0, "cpu").tolist()
    [[5, 6, 7], [8, 0, 0]]
    """
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device)


@contextmanager
def engine_weights(policy):
    """(name, tensor) pairs of the policy's language model as its Hugging Face checkpoint names them, a LoRA
    adapter merged in: the state dict an engine loaded from the plain model expects. Valid inside the block only
    (peft's merge is undone after it, leaving the trained adapter as it was); the tensors are the policy's own."""
    model = policy.model
    if not policy.is_adapter:
        yield [(name, param.detach()) for name, param in model.named_parameters()]
        return
    model.merge_adapter()
    try:
        yield [(plain_name(name), param.detach()) for name, param in model.named_parameters() if not adapter_only(name)]
    finally:
        model.unmerge_adapter()


def plain_name(name: str) -> str:
    """A peft parameter name as the plain model names it.

    >>> plain_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    >>> plain_name("base_model.model.model.embed_tokens.token_adapter.base_layer.weight")
    'model.embed_tokens.weight'
    """
    name = name.removeprefix("base_model.model.")
    return name.replace(".token_adapter.base_layer", "").replace(".base_layer", "").replace(".modules_to_save.default", "")


def adapter_only(name: str) -> bool:
    """Parameters that exist only in the adapter (merged into the base weights) or as peft's saved originals."""
    return any(key in name for key in ("lora_", "trainable_tokens_", "original_module"))


def vllm_sampling_params(sampling: Sampling, stop_token_ids: list[int], suppress: list[int]):
    """vLLM's ``SamplingParams`` for :class:`Sampling` (greedy is temperature 0; top_k -1 keeps all tokens)."""
    from vllm import SamplingParams

    bias = {token: -100.0 for token in suppress} or None  # a fused model's placeholders are never sampled
    return SamplingParams(n=sampling.num_samples, max_tokens=sampling.max_new_tokens,
                          temperature=0.0 if sampling.greedy else sampling.temperature,
                          top_p=1.0 if sampling.greedy else sampling.top_p,
                          top_k=-1 if sampling.greedy or sampling.top_k == 0 else sampling.top_k,
                          seed=sampling.seed, stop_token_ids=stop_token_ids, logit_bias=bias, detokenize=False)


def check_backend(cfg: GenerationConfig, where: str, other: str = "use backend: transformers",
                  setting: str | None = None) -> None:
    """A one-line config error when vLLM is asked for but is not installed. ``setting``: what asked for it
    (default ``<where>.generation.backend``); ``other``: how to choose the transformers backend instead."""
    if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{setting or where + '.generation.backend'}: vllm, but vllm is not installed: {VLLM_EXTRA} "
                          f"(CUDA GPUs only), or {other}")


def check_backends(config) -> None:
    """Every backend a run config asks for (the evaluator's, each RL stage's) is installed."""
    check_backend(config.eval.generation, "eval")
    for index, stage in enumerate(config.stages):
        if stage.kind == "rl":
            check_backend(stage.generation, f"stages.{index}")


def make_backend(cfg: GenerationConfig, policy, workdir: Path, seed: int = 0, where: str = "eval"):
    """The backend ``cfg`` names, ready for ``policy`` (a vLLM engine is built and synced here)."""
    if cfg.backend == "transformers":
        return TransformersBackend()
    check_backend(cfg, where)
    with engine_environment():  # the engine reads them once, as it starts
        engine = start_engine(cfg, policy, Path(workdir) / "vllm-model", seed)
    backend = VLLMBackend(engine)
    backend.sync(policy)
    return backend


def engine_env() -> dict[str, str]:
    """Environment of an in-process vLLM engine, as TRL's colocate mode sets it: the engine core in this process
    (its model reachable for :meth:`VLLMBackend.sync`), and the torch.distributed rank / world of the launcher
    (or a one-process world) for the ``external_launcher`` executor."""
    from biopost import distributed

    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "RANK": str(distributed.rank()),
           "WORLD_SIZE": str(distributed.world_size()), "LOCAL_RANK": os.environ.get("LOCAL_RANK", "0"),
           "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1")}
    env["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
    return env


@contextmanager
def engine_environment():
    """:func:`engine_env` set while the engine starts. The torch.distributed world variables then get the caller's
    values back: a one-process run must not look launched afterwards (a later run in this process, or a Ray worker
    it starts, would open a process group on a stale port). The engine's own switch stays for its later calls."""
    env = engine_env()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    with temporary_environ(env):
        yield


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_engine(cfg: GenerationConfig, policy, model_dir: Path, seed: int):
    """A vLLM engine (``vllm.LLM``) for the policy's architecture. The merged model is saved to ``model_dir``
    for the engine to read its config, tokenizer and first weights (the weights file is deleted once read); the
    caller syncs the live weights after every optimiser step."""
    from safetensors.torch import save_file
    from vllm import LLM

    plain = policy.model.get_base_model() if policy.is_adapter else policy.model
    model_dir.mkdir(parents=True, exist_ok=True)
    plain.config.save_pretrained(model_dir)
    with engine_weights(policy) as weights:
        save_file({name: tensor.to("cpu", copy=True).contiguous() for name, tensor in weights},
                  model_dir / "model.safetensors", metadata={"format": "pt"})
    policy.tokenizer.save_pretrained(model_dir)
    dtype = str(next(policy.model.parameters()).dtype).removeprefix("torch.")
    # eager mode: the driver worker's model_runner.model is the plain module whose load_weights the sync calls;
    # external_launcher: one engine per process of the run (TRL's colocate mode), in this process
    engine = LLM(model=str(model_dir), dtype=dtype, seed=seed, gpu_memory_utilization=cfg.gpu_memory_utilization,
                 max_model_len=cfg.max_model_len, enable_prompt_embeds=bool(policy.modalities), enforce_eager=True,
                 distributed_executor_backend="external_launcher")
    (model_dir / "model.safetensors").unlink(missing_ok=True)  # read once; from now on the weights come by sync
    return engine
