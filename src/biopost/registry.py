"""Register and look up tasks by name."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from biopost.config import ConfigError

TASKS: dict[str, type] = {}


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


def task_names() -> list[str]:
    _load_builtin()
    return sorted(TASKS)


def get_task(name: str, options: dict[str, Any] | None = None):
    """Build a registered task with validated options; errors name the valid choices."""
    _load_builtin()
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    try:
        opts = cls.Options.model_validate(options or {})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ConfigError(
                f"config error: unknown key 'task.options.{key}' for task {name}; valid keys here: "
                f"{', '.join(sorted(cls.Options.model_fields))}"
            ) from None
        raise ConfigError(f"config error: 'task.options.{key}': {first['msg']}") from None
    return cls(opts)
