"""The unit of data every task, stage and evaluator passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODALITIES = ("dna", "protein", "cell")
# Where a payload read through an encoder sits in the prompt: one placeholder per sequence, in payload order.
# A fused model expands each placeholder to as many positions as its projector emits for that sequence.
PLACEHOLDERS = {"dna": "<|dna|>", "protein": "<|protein|>", "cell": "<|cell|>"}


@dataclass(frozen=True)
class Example:
    """One biological question.

    ``fields`` fill the task's prompt; ``answer`` and ``reasoning`` form the SFT target; modality payloads
    (``dna``, ``protein``, ``cell``) travel to encoders when a fused model is used; ``meta`` holds the
    fields splits are defined over (tissue, phase, species, date, network...).

    A sequence payload is one string or a tuple of strings (e.g. a reference and a variant window), each
    shown in the prompt through :meth:`Task.sequence_text`. A ``cell`` payload is ``{"genes": [...],
    "values": [...]}`` ordered by decreasing expression.
    """

    id: str
    fields: dict[str, Any]
    answer: str
    reasoning: str = ""
    dna: str | tuple[str, ...] | None = None
    protein: str | tuple[str, ...] | None = None
    cell: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def payloads(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in MODALITIES if getattr(self, name) is not None}


def format_target(answer: str, reasoning: str = "") -> str:
    """The assistant turn every task trains on.

    >>> format_target("CD19+ B", "B-cell markers MS4A1 and CD79A are high.")
    '<think>\\nB-cell markers MS4A1 and CD79A are high.\\n</think>\\n\\nAnswer: CD19+ B'
    >>> format_target("yes")
    '<think>\\n\\n</think>\\n\\nAnswer: yes'
    """
    return f"<think>\n{reasoning}\n</think>\n\nAnswer: {answer}"
