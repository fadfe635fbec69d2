"""``table``: a task defined only in a config, over your own table or a Hugging Face dataset.

Rows become examples through a column map; a Jinja template (sandboxed: data is inserted as text and
never run) words the question; the answer kind says how a completion is scored::

    task:
      name: table
      options:
        source: cells.csv                      # or a Hub dataset id
        columns: {id: cell_id, answer: cell_type, group: phase}
        prompt: "Genes of one cell, most expressed first: {{ genes }}. Which cell type is it?"
        answer_kind: label
      split: {ood_test_groups: [S, G2M]}

Sources: a local ``.csv`` / ``.tsv`` (read as text, exactly as written), ``.parquet``, ``.jsonl`` or
``.json`` file; a directory written by ``datasets``' ``save_to_disk``; a local data directory; or a Hub
dataset id with ``subset`` / ``split`` / ``revision`` (both of the latter through ``datasets``).

Prompt variables: every column except the id, answer and reasoning columns (``columns.fields`` narrows
them), a payload column under its own name shown through :meth:`Task.sequence_text` (its text, or the
modality's placeholder when the model reads it through an encoder), and ``choices`` (the label set; empty
for numbers and strings). Every column except payloads is also split metadata, so ``split.ood_field`` may
name any of them; ``columns.group`` is the default.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from biopost.config import ConfigError
from biopost.data import Example
from biopost.data.sequences import check_sequence
from biopost.registry import register_task
from biopost.tasks.answer_kinds import exact, label_set, parse_number, set_scores, split_labels, within
from biopost.tasks.base import LabelTask, TaskOptions
from biopost.tasks.parsing import match_label, normalize
from biopost.tasks.prompts import PromptTemplate, compile_template

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
                ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
RESERVED = ("choices",)  # prompt variables the task adds; a column of that name would be shadowed


class ColumnMap(BaseModel):
    """Which column holds what. Only ``answer`` and ``group`` are required."""

    model_config = ConfigDict(extra="forbid")

    answer: str = Field(..., description="the gold answer (a label, a list of labels, a number or a string)")
    group: str = Field(..., description="OOD groups: held-out values form ood_test (the split's default ood_field)")
    id: str | None = Field(None, description="unique example ids; None = the row number ('row-<i>')")
    reasoning: str | None = Field(None, description="a written rationale, put inside <think> in SFT targets")
    dna: str | list[str] | None = Field(None, description="DNA sequence column(s): payloads an encoder may read")
    protein: str | list[str] | None = Field(None, description="protein sequence column(s)")
    cell: str | None = Field(None, description="a cell: genes by decreasing expression (list or spaced string), "
                             "or {gene: value}")
    fields: list[str] | None = Field(None, description="columns the prompt may use; None = all the others")

    @model_validator(mode="after")
    def _fields_hide_the_answer(self) -> "ColumnMap":
        shown = sorted(set(self.fields or []) & {self.answer, self.reasoning})
        if shown:
            raise ValueError(f"fields include {shown[0]!r}, the answer or reasoning column: a prompt must not "
                             "contain what the model is asked to give")
        return self

    def payloads(self) -> dict[str, list[str]]:
        """Payload columns by modality (a modality may have several, e.g. reference and variant)."""
        out = {}
        for modality in ("dna", "protein", "cell"):
            value = getattr(self, modality)
            if value is not None:
                out[modality] = [value] if isinstance(value, str) else list(value)
        return out

    def roles(self) -> dict[str, str]:
        """Column -> the key in ``task.options.columns`` that names it (for error messages)."""
        out = {getattr(self, k): k for k in ("answer", "group", "id", "reasoning") if getattr(self, k)}
        for modality, cols in self.payloads().items():
            out.update({c: modality for c in cols})
        out.update({c: "fields" for c in self.fields or []})
        return out


class TableOptions(TaskOptions):
    source: str = Field(..., description="a .csv/.tsv/.parquet/.jsonl/.json file, a datasets directory, or a Hub id")
    format: Literal["csv", "tsv", "parquet", "jsonl", "json"] | None = Field(
        None, description="file format; None = from the file's suffix")
    subset: str | None = Field(None, description="Hub / data directory: the dataset configuration")
    split: str = Field("train", description="Hub / datasets directory: the split holding the rows (biopost "
                       "re-splits them by task.split)")
    revision: str | None = Field(None, description="Hub: a branch, tag or commit")
    columns: ColumnMap
    prompt: str = Field(..., description="Jinja template of the user prompt over the columns")
    answer_kind: Literal["label", "multilabel", "number", "exact"] = "label"
    labels: list[str] | None = Field(None, description="label / multilabel: the label set; None = the labels "
                                     "of the training split")
    separator: str = Field(";", min_length=1, description="multilabel: between labels in a cell and an answer")
    tolerance: float = Field(0.0, ge=0, description="number: absolute tolerance")
    relative_tolerance: float = Field(0.0, ge=0, description="number: tolerance relative to |gold|")

    @field_validator("prompt")
    @classmethod
    def _compiles(cls, prompt: str) -> str:
        PromptTemplate(prompt)
        return prompt

    @model_validator(mode="after")
    def _options_fit_the_kind(self) -> "TableOptions":
        only = {"labels": ("label", "multilabel"), "separator": ("multilabel",),
                "tolerance": ("number",), "relative_tolerance": ("number",)}
        for key, kinds in only.items():
            if key in self.model_fields_set and self.answer_kind not in kinds:
                raise ValueError(f"{key} applies to answer_kind {' or '.join(kinds)}, not {self.answer_kind}")
        return self


SYSTEM_PROMPTS = {
    "label": "reply with one line 'Answer: <one of the choices>'.",
    "multilabel": "reply with one line 'Answer: <label>{sep} <label>...' naming every label that applies.",
    "number": "reply with one line 'Answer: <number>'.",
    "exact": "reply with one line 'Answer: <answer>'.",
}


@register_task
class TableTask(LabelTask):
    name = "table"
    domain = "table"
    version = "1"
    Options = TableOptions
    default_ood_test_groups = 0.25
    user_template_key = "task.options.prompt"

    def __init__(self, options: TableOptions):
        super().__init__(options)
        opts = self.options
        self.user_template = opts.prompt
        self.default_ood_field = opts.columns.group
        self.labels: list[str] = list(opts.labels or [])
        if opts.labels is not None:
            check_distinct_labels(self.labels, "task.options.labels")
        self.answers: set[str] = set()  # every gold label in the table, checked against the label set
        self.field_columns: list[str] | None = None  # the prompt's columns, set by load()
        self.payload_columns = opts.columns.payloads()  # modality -> its columns
        self.split_on = opts.separator.strip() or opts.separator  # multilabel: items are stripped anyway
        self.join_with = opts.separator if opts.separator.isspace() else self.split_on + " "
        self.primary_metric = self.reward_metric = "f1" if opts.answer_kind == "multilabel" else "accuracy"
        self.system_prompt = ("You are a careful biologist. Think step by step inside <think> </think>, then "
                              + SYSTEM_PROMPTS[opts.answer_kind].format(sep=opts.separator.strip() or " "))

    # ---- data
    def recorded_options(self, options: dict) -> dict:
        """A local source as an absolute path (resolved from the directory the run started in), so that a
        checkpoint's ``eval`` and ``predict`` find the table from any directory."""
        path = Path(self.options.source).expanduser()
        return {**options, "source": str(path.resolve())} if path.exists() else options

    def load(self) -> list[Example]:
        rows, columns, where = read_rows(self.options)
        check_columns(self.options.columns, columns, where)
        self.field_columns = self._field_columns(columns)
        examples = [self._example(row, i, where, self.field_columns) for i, row in enumerate(rows)]
        ids = [e.id for e in examples]
        if len(set(ids)) != len(ids):
            repeated = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
            raise ValueError(f"{where}: column {self.options.columns.id!r} (columns.id) repeats ids, e.g. {repeated}")
        if self.options.answer_kind in ("label", "multilabel"):
            self.answers = {a for e in examples for a in self._gold_items(e)}
            check_distinct_labels(sorted(self.answers), f"column {self.options.columns.answer!r} (columns.answer)")
            if self.options.labels is not None:
                self._check_answers_in_labels("task.options.labels")
        return examples

    def fit(self, train) -> None:
        """The label set, when not given, is read from the training split only."""
        if self.options.answer_kind not in ("label", "multilabel") or self.options.labels is not None:
            return
        self.labels = sorted({a for e in train for a in self._gold_items(e)})
        self._check_answers_in_labels("the label set read from the training split")

    def _check_answers_in_labels(self, what: str) -> None:
        unknown = sorted(self.answers - set(self.labels))
        if unknown:
            raise ValueError(f"{len(unknown)} answer{'s' if len(unknown) > 1 else ''} not in {what}: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}; list every label in task.options.labels")

    def _field_columns(self, columns: list[str]) -> list[str]:
        cmap = self.options.columns
        if cmap.fields is not None:
            return list(cmap.fields)
        taken = {cmap.answer, cmap.id, cmap.reasoning} | {c for cols in self.payload_columns.values() for c in cols}
        return [c for c in columns if c not in taken]

    def _example(self, row: dict[str, Any], index: int, where: str, field_columns: list[str],
                 answer_required: bool = True, fallback_id: str | None = None) -> Example:
        cmap = self.options.columns
        rid = row.get(cmap.id) if cmap.id else None
        if is_missing(rid):
            if cmap.id and fallback_id is None:
                raise ValueError(f"{where}: row {index} has no id in column {cmap.id!r} (columns.id)")
            rid = fallback_id or f"row-{index}"
        rid = str(rid)
        payloads = {}
        for modality, cols in self.payload_columns.items():
            values = []
            for col in cols:
                if is_missing(row.get(col)):
                    raise ValueError(f"{where}: example {rid!r} has no {modality} in column {col!r} (columns.{modality})")
                if modality != "cell":  # checked, but passed on as written (case kept: soft-masking is data)
                    check_sequence(str(row[col]), modality, f"{where}: example {rid!r}, column {col!r}")
                values.append(row[col])
            payloads[modality] = to_cell(values[0], rid) if modality == "cell" else (
                str(values[0]) if len(values) == 1 else tuple(str(v) for v in values))
        answer = row.get(cmap.answer)
        if is_missing(answer):
            if answer_required:
                raise ValueError(f"{where}: example {rid!r} has no answer in column {cmap.answer!r} (columns.answer)")
            answer = ""
        else:
            answer = self._answer_text(answer, rid, where)
        reasoning = row.get(cmap.reasoning) if cmap.reasoning else None
        if answer_required and is_missing(row.get(cmap.group)):
            raise ValueError(f"{where}: example {rid!r} has no group in column {cmap.group!r} (columns.group)")
        # Split metadata: every column but payloads and the rationale (the answer as scored), so any can be ood_field.
        skip = {cmap.reasoning} | {col for cols in self.payload_columns.values() for col in cols}
        meta = {**{c: v for c, v in row.items() if c not in skip}, cmap.answer: answer}
        # A column a JSON row lacks stays absent (a prompt naming it fails on that row); null is an empty value.
        return Example(id=rid, fields={c: row[c] for c in field_columns if c in row}, answer=answer,
                       reasoning="" if is_missing(reasoning) else str(reasoning).strip(), **payloads, meta=meta)

    def _answer_text(self, value: Any, rid: str, where: str) -> str:
        kind = self.options.answer_kind
        if kind == "multilabel":
            if isinstance(value, (list, tuple)):
                items = [text for text in (str(v).strip() for v in value) if text]
            else:
                items = split_labels(str(value), self.options.separator)
            if not items:  # no completion can say "nothing" (an empty Answer: line is no answer): refuse, don't score 0
                raise ValueError(f"{where}: example {rid!r} has no labels in column {self.options.columns.answer!r} "
                                 "(columns.answer); give every row at least one label, e.g. 'none' for no label")
            return self.join_with.join(items)
        text = str(value).strip()
        if kind == "number" and parse_number(text) is None:
            raise ValueError(f"{where}: example {rid!r}: answer {text!r} is not a number (answer_kind: number)")
        return text

    def _gold_items(self, example: Example) -> list[str]:
        if self.options.answer_kind == "multilabel":
            return split_labels(example.answer, self.split_on)
        return [example.answer]

    def example_from_input(self, record: dict, where: str) -> Example:
        """A row with the table's columns (answer, group and id may be absent; the id defaults to ``where``)."""
        check_columns(self.options.columns, list(record), where, required_only=True)
        template = self.user_override or compile_template(self.user_template)
        missing = sorted(template.variables - set(record) - set(RESERVED))
        if missing:
            raise ValueError(f"{where}: no column {missing[0]!r}, which the prompt uses; columns: {', '.join(record)}")
        fields = self.field_columns or self._field_columns(list(record))
        return self._example(record, 0, where, fields, answer_required=False, fallback_id=where)

    # ---- prompt
    def prompt_variables(self, example: Example) -> dict:
        variables = dict(example.fields)
        for modality, cols in self.payload_columns.items():
            payload = getattr(example, modality)
            if modality == "cell":
                variables[cols[0]] = self.sequence_text("cell", " ".join(payload["genes"]))
                continue
            sequences = (payload,) if isinstance(payload, str) else payload
            variables.update({col: self.sequence_text(modality, seq) for col, seq in zip(cols, sequences)})
        variables["choices"] = list(self.labels) if self.options.answer_kind in ("label", "multilabel") else []
        return variables

    # ---- scoring
    def score(self, completion: str, example: Example) -> dict[str, float]:
        kind = self.options.answer_kind
        if kind == "label":
            return super().score(completion, example)
        strict, lenient = self.parse(completion, "strict"), self.parse(completion, "lenient")
        out = {"format": float(strict is not None)}
        if kind == "multilabel":
            gold = set(self._gold_items(example))
            scores = set_scores(label_set(lenient, self.labels, self.split_on, "lenient"), gold)
            strict_f1 = set_scores(label_set(strict, self.labels, self.split_on, "strict"), gold)["f1"]
            return {**scores, "f1_strict": strict_f1, **out}
        if kind == "number":
            gold = parse_number(example.answer)
            tol = (self.options.tolerance, self.options.relative_tolerance)
            return {"accuracy": float(within(parse_number(lenient, "lenient"), gold, *tol)),
                    "accuracy_strict": float(within(parse_number(strict), gold, *tol)), **out}
        return {"accuracy": float(exact(lenient, example.answer)), "accuracy_strict": float(exact(strict, example.answer)),
                **out}

    def prediction(self, completion: str) -> dict[str, str | None]:
        kind = self.options.answer_kind
        if kind == "label":
            return super().prediction(completion)
        out = {}
        for mode in ("strict", "lenient"):
            parsed = self.parse(completion, mode)
            if kind == "multilabel" and parsed is not None:
                parsed = self.join_with.join(sorted(label_set(parsed, self.labels, self.split_on, mode))) or None
            elif kind == "number":
                value = parse_number(parsed, mode)
                parsed = None if value is None else str(value)  # exactly as parsed, never rounded
            out[mode] = parsed
        return out


