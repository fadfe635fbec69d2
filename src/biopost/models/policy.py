"""The one model class used identically by CPT, SFT, RL, evaluation and prediction.

A :class:`Policy` is a causal LM (optionally wrapped by a peft adapter) and its tokenizer. Stages and the
evaluator only call :meth:`Policy.embed`, :meth:`Policy.logits` and :meth:`Policy.generate`, which take
the batch's modality payloads too: a fused model (frozen encoder + projector) overrides ``embed`` and every
stage works with it unchanged.

Checkpoints are Hugging Face directories plus ``biopost_checkpoint.json``: ``kind`` is ``full`` (weights
saved) or ``adapter`` (a peft adapter on top of the full model at ``base``), and ``task`` holds what
prediction needs (task name, options, label set). Local paths inside the run directory (``base``, the
``backbone`` loaded first) are recorded relative to the checkpoint, so a run directory can be moved;
paths outside it stay absolute, hub ids stay as they are.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "biopost_checkpoint.json"
PROJECTOR_FILE = "projector.safetensors"  # a fused model's projectors (models/fusion.py)
PATH_KEYS = ("base", "backbone")  # checkpoint fields that may name a local directory
ENCODER_PATH_KEYS = ("gene_tokens", "gene_medians", "gene_symbols")  # a fused encoder's files (the run's medians)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    model: Any  # transformers PreTrainedModel or peft PeftModel
    tokenizer: Any
    base_path: Path | None = None  # full-weights directory an adapter applies to
    info: dict[str, Any] = field(default_factory=dict)
    modalities: tuple[str, ...] = ()  # payloads read through encoders; text-only models read none

    @property
    def is_adapter(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "Policy":
        """Place the model on ``device`` (a subclass moves whatever else it runs, e.g. encoders, too). 4-bit weights
        are placed on the GPU as they load and cannot move."""
        from biopost.models.memory import is_quantized

        if not is_quantized(self.model):
            self.model.to(device)
        return self

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn: a training target so models learn to stop."""
        return self.tokenizer.eos_token_id

    # ---- the three calls every stage uses
    def embed(self, input_ids: torch.Tensor, payloads: dict | None = None) -> torch.Tensor:
        """Input embeddings; fused models splice projected encoder features in here."""
        return self.model.get_input_embeddings()(input_ids)

    def logits(self, input_ids, attention_mask, payloads=None, keep_last: int = 0) -> torch.Tensor:
        """Next-token logits; ``keep_last > 0`` computes only the last positions (saves vocab-sized memory)."""
        if payloads:
            inputs = {"inputs_embeds": self.embed(input_ids, payloads)}
        else:
            inputs = {"input_ids": input_ids}
        # no KV cache: nothing generates from this forward, and the cache would hold every layer's keys and values
        return self.model(**inputs, attention_mask=attention_mask, logits_to_keep=keep_last, use_cache=False).logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, payloads=None, **kwargs) -> torch.Tensor:
        """New tokens only (prompt stripped), padded with the pad token after end-of-turn."""
        common = dict(
            attention_mask=attention_mask,
            eos_token_id=self.end_of_turn_id,
            pad_token_id=self.tokenizer.pad_token_id,
            **kwargs,
        )
        if payloads:
            out = self.model.generate(inputs_embeds=self.embed(input_ids, payloads), **common)
            return out  # with inputs_embeds, generate returns only new tokens
        out = self.model.generate(input_ids=input_ids, **common)
        return out[:, input_ids.shape[1]:]

    # ---- chat rendering and tokenization
    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def tokenize(self, texts: list[str], payloads: dict[str, list] | None = None) -> list[list[int]]:
        """Token ids of rendered prompts; every tokenization site goes through here (a fused policy expands
        its placeholders to the positions its projectors fill, from each row's ``payloads``)."""
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    # ---- trainable parts beside the LM: a fused model's projectors (text-only models have none)
    def projector_parameters(self) -> list:
        return []

    def projector_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_projector_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError("this policy has no projectors to load weights into")

    def set_projector_trainable(self, trainable: bool) -> None:
        pass

    def save_projector(self, path: Path) -> None:
        if state := self.projector_state():
            from safetensors.torch import save_file

            save_file(state, Path(path) / PROJECTOR_FILE)

    def load_projector(self, path: Path) -> None:
        if self.projector_state():
            from safetensors.torch import load_file

            self.load_projector_state(load_file(Path(path) / PROJECTOR_FILE, device=str(self.device)))

    def decode(self, ids: torch.Tensor) -> str:
        """Decode generated ids, stopping at end-of-turn and dropping padding."""
        ids = ids.tolist()
        if self.end_of_turn_id in ids:
            ids = ids[: ids.index(self.end_of_turn_id)]
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.decode([i for i in ids if i != pad], skip_special_tokens=False)

    # ---- persistence
    def save(self, path: Path, task_state: dict | None = None) -> Path:
        """Write the checkpoint under a temporary name, then rename it into place with a checksum manifest
        (biopost.durable): a kill never leaves a half-written checkpoint at ``path``."""
        from biopost.durable import publishing

        path = Path(path)
        with publishing(path) as tmp:
            self._save_into(tmp, path, task_state)
        return path

    def _save_into(self, path: Path, final: Path, task_state: dict | None) -> None:
        if self.is_adapter:  # only the trained adapter, not a frozen reference copy; the base is recorded below
            self.model.save_pretrained(path, selected_adapters=["default"], save_embedding_layers=False)
        else:
            self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        info = {"kind": "adapter" if self.is_adapter else "full", **self.info}
        if self.is_adapter:
            info["base"] = str(self.base_path)
            info["base_architecture"] = architecture(self.model.config)  # checked when the adapter is loaded
        info = map_paths(info, lambda value: recorded_path(value, final))  # relative to where it is published
        if task_state is not None:
            info["task"] = task_state
        (path / CHECKPOINT_FILE).write_text(json.dumps(info, indent=2))
        self.save_projector(path)


