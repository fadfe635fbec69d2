"""Out of GPU memory or out of disk space: one line that says what to change, instead of a traceback.

:func:`explained` wraps a stage (or a whole run): ``torch.OutOfMemoryError`` becomes advice naming the
stage's settings that set its memory (batch and micro-batch sizes, sequence and completion lengths, gradient
checkpointing, the evaluator's batch, the weights' dtype); :func:`inference_oom_advice` does the same for ``biopost eval`` / ``predict``; ``OSError(ENOSPC)`` becomes a note of the free space and of where the
run directory's space went (checkpoints, resumable states, built backbones).
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path


class ResourceError(RuntimeError):
    """A run stopped for lack of memory or disk; the message says what to change."""


@contextlib.contextmanager
def explained(config, run_dir: Path, index: int | None = None) -> Iterator[None]:
    """Turn an out-of-memory or disk-full error raised inside the block into a :class:`ResourceError`."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as err:
        raise ResourceError(out_of_memory_advice(config, index, err)) from None
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise ResourceError(disk_full_advice(run_dir, err)) from None


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].rstrip(".") if text else err.__class__.__name__


def out_of_memory_advice(config, index: int | None, err: BaseException) -> str:
    """Which settings to lower, as dotted overrides with their current values."""
    where = "the run"
    hints: list[str] = []
    if index is not None:
        stage = config.stages[index]
        where, key = f"stage {config.stage_name(index)} ({stage.kind})", f"stages.{index}"
        if hasattr(stage, "batch_size") and hasattr(stage, "grad_accum"):
            hints.append(f"{key}.batch_size below {stage.batch_size} with {key}.grad_accum raised to keep "
                         f"{stage.batch_size * stage.grad_accum} examples per step")
        if hasattr(stage, "micro_batch_size"):
            now = stage.micro_batch_size or stage.prompts_per_step * stage.num_generations
            hints.append(f"{key}.micro_batch_size below {now} (sequences per backward pass; the step is unchanged)")
            hints.append(f"{key}.max_completion_length below {stage.max_completion_length}")
        for field in ("max_length", "seq_length"):
            if hasattr(stage, field):
                hints.append(f"{key}.{field} below {getattr(stage, field)}")
    if stage_trains(config, index) and not config.model.gradient_checkpointing:
        hints.append("model.gradient_checkpointing=true")
    hints.append(f"eval.batch_size below {config.eval.batch_size}")
    if config.model.dtype in ("float32", "auto"):  # auto is float32 where bfloat16 is not supported
        hints.append("model.dtype=bfloat16")
    return f"out of GPU memory in {where} ({first_line(err)}); try {'; '.join(hints)}"


def stage_trains(config, index: int | None) -> bool:
    """Whether the stage at ``index`` trains a model (gradient checkpointing then lowers its memory)."""
    return index is not None and config.stages[index].kind in ("sft", "cpt", "rl")


def inference_oom_advice(command: str, err: BaseException, batch_size: int, dtype: str,
                         max_new_tokens: int | None = None) -> str:
    """``biopost eval`` / ``predict`` ran out of GPU memory: the options that set its memory, with their values.

    >>> inference_oom_advice("predict", RuntimeError("CUDA out of memory."), 32, "float32", 128)
    'out of GPU memory in biopost predict (CUDA out of memory); try --batch-size below 32; --max-new-tokens below 128; --dtype bfloat16'
    """
    hints = [f"--batch-size below {batch_size}"]
    if max_new_tokens is not None:
        hints.append(f"--max-new-tokens below {max_new_tokens}")
    if dtype == "float32":
        hints.append("--dtype bfloat16")
    return f"out of GPU memory in biopost {command} ({first_line(err)}); try {'; '.join(hints)}"


def disk_full_advice(run_dir: Path, err: BaseException) -> str:
    """Free space left, and the largest parts of the run directory."""
    run_dir = Path(run_dir)
    free = shutil.disk_usage(existing_parent(run_dir)).free
    parts = sorted(space_by_part(run_dir).items(), key=lambda kv: -kv[1])
    used = ", ".join(f"{name} {human(size)}" for name, size in parts[:5] if size) or "nothing yet"
    return (f"disk full writing {getattr(err, 'filename', None) or run_dir} ({human(free)} free); {run_dir} holds "
            f"{used}; free space or move the run to a larger disk (--output-dir), and keep fewer checkpoints "
            f"(raise stages.N.eval_every_steps / save_every_steps)")


def space_by_part(run_dir: Path) -> dict[str, int]:
    """Bytes per kind of content: ``stages/*/checkpoints``, ``stages/*/trainer``, ``backbone``..."""
    sizes: dict[str, int] = {}
    if not run_dir.is_dir():
        return sizes
    for entry in run_dir.iterdir():
        if entry.name == "stages" and entry.is_dir():
            for stage in entry.iterdir():
                for part in stage.iterdir() if stage.is_dir() else ():
                    name = f"stages/*/{part.name}"
                    sizes[name] = sizes.get(name, 0) + size_of(part)
        else:
            sizes[entry.name] = size_of(entry)
    return sizes


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def existing_parent(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def human(size: int) -> str:
    """
    >>> human(0), human(1536), human(3 * 1024 ** 3)
    ('0 B', '1.5 KiB', '3.0 GiB')
    """
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