# ---------------------------------------------------------------- reading rows
def read_rows(opts: TableOptions) -> tuple[list[dict[str, Any]], list[str], str]:
    """(rows as plain Python values, column names in order, a name for messages)."""
    path = Path(opts.source).expanduser()
    if path.is_file():
        refuse(opts, ("subset", "split", "revision"), "a file")
        return read_file(path, opts.format) + (path.name,)
    refuse(opts, ("format",), "a dataset (datasets reads its files)")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            refuse(opts, ("subset", "revision"), "a save_to_disk directory")
            return read_saved_dataset(path, opts.split, "split" in opts.model_fields_set) + (path.name,)
        return read_hub(str(path), opts) + (path.name,)
    if opts.format or path.suffix.lower() in FILE_FORMATS or path.is_absolute() or opts.source.startswith("."):
        raise FileNotFoundError(f"table not found: {opts.source} (relative paths start at {Path.cwd()}); set "
                                "task.options.source to a file, a datasets directory or a Hub dataset id (eval / "
                                "predict of a checkpoint whose table moved: --option source=NEW_PATH)")
    return read_hub(opts.source, opts) + (opts.source,)


def refuse(opts: TableOptions, keys: tuple[str, ...], what: str) -> None:
    """Options that would be ignored for this kind of source are errors, not silent no-ops."""
    given = [k for k in keys if k in opts.model_fields_set]
    if given:
        raise ConfigError(f"task.options.{given[0]} does not apply to {what} ({opts.source})")


