"""What a task is: data loading, the default split, prompts, targets, parsing, scoring and its reward.

The reward calls the scorer, so the training signal and the reported metric cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from biopost.config import numbers_are_numbers

from biopost.data import Example, format_target
from biopost.data.example import PLACEHOLDERS
from biopost.tasks.parsing import match_label, parse_answer
from biopost.tasks.prompts import PromptTemplate, compile_template


class TaskOptions(BaseModel):
    """Task-specific options (``task.options`` in a config); subclasses add fields."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data):
        return numbers_are_numbers(cls, data)


class Task:
    """A named, versioned biological task. Subclasses set the class attributes and implement ``load``."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    domain: ClassVar[str]
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    default_ood_field: ClassVar[str]
    default_ood_test_groups: ClassVar[list[str] | float]
    default_ood_val_groups: ClassVar[list[str] | float | None] = None
    # Meta field whose examples must share a split (near copies, e.g. sites drawn from one matrix); None: none.
    split_group_field: ClassVar[str | None] = None
    primary_metric: ClassVar[str] = "accuracy"
    reward_metric: ClassVar[str] = "accuracy"
    system_prompt: ClassVar[str] = "You are a careful biologist. Think step by step, then give one answer."
    # Advice in the leakage error when two splits share an input (before "or set allow_overlap").
    overlap_remedy: ClassVar[str] = "deduplicate the examples"
    # The default user prompt as a Jinja template over ``prompt_variables`` (None: ``user_prompt`` is code).
    user_template: ClassVar[str | None] = None
    user_template_key: ClassVar[str] = "the task's default prompt"  # where errors in user_template point

    def __init__(self, options: TaskOptions | None = None):
        self.options = options or self.Options()
        # Modalities the model reads through an encoder (set from ``model.encoders``); others are text.
        self.fused_modalities: frozenset[str] = frozenset()
        # ``task.prompt`` in a config: a paraphrase of the prompt is a legitimate OOD axis.
        self.system_override: str | None = None
        self.user_override: PromptTemplate | None = None

    # ---- data
    def load(self) -> list[Example]:
        raise NotImplementedError

    def fit(self, train: list[Example] | tuple[Example, ...]) -> None:
        """Learn train-only statistics (e.g. marker genes for rationales). Default: nothing."""

    def recorded_options(self, options: dict) -> dict:
        """``task.options`` as a checkpoint records them, for ``eval`` and ``predict`` to rebuild the task from
        any directory (e.g. a relative data path made absolute). Default: as given."""
        return options

    # ---- prompting
    def use_prompt(self, system: str | None = None, user: str | None = None) -> None:
        """Replace the system prompt and / or the user prompt (a template over ``prompt_variables``)."""
        self.system_override = system
        try:
            self.user_override = None if user is None else PromptTemplate(user)
        except ValueError as err:
            raise ValueError(f"task.prompt.user: {err}") from None

    def prompt_variables(self, example: Example) -> dict:
        """What a prompt template may name: the example's fields, each sequence payload by its modality
        (``dna``, ``protein``: text, or the placeholder when fused; a list when there are several) and
        ``choices`` (the candidate answers, when the task has a label set)."""
        variables = dict(example.fields)
        for modality in ("dna", "protein"):
            payload = getattr(example, modality)
            if payload is not None:
                texts = [self.sequence_text(modality, s) for s in ((payload,) if isinstance(payload, str) else payload)]
                variables[modality] = texts[0] if isinstance(payload, str) else texts
        variables["choices"] = list(getattr(self, "labels", []) or [])
        return variables

    def user_prompt(self, example: Example) -> str:
        """The task's default user prompt: ``user_template`` rendered, unless a subclass writes it in code."""
        if self.user_template is None:
            raise NotImplementedError
        return compile_template(self.user_template).render(self.prompt_variables(example), self.user_template_key,
                                                           example.id)

    def check_prompts(self, examples) -> None:
        """Fail before training, in one line naming the example, when a prompt template does not fit one of
        ``examples`` (a variable it lacks, or a failure while rendering): every prompt is rendered once."""
        for example in examples:
            self.messages(example)

    def sequence_text(self, modality: str, text: str) -> str:
        """How one payload appears in the prompt: its text serialization, or the modality's placeholder
        when the model reads that modality through an encoder (fusion and text are one switch apart).

        >>> task = Task()
        >>> task.sequence_text("dna", "ACGT")
        'ACGT'
        >>> task.fused_modalities = frozenset({"dna"})
        >>> task.sequence_text("dna", "ACGT")
        '<|dna|>'
        """
        return PLACEHOLDERS[modality] if modality in self.fused_modalities else text

    def messages(self, example: Example) -> list[dict[str, str]]:
        """The chat the model reads: the one place where ``task.prompt`` overrides apply."""
        system = self.system_prompt if self.system_override is None else self.system_override
        if self.user_override is None:
            user = self.user_prompt(example)
        else:
            user = self.user_override.render(self.prompt_variables(example), "task.prompt.user", example.id)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def reasoning(self, example: Example) -> str:
        return example.reasoning

    def target(self, example: Example) -> str:
        return format_target(example.answer, self.reasoning(example))

    def training_texts(self, examples) -> list[str]:
        """Prompt and target text, e.g. for training a built-in tokenizer."""
        return ["\n".join(m["content"] for m in self.messages(e)) + "\n" + self.target(e) for e in examples]

    def input_key(self, example: Example) -> str:
        """Hash of what the model reads of an example: its rendered messages, plus the payloads it reads
        through an encoder. Splits must not share a key (the leakage check); payloads shown as text are
        already in the messages, and fields the prompt leaves out cannot leak.

        >>> from biopost.data import Example
        >>> class Short(Task):
        ...     def user_prompt(self, e): return f"Sequence: {self.sequence_text('dna', e.dna[:4])}"
        >>> task = Short()
        >>> a, b = Example("a", {}, "x", dna="ACGTAA"), Example("b", {}, "x", dna="ACGTCC")
        >>> task.input_key(a) == task.input_key(b)  # the text model reads the same four letters
        True
        >>> task.fused_modalities = frozenset({"dna"})
        >>> task.input_key(a) == task.input_key(b)  # the encoder reads the whole sequences
        False
        """
        read = {name: payload for name, payload in example.payloads().items() if name in self.fused_modalities}
        blob = json.dumps({"messages": self.messages(example), **read}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def leak_keys(self, example: Example) -> list[str]:
        """Text that identifies an example's input; a CPT corpus containing it would leak the test set."""
        return [self.messages(example)[-1]["content"]]

    # ---- scoring
    def parse(self, completion: str, mode: str = "strict") -> str | None:
        return parse_answer(completion, mode)

    def score(self, completion: str, example: Example) -> dict[str, float]:
        raise NotImplementedError

    def split_metrics(self, examples: list[Example], completions: list[list[str]]) -> dict[str, tuple[float, int]]:
        """Metrics defined over a whole split rather than per example (e.g. CAFA's Fmax), each as (value, n)
        with n the examples it is computed over. Default: none."""
        return {}

    def reward(self, completions: list[str], examples: list[Example]) -> list[float]:
        """Correctness reward in [0, 1]: the scorer's ``reward_metric``."""
        return [self.score(c, e)[self.reward_metric] for c, e in zip(completions, examples)]


class LabelTask(Task):
    """A task whose answer is one label out of a fixed set (cell type, disease, pathogenicity...)."""

    labels: list[str]

    def score(self, completion: str, example: Example) -> dict[str, float]:
        """``accuracy`` (lenient parse), ``accuracy_strict`` and ``format`` (strict parse found an answer)."""
        strict = self.parse(completion, "strict")
        lenient = match_label(self.parse(completion, "lenient"), self.labels, "lenient")
        return {
            "accuracy": float(lenient == example.answer),
            "accuracy_strict": float(match_label(strict, self.labels, "strict") == example.answer),
            "format": float(strict is not None),
        }

    def prediction(self, completion: str) -> dict[str, str | None]:
        return {
            "strict": match_label(self.parse(completion, "strict"), self.labels, "strict"),
            "lenient": match_label(self.parse(completion, "lenient"), self.labels, "lenient"),
        }
