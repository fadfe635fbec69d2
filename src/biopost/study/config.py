"""A study config: a base pipeline plus axes, expanded into the resolved run configs of the study.

```yaml
name: mini
base: ../demo/sft-rl-tiny.yaml      # a run config (path relative to this file) or the config inline
pipelines:                          # arms: which base stages run, in order, with their own settings
  base-only: [{kind: eval}]         # inline stages are allowed (an `eval` stage = evaluate the backbone)
  sft: [sft]
  sft-rl: [sft, rl]
  rl-cold: {stages: [rl], set: {stages.rl.init: base}}
pipeline: [sft-rl]                  # arms of every block that names none (default: every arm)
report_to: [tensorboard]            # trackers of every run (default: the base's); grouped by the study's name
zip: [{seed: [0, 1], stages.*.seed: [0, 1]}]   # crossed into every block: two seeds, run and stages alike
blocks:                             # sub-grids, united; a run in several blocks is one run
  sft-length: {pipeline: [sft], grid: {stages.sft.max_steps: [40, 80, 160]}}
  lora:
    zip: [{stages.sft.lora.rank: [32, 4], stages.rl.lora.rank: [4, 32]}]   # fields that move together
  budget:
    budget: {unit: epochs, total: 8, stages: [sft, rl], shares: [[1, 7], [4, 4]]}
```

Fields are dotted paths into the run config; ``stages.<name>`` picks a stage by name (or kind), ``stages.2``
by position and ``stages.*`` every stage that has the field. An axis whose stage is not in an arm does not
apply to that arm (its column is empty there). A budget divides ``total`` among its stages in proportion
to each share (steps, epochs, training examples, or estimated FLOPs, see :func:`step_flops`); a stage with a
zero share is left out, and an ``init`` that named it becomes ``previous``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from biopost.config import STAGE_KINDS, ConfigError, RunConfig, SafeName, Strict, Tracker, describe_error, read_yaml

LENGTH_FIELDS = ("epochs", "max_steps")


class Arm(Strict):
    stages: list[str | dict[str, Any]] = Field(..., min_length=1, description="base stage names or inline stages")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted fields set for this arm")


class Budget(Strict):
    """A fixed budget divided among stages: each share list gives one split (weights, normalised)."""

    unit: Literal["steps", "epochs", "examples", "flops"]
    total: float = Field(..., gt=0)
    stages: list[str] = Field(..., min_length=1)
    shares: list[list[float]] = Field(..., min_length=1)
    params: float | None = Field(None, gt=0, description="flops: the backbone's parameter count")
    tokens_per_example: dict[str, float] = Field(
        default_factory=dict, description="flops: tokens per training sequence, by stage (cpt: seq_length)"
    )

    @model_validator(mode="after")
    def _shares_divide_the_total(self) -> "Budget":
        """Each share list gives every budget stage a non-negative weight, not all zero (weights are normalised,
        so [1, 3] and [0.25, 0.75] are the same split). Checked with the study file, before any run."""
        repeated = sorted({s for s in self.stages if self.stages.count(s) > 1})
        if repeated:
            raise ValueError(f"stage {repeated[0]!r} appears twice in budget.stages")
        for share in self.shares:
            if len(share) != len(self.stages):
                raise ValueError(f"share {share} has {len(share)} weights for {len(self.stages)} stages "
                                 f"({', '.join(self.stages)}); give one weight per stage")
            if min(share) < 0 or sum(share) <= 0:
                raise ValueError(f"share {share} must be non-negative weights, not all zero")
        return self


class Block(Strict):
    pipeline: list[str] | None = Field(None, description="arms of this block (default: the study's `pipeline`)")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="every combination of these fields")
    zip: list[dict[str, list[Any]]] = Field(default_factory=list, description="groups of fields that move together")
    budget: Budget | None = None


class StudyConfig(Strict):
    name: SafeName = Field(..., description="the study; its default directory is studies/<name>")
    base: dict[str, Any] | str = Field(..., description="the base run config, inline or a path to its YAML")
    pipelines: dict[str, Arm] = Field(default_factory=dict, description="arms; default: one arm with every base stage")
    pipeline: list[str] | None = Field(None, description="default arms of a block; default: every arm")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="axes crossed into every block")
    zip: list[dict[str, list[Any]]] = Field(default_factory=list)
    blocks: dict[str, Block] = Field(default_factory=lambda: {"main": Block()})
    train_examples: dict[str, int] = Field(
        default_factory=dict, description="training-split size by task name, to count epochs as steps in "
        "`study plan --dry-run` (no data loaded); a real plan counts the loaded split"
    )
    report_to: list[Tracker] | None = Field(
        None, description="experiment trackers of every run (default: the base's report_to); each run is named by "
        "its id and grouped under the study's name"
    )

    @field_validator("pipelines", mode="before")
    @classmethod
    def _lists_are_arms(cls, value):
        if isinstance(value, dict):
            return {k: {"stages": v} if isinstance(v, list) else v for k, v in value.items()}
        return value


@dataclass
class Cell:
    """One point of the study: a resolved run config and the labels it was made under."""

    config: RunConfig
    block: str
    pipeline: str
    budget: str | None = None
    budget_amounts: dict[str, float] = field(default_factory=dict)


@dataclass
class Study:
    config: StudyConfig
    base: dict  # the validated base run config (JSON form)

    @property
    def name(self) -> str:
        return self.config.name

    def resolved(self) -> dict:
        """The study with its base inlined and validated: what ``study.yaml`` holds."""
        return {**self.config.model_dump(mode="json"), "base": self.base}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()[:12]

    def axis_fields(self) -> list[str]:
        """Every dotted field varied anywhere in the study, in first-seen order."""
        fields: dict[str, None] = {}
        for grid, zips in [(self.config.grid, self.config.zip)] + [(b.grid, b.zip) for b in self.config.blocks.values()]:
            fields.update(dict.fromkeys(grid))
            for group in zips:
                fields.update(dict.fromkeys(group))
        return list(fields)


# ---------------------------------------------------------------- loading
def load_study(path: str | Path, overrides: list[str] = ()) -> Study:
    """Read a study YAML (or a study directory's ``study.yaml``), apply dotted overrides, validate."""
    path = Path(path)
    if path.is_dir():
        path = path / "study.yaml"
    return study_from_dict(read_yaml(path, overrides, "study"), path.parent)


def study_from_dict(raw: dict, root: Path = Path(".")) -> Study:
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_study_error(err)) from None
    base = config.base
    if isinstance(base, str):
        base_path = (Path(root) / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            raise ConfigError(f"study base: run config not found: {base_path}")
        base = read_yaml(base_path)
    try:
        validated = RunConfig.model_validate(base)
    except ValidationError as err:
        raise ConfigError("study base: " + describe_error(err, base)) from None
    study = Study(config, validated.model_dump(mode="json"))
    check_names(study)
    return study


def describe_study_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and p[:1].isupper()))
    if first["type"] == "extra_forbidden":
        return f"study config: unknown key '{key}'"
    if first["type"] == "missing":
        return f"study config: missing required key '{key}'"
    return f"study config: '{key}': {first['msg'].removeprefix('Value error, ')}"