def read_file(path: Path, fmt: str | None) -> tuple[list[dict], list[str]]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst", ".zip"):  # pandas decompresses by suffix
        suffixes = suffixes[:-1]
    fmt = fmt or (FILE_FORMATS.get(suffixes[-1]) if suffixes else None)
    if fmt is None:
        raise ConfigError(f"cannot tell the format of {path.name}; set task.options.format "
                          f"({', '.join(sorted(set(FILE_FORMATS.values())))})")
    if fmt in ("csv", "tsv"):
        import pandas as pd

        # Text exactly as written: no id "0001" -> 1, no "NA" -> missing, no 3 -> 3.0 when a cell is empty.
        frame = pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False)
        return frame.to_dict("records"), [str(c) for c in frame.columns]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.to_pylist(), list(table.column_names)
    if fmt == "json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path.name}: a .json table must be a list of objects (one per row); use .jsonl for lines")
    else:
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path.name}:{number}: not valid JSON ({err.msg})") from None
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return rows, columns


def read_saved_dataset(path: Path, split: str, split_given: bool = False) -> tuple[list[dict], list[str]]:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if not isinstance(data, DatasetDict) and split_given:
        raise ConfigError(f"task.options.split ({split}) does not apply to {path.name}: it holds one Dataset, "
                          "not splits; remove task.options.split")
    if isinstance(data, DatasetDict):
        if split not in data:
            raise ValueError(f"{path.name} has no split {split!r}; splits: {', '.join(data)} (set task.options.split)")
        data = data[split]
    return data.to_list(), list(data.column_names)


