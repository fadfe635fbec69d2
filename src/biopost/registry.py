"""Register and look up tasks by name: built-in ones, and plug-ins from installed packages.

A package adds tasks without touching biopost by declaring entry points in the group ``biopost.tasks``,
each named after the task and pointing at its :class:`~biopost.tasks.base.Task` subclass::

    [project.entry-points."biopost.tasks"]
    "motifs/bind" = "mypkg.tasks:MotifBinding"

A plug-in is imported only when its task is asked for (or when all tasks are listed), so a broken plug-in
never stops a run of another task. A plug-in never replaces a task: a name that a built-in task or another
plug-in already has is an error naming the package and the fix, and so is a plug-in that fails to import,
to build or to load its data.
"""

from __future__ import annotations

from contextlib import contextmanager
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import ValidationError

from biopost.config import ConfigError, error_location, type_hint

TASKS: dict[str, type] = {}
PLUGINS: dict[str, EntryPoint] = {}  # task name -> the entry point of the installed package that provides it
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


def distribution(ep: EntryPoint) -> str:
    """'name version' of the package that declares ``ep``."""
    return f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown package"


def plugin_origin(ep: EntryPoint) -> str:
    return f"plug-in task {ep.name!r} ({ep.value} from {distribution(ep)})"


def _uninstall(ep: EntryPoint) -> str:
    return f"pip uninstall {ep.dist.name}" if ep.dist else "uninstall the package"


def _load_plugins(name: str | None = None) -> None:
    """Import the plug-in tasks (only the one called ``name`` when given) and register them. A plug-in never
    replaces a built-in task or another plug-in: a name taken twice is an error naming both."""
    from biopost.tasks.base import Task

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if name is not None and ep.name != name:
            continue
        where = plugin_origin(ep)
        if ep.name in PLUGINS:
            first = PLUGINS[ep.name]
            if (first.value, distribution(first)) != (ep.value, distribution(ep)):  # not the same package seen twice
                raise ConfigError(f"{where} and {plugin_origin(first)} have the same name; uninstall one of them "
                                  f"({_uninstall(ep)} or {_uninstall(first)})")
            continue
        if ep.name in TASKS:
            raise ConfigError(f"{where} has the name of a built-in task; rename the plug-in's entry point and task "
                              f"(e.g. '<package>/{ep.name}'), or {_uninstall(ep)}")
        try:
            cls = ep.load()
        except Exception as err:  # any import failure of third-party code becomes one line
            raise ConfigError(f"{where} failed to import: {type(err).__name__}: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ConfigError(f"{where} must name a biopost.tasks.base.Task subclass, not {cls!r}")
        if getattr(cls, "name", None) != ep.name:
            raise ConfigError(f"{where}: the entry point's name must be the task's name {getattr(cls, 'name', None)!r}")
        if TASKS.get(ep.name) is not cls:  # its module may register it itself
            register_task(cls)
        PLUGINS[ep.name] = ep


@contextmanager
def plugin_errors(name: str, doing: str):
    """Any exception a plug-in task raises while ``doing`` becomes one line naming its package and the fix;
    built-in tasks' errors pass through unchanged."""
    if name not in PLUGINS:
        yield
        return
    try:
        yield
    except Exception as err:  # third-party code: whatever it raises, the user sees which package and what to do
        message = " ".join(str(err).split())
        ep = PLUGINS[name]
        raise ConfigError(f"{plugin_origin(ep)} failed to {doing}: {type(err).__name__}: {message}; fix the "
                          f"package or {_uninstall(ep)}") from None


def options_model(name: Any) -> type | None:
    """The options class of task ``name``, or None when there is no such task (for typed overrides)."""
    _load_builtin()
    if isinstance(name, str) and name not in TASKS:
        try:
            _load_plugins(name)
        except ConfigError:
            return None  # the config's validation reports it
    return TASKS[name].Options if isinstance(name, str) and name in TASKS else None


def task_names() -> list[str]:
    _load_builtin()
    _load_plugins()
    return sorted(TASKS)


def get_task(name: str, options: dict[str, Any] | None = None, prompt: dict[str, Any] | None = None):
    """Build a registered task with validated options and prompt overrides; errors name the valid choices."""
    _load_builtin()
    _load_plugins(name)  # also when built in: a plug-in of the same name is an error, not silently ignored
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; registered tasks: {', '.join(task_names())}")
    cls = TASKS[name]
    try:
        opts = cls.Options.model_validate(options or {})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in error_location(first))
        if first["type"] == "extra_forbidden":
            raise ConfigError(
                f"config error: unknown key 'task.options.{key}' for task {name}; valid keys here: "
                f"{', '.join(sorted(_options_model(cls.Options, first['loc'][:-1]).model_fields))}"
            ) from None
        raise ConfigError(f"config error: 'task.options.{key}': {first['msg'].removeprefix('Value error, ')}"
                          f"{type_hint(first)}") from None
    with plugin_errors(name, "build"):
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