def check_names(study: Study) -> None:
    arms = arms_of(study)
    varied = study.axis_fields() + [key for arm in arms.values() for key in arm.set]
    trackers = [key for key in varied if key.split(".")[0] == "report_to"]
    if trackers:
        raise ConfigError(f"{trackers[0]}: trackers are not an axis (they change no result and no run id); "
                          "set report_to in the study or its base")
    for block_name, block in study.config.blocks.items():
        for arm in block.pipeline or study.config.pipeline or []:
            if arm not in arms:
                raise ConfigError(f"block {block_name}: unknown pipeline {arm!r}; pipelines: {', '.join(arms)}")
        for group in [*study.config.zip, *block.zip]:
            lengths = {k: len(v) for k, v in group.items()}
            if len(set(lengths.values())) > 1:
                raise ConfigError(f"block {block_name}: zipped fields need equal lengths, got {lengths}")
        for name, values in {**study.config.grid, **block.grid}.items():
            if not values:
                raise ConfigError(f"block {block_name}: axis {name} has no values")


def arms_of(study: Study) -> dict[str, Arm]:
    if study.config.pipelines:
        return study.config.pipelines
    return {"base": Arm(stages=[s.get("name") or s["kind"] for s in study.base["stages"]])}


# ---------------------------------------------------------------- expansion
def expand(study: Study) -> list[Cell]:
    """Every cell of every block: arm x grid x zip groups x budget shares, as validated run configs."""
    cells = []
    arms = arms_of(study)
    for block_name, block in study.config.blocks.items():
        block_fields = set(block.grid).union(*block.zip)  # a block's own axes replace the study-wide ones
        grid = {**{k: v for k, v in study.config.grid.items() if k not in block_fields}, **block.grid}
        zips = [g for g in study.config.zip if not set(g) & block_fields] + block.zip
        axes = [[{k: v} for v in values] for k, values in grid.items()]
        axes += [[dict(zip(group, combo)) for combo in zip(*group.values())] for group in zips]
        shares = block.budget.shares if block.budget else [None]
        arm_names = block.pipeline or study.config.pipeline or list(arms)
        applied: dict[str, bool] = {}
        for arm_name in arm_names:
            for combo in itertools.product(*axes, shares):
                *points, share = combo
                values = {k: v for point in points for k, v in point.items()}
                where = f"block {block_name}, pipeline {arm_name}" + "".join(f", {k}={v!r}" for k, v in values.items())
                cells.append(make_cell(study, block_name, arm_name, arms[arm_name], values, block.budget, share,
                                       where, applied))
        unused = [k for k, used in applied.items() if not used]
        if unused:
            raise ConfigError(f"block {block_name}: axis {unused[0]} names a stage that no pipeline of the block has "
                              f"({', '.join(arm_names)})")
    return cells


