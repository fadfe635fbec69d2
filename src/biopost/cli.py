"""`biopost ...` commands: parse arguments, call the library, print. Errors are one line, no traceback."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from biopost import distributed
from biopost.config import DEVICES, TEST_SPLITS, ConfigError, EvalConfig
from biopost.locks import DirectoryBusy, DirectoryLock
from biopost.resources import ResourceError, disk_full_advice


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``biopost eval: argument --splits: invalid choice ...``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="biopost", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a pipeline config (stages in order) into a run directory")
    p.add_argument("config", type=Path)
    p.add_argument("--output-dir", type=Path, default=None, help="run directory (default runs/<name>-<run id>)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.lora.rank=64")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a task's splits with the shared evaluator")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--task", required=True)
    p.add_argument("--splits", nargs="+", default=["val", "id_test", "ood_test"], choices=TEST_SPLITS)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--output", type=Path, default=None, help="JSONL of summary rows (default: print)")
    add_checkpoint_options(p)
    add_memory_options(p, "default: the checkpoint's eval.batch_size")
    add_backend_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="answer your own examples (JSONL in the task's input format)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--task", required=True)
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", type=Path, default=None, help="JSONL out (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    add_checkpoint_options(p)
    add_memory_options(p, f"default {EvalConfig.model_fields['batch_size'].default}")
    add_backend_option(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("summary", help="a run's metric per stage, step and split; writes an ID/OOD curve plot")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--metric", default="accuracy")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("report", help="a self-contained HTML report (and Markdown twin) of a study or run directory")
    p.add_argument("directory", type=Path, help="study directory (biopost study run --output-dir) or run directory")
    p.add_argument("--output", type=Path, default=None, help="HTML file (default DIRECTORY/report.html); .md beside it")
    p.add_argument("--metric", default=None, help="default: the metric checkpoints were selected on")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("baseline", help="fit a classical classifier on task features (C chosen on val); write baseline rows")
    p.add_argument("config", type=Path)
    p.add_argument("--output-dir", type=Path, required=True, help="directory for metrics.jsonl, baseline.json, predictions/")
    p.add_argument("--features", default="auto", help="auto, kmer, expression, or registered names joined by +")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. eval.max_examples=null")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("tasks", help="list registered tasks with their split sizes")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("demo", help="the embedded study: three modalities, SFT lengths, RL, CPT, fusion, baselines "
                       "(about 10 minutes on 2 CPU cores; a rerun continues)")
    p.add_argument("--output-dir", type=Path, default=Path("studies/demo"), help="study directory (default studies/demo)")
    p.add_argument("--seeds", type=int, default=1, help="repeat the study over seeds 0..N-1 (the report shows the spread)")
    p.add_argument("--executor", choices=["local", "ray"], default=None,
                   help="default: ray (one run per core, side by side) when installed and there are 2+ cores, else local")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of configs/studies/demo.yaml")
    p.set_defaults(func=cmd_demo)

    add_study_commands(sub.add_parser("study", help="plan, run and collect a study (many runs sharing prefixes)"))

    # argparse leaves KEY=VALUE overrides given after an option (train CFG --output-dir D k=v) unmatched.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args) or 0
    except (ConfigError, FileNotFoundError, ValueError, DirectoryBusy, ResourceError) as err:
        # a config error is found alike by every process of a launched run: the main one says it
        if distributed.is_main() or not isinstance(err, ConfigError):
            message = str(err).removeprefix(f"{args.command}: ")  # a stage's own name prefix, e.g. baseline:
            print(f"biopost {args.command}: {message}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno == errno.ENOSPC:  # a full disk outside a run (writing a table, a plan): say where the space went
            where = getattr(args, "output_dir", None) or getattr(args, "study_dir", None) or Path.cwd()
            print(f"biopost {args.command}: {disk_full_advice(Path(where), err)}", file=sys.stderr)
            return 2
        if err.filename is None:  # not about a file the user named: a bug, keep its traceback
            raise
        # a user's file or directory that cannot be read or written (permissions, a damaged file, a file where a
        # directory should be): name it; the library's traceback says nothing more to them
        names = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        print(f"biopost {args.command}: {names}: {err.strerror or err}", file=sys.stderr)
        return 2


def cmd_train(args) -> int:
    from biopost.config import load_config
    from biopost.pipeline import run

    config = load_config(args.config, args.overrides)
    out = args.output_dir or Path("runs") / f"{config.name}-{config.run_id()}"
    run_dir = run(config, out)
    if distributed.is_main():
        print(f"run directory: {run_dir}")
    return 0


def cmd_demo(args) -> int:
    from biopost.demo import default_executor, format_summary, run_demo

    result = run_demo(args.output_dir, args.seeds, args.overrides, args.executor or default_executor())
    print(format_summary(result["summary"]))
    print(f"\nthis invocation took {result['wall_s'] / 60:.1f} min; CPU in runs (every run, last attempt, this and "
          f"earlier invocations): {result['runs_cpu_s'] / 60:.1f} CPU-min; study directory: {args.output_dir}")
    if result["report"] is not None:
        print(f"report: {result['report']}")
    if result["failed"]:
        print(f"biopost demo: {len(result['failed'])} runs failed (logs in {args.output_dir / 'logs'}); "
              "rerun to retry them", file=sys.stderr)
        return 1
    return 0


def cmd_baseline(args) -> int:
    from biopost.baselines import run_baseline
    from biopost.config import load_config

    rows = run_baseline(load_config(args.config, args.overrides), args.output_dir, args.features)
    for row in rows:
        interval = "n/a" if row["ci_low"] is None else f"{row['ci_low']:.3f}-{row['ci_high']:.3f}"
        print(f"{row['split']:9s} accuracy {row['value']:.3f} (n={row['n']}, 95% CI {interval})")
    print(f"features {rows[0]['features']}, C={rows[0]['C']}; rows appended to {args.output_dir / 'metrics.jsonl'}")
    return 0


def add_study_commands(parser) -> None:
    sub = parser.add_subparsers(dest="study_command", required=True)
    p = sub.add_parser("plan", help="print the study's runs as a tree of shared prefixes, with step counts")
    p.add_argument("study", type=Path, help="study YAML (or a study directory)")
    p.add_argument("--dry-run", action="store_true", help="load no model and no data (epochs counted on train_examples)")
    p.add_argument("--json", action="store_true", help="one JSON object: runs, steps_executed, steps_naive, ...")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the study file")
    p.set_defaults(func=cmd_study_plan)

    p = sub.add_parser("run", help="run every unfinished run of the study (resumable)")
    p.add_argument("study", type=Path, help="study YAML (or a study directory, to resume it)")
    p.add_argument("--output-dir", type=Path, default=None, help="study directory (default studies/<name>)")
    p.add_argument("--executor", choices=["local", "ray", "slurm"], default="local")
    p.add_argument("--cpus-per-run", type=int, default=None,
                   help="CPUs (and torch threads) per run; ray / slurm default 1, local keeps torch's default")
    p.add_argument("--gpus-per-run", type=int, default=0, help="ray / slurm: GPUs each run asks for")
    p.add_argument("--address", default=None, help="ray: address of a running cluster (default: start a local one)")
    p.add_argument("--slurm-cluster", default=None, help="submitit cluster: slurm (default when found) or local")
    p.add_argument("--partition", default=None, help="slurm partition")
    p.add_argument("--time-min", type=int, default=24 * 60, help="slurm: time limit of each job, minutes")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the study file")
    p.set_defaults(func=cmd_study_run)

    p = sub.add_parser("collect", help="one tidy table of every finished run (results.parquet and .csv)")
    p.add_argument("study_dir", type=Path)
    p.set_defaults(func=cmd_study_collect)


def cmd_study_plan(args) -> int:
    from biopost.study.config import load_study
    from biopost.study.plan import make_plan

    plan = make_plan(load_study(args.study, args.overrides), load_data=not args.dry_run)
    print(json.dumps(plan.to_json()) if args.json else plan.tree())
    return 0


def cmd_study_run(args) -> int:
    from biopost.study.config import load_study
    from biopost.study.execute import Resources, execute
    from biopost.study.plan import prepare

    study = load_study(args.study, args.overrides)
    study_dir = args.output_dir or (args.study if args.study.is_dir() else Path("studies") / study.name)
    resources = Resources(cpus=args.cpus_per_run, gpus=args.gpus_per_run, address=args.address,
                          cluster=args.slurm_cluster, partition=args.partition, time_min=args.time_min)
    with DirectoryLock(study_dir, "study"):  # planning rewrites plan.json: one runner at a time
        failed = execute(prepare(study, study_dir), study_dir, args.executor, resources)
    if failed:
        print(f"biopost study run: {len(failed)} runs failed; rerun to retry them", file=sys.stderr)
        return 1
    print(f"study directory: {study_dir}; next: biopost study collect {study_dir}")
    return 0


def cmd_study_collect(args) -> int:
    from biopost.study.results import write_results

    parquet, csv, table, unfinished = write_results(args.study_dir)
    if unfinished:
        print(f"left out {len(unfinished)} unfinished runs: {', '.join(unfinished)}")
    print(f"{len(table)} rows from {table['run_id'].nunique()} runs -> {parquet} and {csv}")
    return 0


def quiet_libraries() -> None:
    """eval / predict print answers, not the libraries' loading bars and FutureWarnings (errors stay one line)."""
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def add_checkpoint_options(parser) -> None:
    """How eval / predict load a checkpoint: its device, a moved base model, remote code, changed task options."""
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto = CUDA when available")
    parser.add_argument("--base", type=Path, default=None,
                        help="base model of an adapter checkpoint, if moved from where it records")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the backbone's own code (only if you trust it)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="change a saved task option, e.g. source=NEW_PATH for a table moved since training")


