"""Reward functions, TRL's contract: ``f(prompts, completions, **columns) -> list[float | None]``.

The correctness reward calls the task's scorer, so what RL optimises is what every report measures.
Your own functions join them by import path in an RL stage (``rewards.custom``), with a weight each::

    rewards: {correctness: 1.0, format: 0.5, custom: [{function: "mypkg.rewards:motif_bonus", weight: 0.5}]}

The module is imported from the installed packages or, failing that, the working directory. Every
function is called with keywords: ``prompts`` (the rendered prompts), ``completions`` (the sampled
texts), ``task_name`` (each completion's task: a stage may mix several, see biopost.mixture) and the
columns of :func:`reward_columns`, each a list with one value per completion. It returns
one number per completion, or ``None`` where it abstains (TRL's convention): an abstention adds nothing to
that completion's total reward and is left out of the logged mean ``reward_<name>``; the share of
abstentions is logged as ``reward_<name>_none``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
from numbers import Real

FORMAT = re.compile(r"\A\s*<think>\n?.*?\n?</think>\s*Answer:[ \t]*\S[^\n]*\s*\Z", re.DOTALL)


def correctness_reward(task, *mixed):
    """The task's own scorer, per completion (``task.reward_metric``, 1 for a correct single answer). With the
    ``mixed`` tasks of a multi-task stage, each completion is scored by the task its ``task_name`` names."""
    by_name = {t.name: t for t in (task, *mixed)}

    def correctness(prompts, completions, examples, task_name=None, **_):
        if task_name is None:
            return task.reward(completions, examples)
        values: list[float | None] = [None] * len(completions)
        for name, owner in by_name.items():
            rows = [i for i, n in enumerate(task_name) if n == name]
            scored = owner.reward([completions[i] for i in rows], [examples[i] for i in rows]) if rows else []
            for i, value in zip(rows, scored):
                values[i] = value
        return values

    return correctness


def format_reward(prompts, completions, **_) -> list[float]:
    """1 when the completion is one ``<think>`` block (any number of lines) then one ``Answer:`` line.

    >>> format_reward(None, ["<think>\\na\\nb\\n</think>\\n\\nAnswer: x", "Answer: x", "<think></think>Answer: x\\nAnswer: y"])
    [1.0, 0.0, 0.0]
    """
    out = []
    for text in completions:
        ok = FORMAT.match(text) and text.count("<think>") == 1 and text.count("</think>") == 1
        out.append(float(bool(ok) and len(re.findall(r"answer:", text, re.IGNORECASE)) == 1))
    return out


def length_penalty(target_tokens: int, max_tokens: int):
    """0 up to ``target_tokens``, falling linearly to -1 at ``max_tokens`` completion tokens.

    >>> f = length_penalty(10, 20)
    >>> f(None, ["a", "b", "c"], completion_lengths=[5, 15, 20])
    [0.0, -0.5, -1.0]
    """

    def length(prompts, completions, completion_lengths, **_):
        span = max(1, max_tokens - target_tokens)
        return [0.0 - min(1.0, max(0, n - target_tokens) / span) for n in completion_lengths]

    return length


# ---------------------------------------------------------------- your own reward functions
RESERVED_COLUMNS = ("prompts", "completions", "examples", "completion_lengths", "task_name")


def load_reward_function(path: str):
    """The function at ``'module:function'``, checked against TRL's contract; errors are one line.

    >>> load_reward_function("biopost.rewards:format_reward") is format_reward
    True
    >>> load_reward_function("biopost.rewards.format_reward")
    Traceback (most recent call last):
    ...
    ValueError: reward 'biopost.rewards.format_reward' is not 'module:function' (e.g. mypkg.rewards:motif_bonus)
    >>> load_reward_function("biopost.rewards:no_such")
    Traceback (most recent call last):
    ...
    ValueError: reward 'biopost.rewards:no_such': module 'biopost.rewards' has no attribute 'no_such'
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"reward {path!r} is not 'module:function' (e.g. mypkg.rewards:motif_bonus)")
    if os.getcwd() not in sys.path:  # a module beside the config works under the `biopost` script too
        sys.path.append(os.getcwd())
    try:
        func = importlib.import_module(module_name)
    except Exception as err:  # the user's module: any import failure becomes one line
        raise ValueError(f"reward {path!r}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    for part in attribute.split("."):
        if not hasattr(func, part):
            raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attribute!r}")
        func = getattr(func, part)
    if not callable(func):
        raise ValueError(f"reward {path!r} is not callable")
    try:
        signature = inspect.signature(func)
        signature.bind_partial(prompts=None, completions=None)
    except (TypeError, ValueError):
        raise ValueError(f"reward {path!r} must accept prompts= and completions= (TRL's reward contract)") from None
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        raise ValueError(f"reward {path!r} must accept **kwargs: it is called with every column (TRL's contract)")
    return func


def reward_columns(examples: list) -> dict[str, list]:
    """TRL's dataset columns, one value per completion: ``examples`` (the :class:`Example` objects), ``id``,
    ``answer``, ``reasoning``, each payload (``dna``, ``protein``, ``cell``) and each key of the examples'
    ``fields`` and ``meta`` (a table's columns). A key an example lacks is ``None`` for it.

    >>> from biopost.data import Example
    >>> cols = reward_columns([Example("a", {"genes": "CD3E"}, "T", dna="ACGT", meta={"phase": "G1"})])
    >>> cols["genes"], cols["dna"], cols["phase"], cols["answer"]
    (['CD3E'], ['ACGT'], ['G1'], ['T'])
    """
    rows = [{**e.payloads(), **e.meta, **e.fields} for e in examples]
    keys = dict.fromkeys(k for row in rows for k in row if k not in RESERVED_COLUMNS)
    columns = {k: [row.get(k) for row in rows] for k in keys}
    columns.update(id=[e.id for e in examples], answer=[e.answer for e in examples],
                   reasoning=[e.reasoning for e in examples], examples=list(examples))
    return columns


def call_reward(name: str, func, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """Call one reward function; anything but one number or None per completion is a one-line error.

    >>> call_reward("half", lambda prompts, completions, **_: [0.5, None], ["p", "p"], ["a", "b"])
    [0.5, None]
    >>> call_reward("short", lambda prompts, completions, **_: [1.0], ["p", "p"], ["a", "b"])
    Traceback (most recent call last):
    ...
    ValueError: reward short returned 1 values for 2 completions
    """
    values = list(func(prompts=prompts, completions=completions, **columns))
    if len(values) != len(completions):
        raise ValueError(f"reward {name} returned {len(values)} values for {len(completions)} completions")
    for v in values:
        if v is not None and (not isinstance(v, Real) or not math.isfinite(v)):
            raise ValueError(f"reward {name} returned {v!r}; each value must be a finite number or None")
    return [None if v is None else float(v) for v in values]