def make_cell(study: Study, block: str, arm_name: str, arm: Arm, values: dict, budget: Budget | None,
              share: list[float] | None, where: str, applied: dict[str, bool]) -> Cell:
    raw = copy.deepcopy(study.base)
    raw["name"] = study.name
    if study.config.report_to is not None:
        raw["report_to"] = study.config.report_to
    raw["stages"] = select_stages(study.base["stages"], arm, arm_name)
    for key, value in arm.set.items():
        if not set_field(raw, key, value, f"pipeline {arm_name}, set {key}"):
            raise ConfigError(f"pipeline {arm_name}: set {key}: no such stage in the pipeline")
    for key, value in values.items():
        hit = set_field(raw, key, value, f"{where}: axis {key}={value!r}")
        applied[key] = applied.get(key, False) or hit
    label, amounts = None, {}
    if budget is not None:
        conflict = [k for k in values if k.startswith("stages.") and k.split(".")[1] in budget.stages
                    and k.split(".")[-1] in LENGTH_FIELDS]
        if conflict:
            raise ConfigError(f"{where}: axis {conflict[0]} sets a length the budget divides")
        label, amounts = apply_budget(raw, budget, share, where)
    check_inits(raw["stages"], where)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{where}: {describe_error(err, raw)}") from None
    return Cell(config, block, arm_name, label, amounts)


def select_stages(base_stages: list[dict], arm: Arm, arm_name: str) -> list[dict]:
    by_name = {s.get("name") or s["kind"]: s for s in base_stages}
    out = []
    for entry in arm.stages:
        if isinstance(entry, dict):
            out.append(copy.deepcopy(entry))
        elif entry in by_name:
            out.append(copy.deepcopy(by_name[entry]))
        else:
            raise ConfigError(f"pipeline {arm_name}: no base stage named {entry!r}; base stages: {', '.join(by_name)}")
    return out


def check_inits(stages: list[dict], where: str) -> None:
    """Each ``init`` names 'previous', 'base' or an earlier stage (checked before anything runs)."""
    seen: list[str] = []
    for stage in stages:
        name = stage.get("name") or stage.get("kind")
        init = stage.get("init", "previous")
        if init not in ("previous", "base") and init.partition(":")[0] not in seen:
            raise ConfigError(f"{where}: stage {name} has init {init!r} but the pipeline has no earlier stage "
                              f"{init.partition(':')[0]!r} (earlier: {seen or 'none'}); set stages.{name}.init")
        seen.append(name)


# ---------------------------------------------------------------- dotted fields
def stage_indices(stages: list[dict], selector: str, first_key: str | None) -> list[int]:
    if selector == "*":
        return [i for i, s in enumerate(stages) if first_key in STAGE_KINDS[s.get("kind", "sft")].model_fields]
    if selector.isdigit():
        return [int(selector)] if int(selector) < len(stages) else []
    return [i for i, s in enumerate(stages) if (s.get("name") or s.get("kind")) == selector]


def set_field(raw: dict, key: str, value: Any, where: str) -> bool:
    """Set a dotted field; False when it names a stage the pipeline lacks (the axis does not apply)."""
    parts = key.split(".")
    if parts[0] == "stages":
        if len(parts) < 3:
            raise ConfigError(f"{where}: a stage field is stages.<name>.<field>")
        targets = [raw["stages"][i] for i in stage_indices(raw["stages"], parts[1], parts[2])]
        parts = parts[2:]
    else:
        targets = [raw]
    for node in targets:
        for part in parts[:-1]:
            if isinstance(node, list):  # an entry of a list the base sets (stages.sft.mixture.0.weight)
                node = node[list_index(node, part, where)]
                continue
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"{where}: {part!r} is {child!r}, not a section; set it to a mapping in the base")
            node = child
        if isinstance(node, list):
            node[list_index(node, parts[-1], where)] = copy.deepcopy(value)
        else:
            node[parts[-1]] = copy.deepcopy(value)
    return bool(targets)


