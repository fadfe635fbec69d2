"""Forgetting checks: what a stage costs outside its task, scored at every evaluation point.

Both kinds are ordinary metrics rows, so reports and studies read them unchanged:

- corpus perplexity, ``split: general/<name>``, metrics ``loss`` and ``perplexity`` (``n`` = target tokens),
  on the held-out documents (the last ``heldout``) of a corpus window from any CPT source. Giving a CPT stage's
  own corpus window scores exactly the documents it holds out; a CPT stage refuses to train on the documents
  of any forgetting corpus.
- cross-task accuracy: another registered task's test splits scored by the shared evaluator with the run's
  ``eval`` settings; its rows carry that task's ``task``, ``task_version`` and ``split_fingerprints``.
  The tasks a stage mixes into its data (biopost.mixture) are scored the same way, on the run's
  ``eval.splits`` (their val is reported, never selected on). No task's scored inputs may be inputs the run
  trains on through another task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from biopost.config import ConfigError, EvalConfig, RunConfig
from biopost.data import Example, LeakageError
from biopost.data.corpus import load_corpus
from biopost.evaluation import evaluate


@dataclass(frozen=True)
class CrossTask:
    task: object
    splits: dict[str, list[Example]]
    fingerprints: dict[str, str]


@dataclass(frozen=True)
class Side:
    """A task's examples on one side of a cross-task leakage check: its training or its scored examples."""

    task: object
    examples: list[Example] | dict[str, list[Example]]
    allow_overlap: bool  # scored side: its split.allow_overlap lets it score inputs another task trains on
    role: str


@dataclass(frozen=True)
class ForgettingChecks:
    eval_cfg: EvalConfig
    corpora: dict[str, list[str]]  # name -> held-out documents
    tasks: list[CrossTask]
    packed: dict = field(default_factory=dict, compare=False, repr=False)  # name -> (tokenizer, blocks)

    def evaluate(self, policy, known_losses: dict | None = None,
                 backend=None) -> tuple[list[dict], dict[str, list[dict]]]:
        """Rows for every check, and per-example records of the other tasks keyed ``<task>/<split>``.
        ``known_losses``: ``(documents, seq_length) -> (loss, tokens)`` already computed with ``policy`` (a CPT
        stage's held-out window), reused rather than computed again. ``backend``: the evaluator's generation
        backend (models/generation.py), the same as the run's task sees."""
        from biopost.stages.cpt import heldout_loss, pack, perplexity_rows, tokenize_documents

        cfg = self.eval_cfg.forgetting
        rows, records = [], {}
        eos = policy.tokenizer.eos_token_id
        for name, docs in self.corpora.items():
            known = (known_losses or {}).get((tuple(docs), cfg.seq_length))
            if known is not None:
                rows += perplexity_rows(f"general/{name}", *known)
                continue
            tokenizer, blocks = self.packed.get(name, (None, None))
            if tokenizer is not policy.tokenizer:  # tokenized once per stage (each stage loads its own tokenizer)
                blocks = pack(tokenize_documents(policy.tokenizer, docs, eos), cfg.seq_length, eos)
                self.packed[name] = (policy.tokenizer, blocks)
            rows += perplexity_rows(f"general/{name}", *heldout_loss(policy, blocks, cfg.batch_size))
        for other in self.tasks:
            found, recs = evaluate(policy, other.task, other.splits, self.eval_cfg, backend)
            about = {"task": other.task.name, "task_version": other.task.version,
                     "split_fingerprints": other.fingerprints}
            rows += [{**about, **row} for row in found]
            records.update({f"{other.task.name}/{split}": r for split, r in recs.items()})
        return rows, records

    def check_not_trained_on(self, docs: list[str]) -> None:
        """A CPT stage must not train on documents a forgetting corpus scores."""
        train = set(docs)
        for name, held in self.corpora.items():
            hits = sum(d in train for d in held)
            if hits:
                raise LeakageError(f"the CPT corpus trains on {hits} documents of forgetting corpus {name!r}; give "
                                   f"eval.forgetting.corpora.{name} the CPT corpus window itself, or a disjoint one")


def load_forgetting(config: RunConfig, task, splits, mixed: dict | None = None) -> ForgettingChecks | None:
    """Corpus windows, other tasks' test splits and the mixed tasks' eval splits (``mixed``: name -> (task,
    splits), see biopost.mixture), loaded once before any model (None when nothing is checked)."""
    from biopost.pipeline import load_task_and_splits

    cfg, mixed = config.eval.forgetting, mixed or {}
    if not cfg.corpora and not cfg.tasks and not mixed:
        return None
    corpora = {name: load_corpus(corpus, splits=splits).heldout for name, corpus in cfg.corpora.items()}
    mixed_configs = config.mixed_tasks()
    trained = [Side(task, list(splits.train), False, "the run's task")]
    trained += [Side(t, list(s.train), False, "mixed task") for t, s in mixed.values()]
    scored = [Side(task, nonempty(splits, config.eval.splits), config.task.split.allow_overlap, "the run's task")]
    tasks = []
    for other in cfg.tasks:
        if other.name == task.name:
            raise ConfigError(f"eval.forgetting.tasks: {other.name} is the run's own task, evaluated already")
        other_task, other_splits = load_task_and_splits(config.model_copy(update={"task": other}))
        chosen = nonempty(other_splits, other.splits)
        scored.append(Side(other_task, chosen, other.split.allow_overlap, "forgetting task"))
        tasks.append(CrossTask(other_task, chosen, other_splits.fingerprints()))
    for name, (other_task, other_splits) in mixed.items():
        chosen = nonempty(other_splits, config.eval.splits)
        scored.append(Side(other_task, chosen, mixed_configs[name].split.allow_overlap, "mixed task"))
        tasks.append(CrossTask(other_task, chosen, other_splits.fingerprints()))
    for test in scored:
        for train in trained:
            if test.task is not train.task and not test.allow_overlap:
                check_unseen(test, train)
    return ForgettingChecks(config.eval, corpora, tasks)


def nonempty(splits, names) -> dict[str, list[Example]]:
    """The examples of each split named in ``names`` that holds any (what a task is scored on)."""
    return {name: list(splits[name]) for name in names if splits[name]}


def check_unseen(test: Side, train: Side) -> None:
    """One task's scored inputs must not be inputs the run trains on through another task (compared as each
    model reads them)."""
    seen = {train.task.input_key(e): e.id for e in train.examples}
    hits = [(seen[h], e.id) for examples in test.examples.values() for e in examples
            if (h := test.task.input_key(e)) in seen]
    if hits:
        shown = ", ".join(f"{a} ~ {b}" for a, b in hits[:5])
        raise LeakageError(f"{len(hits)} examples of {test.role} {test.task.name} have the inputs of training "
                           f"examples of {train.role} {train.task.name} ({shown}); set the scored task's "
                           "split.allow_overlap: true to score them anyway")