def run_root(path: Path) -> Path | None:
    """The run directory holding ``path`` (the nearest parent with a run's ``config.yaml`` and ``stages/``)."""
    for parent in [path, *path.parents]:
        if (parent / "config.yaml").is_file() and (parent / "stages").is_dir():
            return parent
    return None


def recorded_path(value: str, checkpoint: Path) -> str:
    """How ``checkpoint`` records a model location: relative to it ("../..") inside its run directory
    (rule 10: run directories move), absolute outside it, hub ids unchanged."""
    if not Path(value).expanduser().exists():
        return value
    target, checkpoint = Path(value).expanduser().resolve(), checkpoint.resolve()
    root = run_root(checkpoint)
    if root is None or not target.is_relative_to(root):
        return str(target)
    relative = os.path.relpath(target, checkpoint)
    return relative if relative.startswith(".") else f"./{relative}"


def map_paths(info: dict, convert) -> dict:
    """A copy of checkpoint ``info`` with each local path it records (:data:`PATH_KEYS`, and the fused encoders'
    :data:`ENCODER_PATH_KEYS`) passed through ``convert``."""
    info = {**info, **{key: convert(info[key]) for key in PATH_KEYS if key in info}}
    if "fusion" in info:
        encoders = {m: {**cfg, **{key: convert(cfg[key]) for key in ENCODER_PATH_KEYS if cfg.get(key)}}
                    for m, cfg in info["fusion"]["encoders"].items()}
        info["fusion"] = {**info["fusion"], "encoders": encoders}
    return info


def resolved_path(value: str, checkpoint: Path) -> str:
    """Inverse of :func:`recorded_path`: relative records are read against the checkpoint directory."""
    return str((checkpoint.resolve() / value).resolve()) if value.startswith(".") else value


def copy_checkpoint(source: Path, target: Path) -> Path:
    """Copy a checkpoint directory to ``target`` (published whole, with a fresh manifest), its recorded paths
    re-recorded from there (a relative path names the same model from the copy as from the original)."""
    from biopost import durable

    with durable.publishing(target) as tmp:  # beside target: relative paths recorded for target hold in tmp
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(durable.MANIFEST))
        marker = tmp / CHECKPOINT_FILE
        if marker.is_file():
            info = map_paths(json.loads(marker.read_text()),
                             lambda value: recorded_path(resolved_path(value, Path(source)), Path(target)))
            marker.write_text(json.dumps(info, indent=2))
    return Path(target)


def load_policy(source: str | Path, dtype: str = "float32", trainable_adapter: bool = False,
                revision: str | None = None, device: str | None = None, trust_remote_code: bool = False,
                base: str | Path | None = None, quantization: str | None = None) -> Policy:
    """Load a biopost checkpoint, a local Hugging Face directory, or a hub id (at ``revision``), placed on
    ``device`` (None: where transformers loads it, the CPU). Stages pass the run's one resolved device.

    A model's own code (``auto_map`` in its config) runs only with ``trust_remote_code`` (``model.trust_remote_code``
    in a run config, ``--trust-remote-code`` for eval / predict); otherwise loading it is a one-line error.
    ``base`` overrides where an adapter checkpoint's base model is (when it was moved away from the location
    the checkpoint records). ``quantization="4bit"``: the full weights load in 4-bit NF4 on the current CUDA device
    (``dtype`` is then the compute dtype), for a LoRA adapter on top (QLoRA)."""
    try:
        policy = _load_policy(source, dtype, trainable_adapter, revision, trust_remote_code, base, quantization)
    except ValueError as err:  # transformers' own refusal (an encoder's is already one line, and kept)
        if "`trust_remote_code=True`" not in str(err) or trust_remote_code:
            raise
        raise ValueError(f"model {str(source)!r} runs its own code: set model.trust_remote_code: true (eval / predict: "
                         "--trust-remote-code) only if you trust it") from None
    return policy.to(device) if device else policy


