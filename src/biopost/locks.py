"""One runner per run or study directory: an exclusive lock, with a note naming its holder.

The lock is ``fcntl.flock`` through the ``filelock`` package: the kernel releases it when its process dies, so
the lock of a runner killed with SIGKILL is free again and the next runner takes it over (and says so). The
note ``.lock.json`` (pid, host, start time, command) is written after the lock is taken and removed on
release; a second runner reads it to say who holds the directory. On network file systems ``flock`` works
where the server supports locks (NFSv4, Lustre with ``flock`` mounts).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from biopost import durable

LOCK_FILE, HOLDER_FILE = ".lock", ".lock.json"
_HELD: dict[Path, int] = {}  # directories this process holds, with their nesting depth (the lock is re-entrant)


class DirectoryBusy(RuntimeError):
    """Another runner holds the directory."""


class DirectoryLock:
    """``with DirectoryLock(run_dir, "run"):`` while this process works in ``run_dir``."""

    def __init__(self, directory: Path, what: str = "run"):
        self.directory, self.what = Path(directory), what
        self.lock = FileLock(self.directory / LOCK_FILE)

    def __enter__(self) -> "DirectoryLock":
        check_directory(self.directory, self.what)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = self.directory.resolve()
        if self.key in _HELD:  # already ours (e.g. the CLI locked the study, then the executor did)
            _HELD[self.key] += 1
            return self
        holder_file = self.directory / HOLDER_FILE
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise DirectoryBusy(f"{self.directory} is in use by another {self.what} ({describe(read_holder(holder_file))}); "
                                f"wait for it to finish or stop it, or choose another directory") from None
        stale = read_holder(holder_file)
        if stale:  # its process died without releasing: the kernel freed the lock
            print(f"{self.directory}: taking over the lock of a {self.what} that stopped ({describe(stale)})",
                  file=sys.stderr)
        durable.write_json(holder_file, {"pid": os.getpid(), "host": socket.gethostname(),
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv})
        _HELD[self.key] = 1
        return self

    def __exit__(self, *exc) -> None:
        _HELD[self.key] -= 1
        if _HELD[self.key]:
            return
        del _HELD[self.key]
        (self.directory / HOLDER_FILE).unlink(missing_ok=True)
        self.lock.release()


def check_directory(directory: Path, what: str = "run") -> None:
    """Refuse, in one line, a ``--output-dir`` that names an existing file (mkdir would raise FileExistsError)."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a {what} directory; choose another --output-dir")


def read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
