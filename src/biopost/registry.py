"""Register and look up tasks by name: built-in ones, and plug-ins from installed packages.

A package adds tasks without touching biopost by declaring entry points in the group ``biopost.tasks``,
each named after the task and pointing at its :class:`~biopost.tasks.base.Task` subclass::

    [project.entry-points."biopost.tasks"]
    "motifs/bind" = "mypkg.tasks:MotifBinding"

A plug-in is imported only when its task is asked for (or when all tasks are listed), so a broken plug-in
never stops a run of another task.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from biopost.config import ConfigError

TASKS: dict[str, type] = {}
PLUGINS: dict[str, str] = {}  # task name -> "distribution version" of the package that provides it
ENTRY_POINT_GROUP = "biopost.tasks"


def register_task(cls: type) -> type:
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} registered twice")
    TASKS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import biopost.tasks.transcriptomics.cell_type  # noqa: F401  (each import registers its tasks)
    import biopost.tasks.proteins.amp  # noqa: F401
    import biopost.tasks.proteins.go_terms  # noqa: F401
    import biopost.tasks.genomics.kegg  # noqa: F401
    import biopost.tasks.genomics.tf_class  # noqa: F401
    import biopost.tasks.genomics.variant_effect  # noqa: F401
    import biopost.tasks.table  # noqa: F401


def _load_plugins(name: str | None = None) -> None:
    """Import the plug-in tasks (only the one called ``name`` when given) and register them."""
    from biopost.tasks.base import Task

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if (name is not None and ep.name != name) or ep.name in PLUGINS:
            continue
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown package"
        where = f"plug-in task {ep.name!r} ({ep.value} from {dist})"
        try:
            cls = ep.load()
        except Exception as err:  # any import failure of third-party code becomes one line
            raise ConfigError(f"{where} failed to import: {type(err).__name__}: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ConfigError(f"{where} must name a biopost.tasks.base.Task subclass, not {cls!r}")
        if getattr(cls, "name", None) != ep.name:
            raise ConfigError(f"{where}: the entry point's name must be the task's name {getattr(cls, 'name', None)!r}")
        if TASKS.get(ep.name) is not cls:
            register_task(cls)
        PLUGINS[ep.name] = dist


def task_names() -> list[str]:
    _load_builtin()
    _load_plugins()
    return sorted(TASKS)


def get_task(name: str, options: dict[str, Any] | None = None, prompt: dict[str, Any] | None = None):
    """Build a registered task with validated options and prompt overrides; errors name the valid choices."""
    _load_builtin()
    if name not in TASKS:
        _load_plugins(name)
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; registered tasks: {', '.join(task_names())}")
    cls = TASKS[name]
    try:
        opts = cls.Options.model_validate(options or {})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ConfigError(
                f"config error: unknown key 'task.options.{key}' for task {name}; valid keys here: "
                f"{', '.join(sorted(_options_model(cls.Options, first['loc'][:-1]).model_fields))}"
            ) from None
        raise ConfigError(f"config error: 'task.options.{key}': {first['msg'].removeprefix('Value error, ')}") from None
    task = cls(opts)
    task.use_prompt(**(prompt or {}))
    return task


def _options_model(model, loc: tuple):
    """The (nested) options model at ``loc``, to list the keys valid there."""
    from biopost.config import _model_of

    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = _model_of(field.annotation) if field else None
        if inner is None:
            break
        model = inner
    return model