def inference_options(args) -> dict:
    """The keyword arguments eval and predict both pass on (from :func:`add_checkpoint_options`,
    :func:`add_memory_options` and :func:`add_backend_option`)."""
    return dict(base=args.base, trust_remote_code=args.trust_remote_code, options=args.option,
                batch_size=args.batch_size, dtype=args.dtype, backend=args.backend)


def add_memory_options(parser, batch_default: str) -> None:
    """The options an out-of-GPU-memory error tells the user to lower (see :func:`biopost.resources.inference_oom_advice`)."""
    parser.add_argument("--batch-size", type=int, default=None, help=f"examples generated together ({batch_default})")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="weights' precision on the device (auto: bfloat16 on a GPU that has it, else float32; "
                        "bfloat16 halves the memory)")


def add_backend_option(parser) -> None:
    parser.add_argument("--backend", choices=["transformers", "vllm"], default=None,
                        help="generation backend (default: the checkpoint's eval.generation.backend; vllm needs "
                        "pip install 'biopost[vllm]' and a CUDA GPU)")


def cmd_eval(args) -> int:
    quiet_libraries()
    from biopost.inference import evaluate_checkpoint

    rows = evaluate_checkpoint(args.checkpoint, args.task, args.splits, args.max_examples, args.device,
                               **inference_options(args))
    return write_jsonl(rows, args.output, "rows")


