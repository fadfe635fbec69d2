"""Prompt templates: Jinja in a sandbox, so a config or a table can word a prompt but never run code.

Values from the data are inserted as text and never parsed as templates. ``None`` renders as an empty
string and a list as its items separated by spaces (``{{ genes | join(', ') }}`` for another separator).
A variable the template names but the task does not provide is an error, never an empty string.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _finalize(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join("" if v is None else str(v) for v in value)
    return value


ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, finalize=_finalize)


class PromptTemplate:
    """A compiled template and the variables it names.

    >>> t = PromptTemplate("Genes: {{ genes }}.{% if choices %} Choose one of: {{ choices | join('; ') }}.{% endif %}")
    >>> t.render({"genes": ["CD3E", "LCK"], "choices": ["T", "B"]})
    'Genes: CD3E LCK. Choose one of: T; B.'
    >>> sorted(t.variables)
    ['choices', 'genes']
    >>> PromptTemplate("{{ x.__class__ }}").render({"x": 1}, "task.prompt.user", "c1")
    Traceback (most recent call last):
    ...
    biopost.tasks.prompts.PromptError: task.prompt.user: the template fails on example 'c1' (SecurityError: access to attribute '__class__' of 'int' object is unsafe.)
    >>> PromptTemplate("Genes: {{ genes }")
    Traceback (most recent call last):
    ...
    ValueError: template syntax error (line 1): unexpected '}'
    """

    def __init__(self, source: str):
        try:
            self.variables = frozenset(meta.find_undeclared_variables(ENV.parse(source)))
            self.template = ENV.from_string(source)
        except TemplateSyntaxError as err:
            raise ValueError(f"template syntax error (line {err.lineno}): {err.message}") from None

    def render(self, variables: dict, where: str = "the prompt", example: str | None = None) -> str:
        """The prompt for one example's ``variables``; a variable the template names but the example lacks,
        or a failure while rendering, is a one-line :class:`PromptError` naming ``where`` and the example.

        >>> PromptTemplate("{{ genez }}").render({"genes": "A B", "choices": []}, "task.prompt.user", "c7")
        Traceback (most recent call last):
        ...
        biopost.tasks.prompts.PromptError: task.prompt.user: the template uses genez, which example 'c7' does not provide; its variables: choices, genes
        >>> PromptTemplate("{{ n + 1 }}").render({"n": "5"}, "task.options.prompt", "r2")
        Traceback (most recent call last):
        ...
        biopost.tasks.prompts.PromptError: task.options.prompt: the template fails on example 'r2' (TypeError: can only concatenate str (not "int") to str)
        """
        which = "an example" if example is None else f"example {example!r}"
        unknown = sorted(self.variables - set(variables))
        if unknown:
            raise PromptError(f"{where}: the template uses {', '.join(unknown)}, which {which} does not "
                              f"provide; its variables: {', '.join(sorted(variables))}")
        try:
            return self.template.render(variables).strip()
        except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as err:
            message = " ".join(str(err).split())
            raise PromptError(f"{where}: the template fails on {which} ({type(err).__name__}: {message})") from None


class PromptError(ValueError):
    """A prompt template that does not fit an example (reported in one line, naming the example)."""


@lru_cache(maxsize=64)
def compile_template(source: str) -> PromptTemplate:
    """Compile once per distinct template text."""
    return PromptTemplate(source)