def read_hub(source: str, opts: TableOptions) -> tuple[list[dict], list[str]]:
    """A Hub dataset id (or a local data directory), through ``datasets.load_dataset``."""
    from datasets import Features, Value, load_dataset

    try:
        data = load_dataset(source, opts.subset, split=opts.split, revision=opts.revision)
        if data.builder_name == "csv":  # read as text, as a local file is: no id "0036" -> 36, no "NA" -> missing
            as_text = Features({column: Value("string") for column in data.column_names})
            data = load_dataset(source, opts.subset, split=opts.split, revision=opts.revision, features=as_text,
                                keep_default_na=False)
    except Exception as err:  # network, unknown id, unknown split or subset: one line, with what was asked
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not load dataset {source!r} (subset {opts.subset}, split {opts.split}, "
                         f"revision {opts.revision}): {type(err).__name__}: {message}") from None
    return data.to_list(), list(data.column_names)


def check_columns(cmap: ColumnMap, present: list[str], where: str, required_only: bool = False) -> None:
    """Every mapped column exists; the error names the missing one, its role and the columns present."""
    for column, role in cmap.roles().items():
        if required_only and role in ("answer", "group", "reasoning", "id", "fields"):
            continue
        if column not in present:
            raise ValueError(f"{where} has no column {column!r} (task.options.columns.{role}); "
                             f"columns: {', '.join(present)}")
    clash = [c for c in RESERVED if c in present and c in (cmap.fields or present)]
    if clash:
        raise ValueError(f"{where}: column {clash[0]!r} has the name of a prompt variable the task adds; rename it "
                         "or leave it out with task.options.columns.fields")


