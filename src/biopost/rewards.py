"""Reward functions, TRL's contract: ``f(prompts, completions, **columns) -> list[float | None]``.

The correctness reward calls the task's scorer, so what RL optimises is what every report measures.
"""

from __future__ import annotations

import re

FORMAT = re.compile(r"\A\s*<think>\n?.*?\n?</think>\s*Answer:[ \t]*\S[^\n]*\s*\Z", re.DOTALL)


def correctness_reward(task):
    """The task's own scorer, per completion (``task.reward_metric``, 1 for a correct single answer)."""

    def correctness(prompts, completions, examples, **_):
        return task.reward(completions, examples)

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