def cmd_predict(args) -> int:
    quiet_libraries()
    from biopost.inference import predict_file

    records = predict_file(args.checkpoint, args.task, args.input, args.max_new_tokens, args.device,
                           **inference_options(args))
    return write_jsonl(records, args.output, "predictions")


def write_jsonl(records: list[dict], output: Path | None, what: str) -> int:
    """JSON lines to ``output``, or to stdout when no file is given. The file appears whole or not at all (written
    beside it, then renamed), so an interrupted command never leaves a short file that looks complete. Under a
    launcher every process holds the gathered records; the main one writes them."""
    if not distributed.is_main():
        return 0
    lines = "\n".join(json.dumps(r) for r in records)
    if output:
        partial = output.with_name(output.name + ".partial")
        partial.write_text(lines + "\n")
        partial.replace(output)
        print(f"wrote {len(records)} {what} to {output}")
    else:
        print(lines)
    return 0


def cmd_summary(args) -> int:
    from biopost.report.run_summary import metric_table, plot_curves

    print(metric_table(args.run_dir, args.metric).round(3).to_string())
    print(f"plot: {plot_curves(args.run_dir, args.metric)}")
    return 0


def cmd_report(args) -> int:
    from biopost.report import write_report

    html = write_report(args.directory, args.output, args.metric)
    print(f"report: {html} (Markdown: {html.with_suffix('.md')})")
    return 0


def cmd_tasks(args) -> int:
    from biopost.config import RunConfig
    from biopost.pipeline import load_task_and_splits
    from biopost.registry import PLUGINS, TASKS, distribution, task_names

    for name in task_names():
        cls = TASKS[name]
        origin = f"  (plug-in: {distribution(PLUGINS[name])})" if name in PLUGINS else ""
        required = [k for k, f in cls.Options.model_fields.items() if f.is_required()]
        if required:
            print(f"{name:24s} [{cls.domain}] needs task.options: {', '.join(required)}{origin}")
            continue
        config = RunConfig.model_validate({"task": {"name": name}, "stages": [{"kind": "sft"}]})
        _, splits = load_task_and_splits(config)
        sizes = " ".join(f"{k}={v}" for k, v in splits.sizes().items())
        print(f"{name:24s} [{cls.domain}] {sizes}  (OOD {splits.ood_test_groups}){origin}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