def check_distinct_labels(labels: list[str], what: str) -> None:
    """No two labels may be one answer once parsed (case, spaces, quotes, a final period): neither could
    ever be scored correct.

    >>> check_distinct_labels(["A", "B", "a."], "task.options.labels")
    Traceback (most recent call last):
    ...
    ValueError: labels 'A' and 'a.' in task.options.labels are the same answer to the scorer (case, spaces, quotes and a final period are ignored), so neither can be scored correct; merge or rename them in the table or task.options.labels
    """
    seen: dict[str, str] = {}
    for label in labels:
        other = seen.setdefault(normalize(label), label)
        if other != label:
            raise ValueError(f"labels {other!r} and {label!r} in {what} are the same answer to the scorer (case, "
                             "spaces, quotes and a final period are ignored), so neither can be scored correct; "
                             "merge or rename them in the table or task.options.labels")


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and value != value)


def to_cell(value: Any, rid: str) -> dict[str, Any]:
    """A cell payload: ``{gene: value}`` (sorted by decreasing value) or genes already ordered by expression.

    >>> to_cell({"CD3E": 1.0, "LYZ": 5.0, "XIST": 0.0}, "c1")
    {'genes': ['LYZ', 'CD3E'], 'values': [5.0, 1.0]}
    >>> to_cell("LYZ CD74  CST3", "c1")
    {'genes': ['LYZ', 'CD74', 'CST3'], 'values': None}
    """
    if isinstance(value, dict):
        expressed = {str(g): float(v) for g, v in value.items() if v is not None and float(v) > 0}
        genes = sorted(expressed, key=lambda g: -expressed[g])
        return {"genes": genes, "values": [expressed[g] for g in genes]}
    genes = [str(g) for g in value] if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    if not genes:
        raise ValueError(f"example {rid!r}: the cell column lists no genes")
    return {"genes": genes, "values": None}