def list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: {part!r} is not an index below {len(node)} of the list the base sets there")
    return int(part)


def get_field(config: dict, key: str) -> Any:
    """A dotted field of a run config (JSON form), or None where the run has no such stage."""
    parts = key.split(".")
    node: Any = config
    if parts[0] == "stages":
        found = stage_indices(config["stages"], parts[1], parts[2] if len(parts) > 2 else None)
        if not found:
            return None
        node, parts = config["stages"][found[0]], parts[2:]
    for part in parts:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


# ---------------------------------------------------------------- budgets
def apply_budget(raw: dict, budget: Budget, share: list[float], where: str) -> tuple[str, dict[str, float]]:
    """Set each budget stage's length from its share of the total; drop zero-share stages."""
    label = ":".join(f"{s:g}" for s in share)
    where = f"{where}, budget {label}"
    amounts = {name: budget.total * s / sum(share) for name, s in zip(budget.stages, share)}
    names = [s.get("name") or s["kind"] for s in raw["stages"]]
    missing = [n for n in budget.stages if n not in names]
    if missing:
        raise ConfigError(f"{where}: budget stage {missing[0]!r} is not in the pipeline ({', '.join(names)})")
    kept = []
    for stage in raw["stages"]:
        name = stage.get("name") or stage["kind"]
        if name in amounts:
            if amounts[name] == 0:
                continue
            set_length(stage, budget, amounts[name], where)
        kept.append(stage)
    dropped = [n for n in names if n in amounts and amounts[n] == 0]
    for stage in kept:  # a stage that started from a dropped one starts from what precedes it instead
        if stage.get("init", "previous").partition(":")[0] in dropped:
            stage["init"] = "previous"
    raw["stages"] = kept
    return label, amounts


def set_length(stage: dict, budget: Budget, amount: float, where: str) -> None:
    name = stage.get("name") or stage["kind"]
    if budget.unit == "epochs":
        stage["epochs"], stage["max_steps"] = amount, None
        return
    try:
        typed = STAGE_KINDS[stage["kind"]].model_validate(stage)
    except ValidationError as err:
        raise ConfigError(f"{where}: stage {name}: {err.errors()[0]['msg']}") from None
    if budget.unit == "steps":
        steps = amount
    elif budget.unit == "examples":
        steps = amount / typed.examples_per_step
    else:
        steps = amount / step_flops(typed, budget, where)
    if round(steps) < 1:
        raise ConfigError(f"{where}: stage {name} gets {amount:g} {budget.unit}, less than one step")
    stage["max_steps"], stage["epochs"] = int(round(steps)), None


def step_flops(stage, budget: Budget, where: str) -> float:
    """Estimated training FLOPs of one step, from N parameters and T tokens per sequence.

    SFT / CPT: forward + backward, ``6 N T`` per sequence. RL (GRPO), per completion: sampling ``2 N T``,
    the reference ``2 N T`` when ``beta > 0``, old log-probs ``2 N T`` when ``mu > 1``, and ``mu`` updates
    of ``6 N T``.

    >>> from biopost.config import RLStage, SFTStage
    >>> b = Budget(unit="flops", total=1, stages=["sft", "rl"], shares=[[1, 1]], params=1e6,
    ...            tokens_per_example={"sft": 100, "rl": 200})
    >>> step_flops(SFTStage(batch_size=4), b, "")
    2400000000.0
    >>> step_flops(RLStage(prompts_per_step=2, num_generations=4, mu=1, beta=0.0), b, "")
    12800000000.0
    """
    name = stage.name or stage.kind
    if budget.params is None:
        raise ConfigError(f"{where}: a flops budget needs budget.params (the backbone's parameter count)")
    tokens = budget.tokens_per_example.get(name, getattr(stage, "seq_length", None) if stage.kind == "cpt" else None)
    if tokens is None:
        raise ConfigError(f"{where}: a flops budget needs budget.tokens_per_example.{name}")
    n, t = budget.params, tokens
    if stage.kind == "rl":
        per_sequence = 2 * n * t * (1 + (stage.beta > 0) + (stage.mu > 1)) + 6 * n * t * stage.mu
        return per_sequence * stage.prompts_per_step * stage.num_generations
    return 6 * n * t * stage.examples_per_step
