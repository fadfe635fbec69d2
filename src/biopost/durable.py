"""Writes that survive a kill at any instant.

- Whole files (``splits.json``, ``selection.json``, the results table...) are written to a temporary file in
  the same directory, fsynced, and renamed over the target: a reader sees the old file or the new one.
- JSON lines (``metrics.jsonl``) are appended whole and fsynced; a line torn by a kill is the last one, has
  no newline, and is dropped (with a note) when the file is read or appended to again.
- Checkpoint directories are written under a temporary name, given a ``manifest.json`` (size and sha256
  of every file), fsynced and renamed into place; :func:`check_manifest` tells a complete copy from a
  truncated or corrupted one.

Python's ``os.replace`` is atomic on POSIX file systems; the fsyncs make the rename durable too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"  # partial writes carry this prefix; a later write or resume removes them


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: Path, obj, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent))


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a library that writes files itself (pandas, pyarrow); renamed
    over ``path`` once the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- JSON lines
def append_lines(path: Path, lines: list[str], sync: bool = True) -> None:
    """Append whole lines in one write and fsync; a torn last line left by a kill is cut off first.

    ``sync=False`` leaves the lines with the operating system (they survive a killed process, not a power cut)
    until the next synced append to the file: for rows written every training step, where an fsync each
    costs more than a small model's step (benchmarks/run_all.py, sft_*)."""
    if not lines:
        return
    path = Path(path)
    drop_torn_tail(path)
    with open(path, "ab") as fh:
        fh.write("".join(line + "\n" for line in lines).encode())
        fh.flush()
        if sync:
            os.fsync(fh.fileno())


def drop_torn_tail(path: Path) -> bool:
    """Cut a last line without its newline (an append cut short by a kill); True if one was cut."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return False
        fh.seek(0)
        content = fh.read()
        keep = content.rfind(b"\n") + 1
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    print(f"{path}: dropped a torn last line ({len(content) - keep} bytes) left by an interrupted write",
          file=sys.stderr)
    return True


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (no newline) is ignored, a bad line elsewhere is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]  # text after the last newline never finished writing
    if torn.strip():
        print(f"{path}: ignoring a torn last line left by an interrupted write", file=sys.stderr)
    rows = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg}); the file was edited or damaged") from None
    return rows


def write_lines(path: Path, lines: list[str]) -> Path:
    """Replace a JSON-lines file as a whole (atomically)."""
    return write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------- checkpoint directories
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> Path:
    """Record size and sha256 of every file under ``directory`` (fsynced) in its ``manifest.json``."""
    directory = Path(directory)
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
        files[file.relative_to(directory).as_posix()] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    return write_json(directory / MANIFEST, {"files": files})


def check_manifest(directory: Path) -> str | None:
    """None if every file of the manifest is present with its size and checksum, else what is wrong."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "manifest.json is damaged"
    for name, meta in files.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != meta["size"]:
            return f"{name} is truncated ({file.stat().st_size} of {meta['size']} bytes)"
        if sha256_file(file) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


@contextlib.contextmanager
def publishing(target: Path) -> Iterator[Path]:
    """A temporary directory beside ``target`` to write a checkpoint into; on success it gets a manifest and
    replaces ``target`` by rename, so ``target`` is always absent, the old copy, or the complete new one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{TMP_PREFIX}{os.getpid()}-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, replacing an existing directory (moved aside first, then deleted)."""
    old = target.with_name(f"{TMP_PREFIX}old-{os.getpid()}-{target.name}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(source, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_partial(directory: Path) -> None:
    """Delete the temporary files and directories interrupted writes left anywhere under ``directory``."""
    for entry in sorted(Path(directory).rglob(f"{TMP_PREFIX}*"), key=lambda p: len(p.parts)):
        if not entry.exists():  # inside one removed just before
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
