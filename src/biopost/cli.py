"""`biopost ...` commands: parse arguments, call the library, print. Errors are one line, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from biopost.config import DEVICES, ConfigError
from biopost.data.splits import TEST_SPLITS


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
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto = CUDA when available")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="answer your own examples (JSONL in the task's input format)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--task", required=True)
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", type=Path, default=None, help="JSONL out (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto = CUDA when available")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("summary", help="a run's metric per stage, step and split; writes an ID/OOD curve plot")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--metric", default="accuracy")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("baseline", help="fit a classical classifier on task features (C chosen on val); write baseline rows")
    p.add_argument("config", type=Path)
    p.add_argument("--output-dir", type=Path, required=True, help="directory for metrics.jsonl, baseline.json, predictions/")
    p.add_argument("--features", default="auto", help="auto, kmer, expression, or registered names joined by +")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. eval.max_examples=null")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("tasks", help="list registered tasks with their split sizes")
    p.set_defaults(func=cmd_tasks)

    # argparse leaves KEY=VALUE overrides given after an option (train CFG --output-dir D k=v) unmatched.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command in ("train", "baseline") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args) or 0
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"biopost {args.command}: {err}", file=sys.stderr)
        return 2


def cmd_train(args) -> int:
    from biopost.config import load_config
    from biopost.pipeline import run

    config = load_config(args.config, args.overrides)
    out = args.output_dir or Path("runs") / f"{config.name}-{config.run_id()}"
    run_dir = run(config, out)
    print(f"run directory: {run_dir}")
    return 0


def cmd_baseline(args) -> int:
    from biopost.baselines import run_baseline
    from biopost.config import load_config

    rows = run_baseline(load_config(args.config, args.overrides), args.output_dir, args.features)
    for row in rows:
        print(f"{row['split']:9s} accuracy {row['value']:.3f} (n={row['n']}, 95% CI {row['ci_low']:.3f}-{row['ci_high']:.3f})")
    print(f"features {rows[0]['features']}, C={rows[0]['C']}; rows appended to {args.output_dir / 'metrics.jsonl'}")
    return 0


def cmd_eval(args) -> int:
    from biopost.inference import evaluate_checkpoint

    rows = evaluate_checkpoint(args.checkpoint, args.task, args.splits, args.max_examples, args.device)
    return write_jsonl(rows, args.output, "rows")


def cmd_predict(args) -> int:
    from biopost.inference import predict_file

    records = predict_file(args.checkpoint, args.task, args.input, args.max_new_tokens, args.device)
    return write_jsonl(records, args.output, "predictions")


def write_jsonl(records: list[dict], output: Path | None, what: str) -> int:
    """JSON lines to ``output``, or to stdout when no file is given."""
    lines = "\n".join(json.dumps(r) for r in records)
    if output:
        output.write_text(lines + "\n")
        print(f"wrote {len(records)} {what} to {output}")
    else:
        print(lines)
    return 0


def cmd_summary(args) -> int:
    from biopost.report.run_summary import metric_table, plot_curves

    print(metric_table(args.run_dir, args.metric).round(3).to_string())
    print(f"plot: {plot_curves(args.run_dir, args.metric)}")
    return 0


def cmd_tasks(args) -> int:
    from biopost.config import RunConfig
    from biopost.pipeline import load_task_and_splits
    from biopost.registry import PLUGINS, TASKS, task_names

    for name in task_names():
        cls = TASKS[name]
        origin = f"  (plug-in: {PLUGINS[name]})" if name in PLUGINS else ""
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
