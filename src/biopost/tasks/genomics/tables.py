"""Read the records of a genomics task from the Hugging Face hub or from a local file in the same schema.

One code path (``datasets.load_dataset``) serves both: a hub id with an optional pinned ``revision``, or a
local ``.csv`` / ``.jsonl`` / ``.json`` / ``.parquet`` file. Every split of a hub dataset is read and each
row is tagged with ``source_split`` (``file`` for a local file): tasks re-split by their own rule, and the
published split stays available as a metadata field (``task.split.ood_field: source_split``).
"""

from __future__ import annotations

import json

from pathlib import Path

LOCAL_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def read_records(source: str, revision: str | None, required: list[str], schema: str) -> list[dict]:
    """Rows as dicts of strings plus ``source_split`` and ``source_row`` (the row's number in its split); a
    missing column is a one-line error naming the schema."""
    from datasets import load_dataset

    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_BUILDERS or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"task data file not found: {path}; set task.options.source to a file or a hub id")
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{path.name}: unsupported file type; use one of {', '.join(LOCAL_BUILDERS)}")
        data = {"file": load_dataset(builder, data_files=str(path), split="train")}
    elif source.count("/") == 1:
        try:
            data = load_dataset(source, revision=revision)
        except Exception as err:  # the hub raises many error types; the user needs one line and the fix
            raise FileNotFoundError(
                f"could not load dataset {source!r} (revision {revision}) from the Hugging Face hub "
                f"({err.__class__.__name__}); check the id and your connection, or give a local file"
            ) from None
    else:
        raise ValueError(f"task.options.source {source!r} is neither a file nor a hub dataset id (owner/name)")
    rows = []
    for split, table in data.items():
        missing = [c for c in required if c not in table.column_names]
        if missing:
            raise ValueError(f"{source} ({split}) lacks column(s) {missing}; the {schema} schema has "
                             f"{', '.join(required)} (found: {', '.join(table.column_names)})")
        for number, row in enumerate(table):
            text = {k: "" if v is None else str(v) for k, v in row.items()}
            rows.append({**text, "source_split": split, "source_row": number})
    if not rows:
        raise ValueError(f"{source} holds no rows")
    return rows


def unique_inputs(examples: list, task: str) -> tuple[list, int]:
    """Examples with identical inputs (prompt fields and payloads) kept once, the first; and how many were dropped.

    Hub datasets hold such duplicates; kept twice, one could land in train and its copy in a test split.
    """
    kept, seen = [], set()
    for example in examples:
        key = json.dumps({"fields": example.fields, **example.payloads()}, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            kept.append(example)
    if len(kept) < len(examples):
        print(f"{task}: dropped {len(examples) - len(kept)} records whose inputs repeat an earlier record")
    return kept, len(examples) - len(kept)


def record_id(row: dict, key: str = "ID") -> str:
    """The row's own id when the schema has one, else ``<source split>-<row number>``.

    >>> record_id({"ID": "k7", "source_split": "train", "source_row": 3})
    'k7'
    >>> record_id({"source_split": "test", "source_row": 3})
    'test-3'
    """
    return row.get(key) or f"{row['source_split']}-{row['source_row']}"