def _load_policy(source: str | Path, dtype: str, trainable_adapter: bool, revision: str | None,
                 trust_remote_code: bool, base: str | Path | None, quantization: str | None) -> Policy:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from biopost.models.memory import quantization_config

    weights = {"dtype": DTYPES[dtype]}
    if quantization is not None:
        weights.update(quantization_config=quantization_config(quantization, dtype),
                       device_map={"": torch.cuda.current_device()})

    path = Path(source).expanduser()
    marker = path / CHECKPOINT_FILE
    if marker.is_file():
        info = map_paths(json.loads(marker.read_text()), lambda value: resolved_path(value, path))
        if info["kind"] == "adapter":
            if base is None:
                base = info["base"]
                if base.startswith("/") and not Path(base).exists():
                    recorded = json.loads(marker.read_text())["base"]
                    raise FileNotFoundError(
                        f"adapter checkpoint {path} applies to the base model recorded as {recorded!r}, which is "
                        f"missing at {base}: put it back there or pass its location (--base PATH; load_policy(base=PATH))"
                    )
            under = load_policy(base, dtype, revision=info.get("revision"), trust_remote_code=trust_remote_code,
                                quantization=quantization)
            model = attach_adapter(under, path, info, trainable_adapter)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            policy = replace(under, model=model, tokenizer=tokenizer, base_path=Path(base), info=_kept(info))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **weights)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            policy = Policy(model, tokenizer, info=_kept(info))
        from biopost.models.fusion import attach_saved_fusion

        try:
            return attach_saved_fusion(policy, path, info)
        except RuntimeError as err:  # torch's size-mismatch report spans many lines
            raise ValueError(f"{path}: its projectors do not fit the model they are loaded into "
                             f"({str(err).strip().splitlines()[-1].strip()}); load the checkpoint with the backbone "
                             "and encoders it was trained with") from None
    looks_local = str(source).startswith(("/", ".", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model at {path}: expected a Hugging Face model directory (config.json) or a biopost checkpoint"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), revision=revision,
                                                     trust_remote_code=trust_remote_code, **weights)
        tokenizer = AutoTokenizer.from_pretrained(str(source), revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        from biopost.models.backbones import builtin_backbones

        raise FileNotFoundError(
            f"could not load backbone {source!r} ({err.__class__.__name__}): give a local model directory, a "
            f"reachable hub id, or a built-in backbone ({', '.join(builtin_backbones())})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Policy(model, tokenizer, info={"backbone": str(source), **({"revision": revision} if revision else {})})


def attach_adapter(base: Policy, path: Path, info: dict, trainable: bool):
    """The peft adapter at ``path`` on ``base``, refused in one line when ``base`` is not the model it was trained on."""
    from peft import PeftModel

    wanted, found = info.get("base_architecture"), architecture(base.model.config)
    if wanted and wanted != found:
        diff = ", ".join(f"{k} {wanted.get(k)} vs {found.get(k)}" for k in sorted(wanted) if wanted.get(k) != found.get(k))
        raise ValueError(f"{path}: adapter trained on another backbone than the one at its base {info['base']} ({diff}); "
                         "put the backbone it was trained on back at that path, or pass a checkpoint of this backbone")
    try:
        return PeftModel.from_pretrained(base.model, path, is_trainable=trainable)
    except RuntimeError as err:  # checkpoints saved before base_architecture: torch's size-mismatch report
        raise ValueError(f"{path}: adapter does not fit its base {info['base']} "
                         f"({str(err).strip().splitlines()[-1].strip()}); load it with the backbone it was trained on") from None


def architecture(config) -> dict:
    """What makes two backbones interchangeable for an adapter: family and shapes.

    >>> from transformers import LlamaConfig
    >>> architecture(LlamaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=100))
    {'model_type': 'llama', 'hidden_size': 64, 'num_hidden_layers': 2, 'vocab_size': 100}
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {k: getattr(text, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}


def _kept(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in {"kind", "base", "base_architecture"}}


def task_state_of(path: Path) -> dict | None:
    marker = Path(path) / CHECKPOINT_FILE
    return json.loads(marker.read_text()).get("task") if marker.is_file() else None
