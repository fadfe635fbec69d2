"""Evaluate or predict with a saved checkpoint, rebuilding the task exactly as it was trained."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

from biopost import distributed
from biopost.config import ConfigError, EvalConfig, RunConfig, apply_override
from biopost.evaluation import evaluate, generate_completions
from biopost.models.cell_encoder import check_cells_readable
from biopost.models.device import resolve_device, resolve_dtype
from biopost.models.generation import check_backend, make_backend
from biopost.models.policy import load_policy, task_state_of
from biopost.resources import ResourceError, inference_oom_advice


def checkpoint_state(checkpoint: Path, name: str, options: list[str] = ()) -> dict:
    """The task state a checkpoint saved; it must be a biopost checkpoint of task ``name``. ``options``:
    ``KEY=VALUE`` changes to its task options (e.g. ``source=`` a table that moved since training)."""
    state = task_state_of(checkpoint)
    if state is None:
        raise FileNotFoundError(f"{checkpoint} is not a biopost checkpoint (no biopost_checkpoint.json)")
    if state["name"] != name:
        raise ConfigError(f"{checkpoint}: checkpoint trained on task {state['name']!r}, not {name!r}; pass --task "
                          f"{state['name']} or a checkpoint of {name}")
    for item in options:
        state["config_task"] = apply_override({"task": state["config_task"]}, f"task.options.{item}")["task"]
        state["options"] = state["config_task"]["options"]
    return state


def restore_task_state(task, state: dict):
    """The label set, rationale statistics and fused modalities the checkpoint was trained with."""
    task.labels = state.get("labels") or []
    task.markers = state.get("markers") or {}
    task.fused_modalities = frozenset(state.get("fused_modalities") or [])
    return task


def task_for_checkpoint(checkpoint: Path, name: str, options: list[str] = ()):
    """The task with the options, label set and split settings saved in the checkpoint."""
    from biopost.registry import get_task

    state = checkpoint_state(checkpoint, name, options)
    task = get_task(name, state["options"], state["config_task"].get("prompt"))
    return restore_task_state(task, state), state


def evaluate_checkpoint(checkpoint: Path, name: str, splits: list[str], max_examples: int | None,
                        device: str = "auto", base: Path | None = None, trust_remote_code: bool = False,
                        options: list[str] = (), batch_size: int | None = None, dtype: str = "auto",
                        backend: str | None = None) -> list[dict]:
    """``backend``: the generation backend (transformers / vllm); None = the one the checkpoint was evaluated with."""
    from biopost.pipeline import load_task_and_splits

    device = resolve_device(device)  # a wrong choice fails before any data or model loads
    distributed.init(device)  # under a launcher: each process on its own GPU, evaluating its share
    state = checkpoint_state(checkpoint, name, options)
    config = RunConfig.model_validate({"task": state["config_task"], "eval": state["eval"], "stages": [{"kind": "sft"}]})
    fused = frozenset(state.get("fused_modalities") or [])  # compared across splits as the model read them
    task, data = load_task_and_splits(config, fused)  # fitted on train: the statistics some scores use (e.g. IA weights)
    if state.get("split_fingerprints") and data.fingerprints() != state["split_fingerprints"]:
        raise ValueError("the task's data no longer gives the splits this checkpoint was trained with")
    restore_task_state(task, state)
    cfg = config.eval.model_copy(update={"max_examples": max_examples or config.eval.max_examples,
                                         "batch_size": batch_size or config.eval.batch_size,
                                         "generation": chosen_generation(config.eval, backend)})
    dtype = resolve_dtype(dtype, device)
    with out_of_memory_explained("eval", cfg.batch_size, dtype), tempfile.TemporaryDirectory() as scratch:
        policy = load_policy(checkpoint, dtype, device=device, base=base, trust_remote_code=trust_remote_code)
        generator = make_backend(cfg.generation, policy, Path(scratch), cfg.seed)  # a vLLM engine reads its copy here
        rows, _ = evaluate(policy, task, {s: list(data[s]) for s in splits if data[s]}, cfg, generator)
    return [{"checkpoint": str(checkpoint), "task": name, **r} for r in rows]


def predict_file(checkpoint: Path, name: str, input_path: Path, max_new_tokens: int,
                 device: str = "auto", base: Path | None = None, trust_remote_code: bool = False,
                 options: list[str] = (), batch_size: int | None = None, dtype: str = "auto",
                 backend: str | None = None) -> list[dict]:
    """``backend``: as :func:`evaluate_checkpoint`'s (None = the checkpoint's evaluator's)."""
    device = resolve_device(device)
    distributed.init(device)
    task, state = task_for_checkpoint(checkpoint, name, options)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file not found: {input_path}")
    examples, wheres = [], []
    for number, line in enumerate(input_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{input_path}:{number}: not valid JSON ({err.msg}); write one JSON object per line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{input_path}:{number}: a {type(record).__name__}, not a JSON object; write one object "
                             "per line in the task's input format (docs/tasks.md)")
        wheres.append(f"{input_path.name}:{number}")
        examples.append(task.example_from_input(record, wheres[-1]))
    if not examples:
        raise ValueError(f"{input_path}: no records; write one JSON object per line in the task's input format")
    generation = chosen_generation(EvalConfig.model_validate(state.get("eval") or {}), backend)
    cfg = EvalConfig(max_new_tokens=max_new_tokens, generation=generation,
                     **({"batch_size": batch_size} if batch_size else {}))
    dtype = resolve_dtype(dtype, device)
    with out_of_memory_explained("predict", cfg.batch_size, dtype, max_new_tokens), \
            tempfile.TemporaryDirectory() as scratch:
        policy = load_policy(checkpoint, dtype, device=device, base=base, trust_remote_code=trust_remote_code)
        check_cells_readable(policy, [(where, example.cell) for where, example in zip(wheres, examples)])
        generator = make_backend(cfg.generation, policy, Path(scratch), cfg.seed)
        completions, _ = generate_completions(policy, task, examples, cfg, desc="predict", backend=generator)
    out = []
    for example, (completion,) in zip(examples, completions):
        think = completion.split("</think>")[0].replace("<think>", "").strip() if "</think>" in completion else None
        out.append({"id": example.id, "answer": task.prediction(completion)["lenient"],
                    "answer_strict": task.prediction(completion)["strict"], "reasoning": think, "completion": completion})
    return out


def chosen_generation(saved: EvalConfig, backend: str | None):
    """The checkpoint's evaluator's generation settings, with ``--backend`` if given; vLLM checked installed."""
    generation = saved.generation if backend is None else saved.generation.model_copy(update={"backend": backend})
    check_backend(generation, "eval", other="pass --backend transformers",
                  setting="the checkpoint's eval.generation.backend" if backend is None else "--backend")
    return generation


@contextlib.contextmanager
def out_of_memory_explained(command: str, batch_size: int, dtype: str, max_new_tokens: int | None = None):
    """GPU out of memory while loading or generating: a :class:`ResourceError` naming the options to lower."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as err:
        raise ResourceError(inference_oom_advice(command, err, batch_size, dtype, max_new_tokens)) from None
