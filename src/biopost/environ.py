"""Environment variables set for one block, with the caller's values (or their absence) given back after it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def temporary_environ(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block; afterwards each name has its old value again, and a name
    that was unset is unset again.

    >>> with temporary_environ({"BIOPOST_DOCTEST": "1"}):
    ...     os.environ["BIOPOST_DOCTEST"]
    '1'
    >>> "BIOPOST_DOCTEST" in os.environ
    False
    """
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
