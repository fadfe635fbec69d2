"""Many processes, one run: who writes, who waits, and how work is shared, under ``accelerate launch``.

A launcher (``accelerate launch``, ``torchrun``) sets ``WORLD_SIZE``; then accelerate's ``PartialState`` opens
the process group (gloo on CPU, nccl on GPU) and pins each process to its GPU. Every process runs the whole
pipeline; only the main one writes files (metrics, checkpoints, splits, locks, trackers), the others wait at
barriers where they read what it wrote. A plain ``biopost`` command is one process: every helper here is then
a no-op or the identity, so a single process runs exactly as without this module.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, TypeVar

from biopost.config import ConfigError

T = TypeVar("T")


def launched() -> bool:
    """True under a distributed launcher (even with one process), which sets ``WORLD_SIZE``."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _state(cpu: bool = False):
    """accelerate's process state; creating it the first time opens the process group (gloo for CPU
    processes, nccl for GPUs), later calls return that state."""
    from accelerate import PartialState

    return PartialState(cpu=True, backend="gloo") if cpu else PartialState()


def init(device: str) -> None:
    """Open the process group now, under a launcher, for the run's resolved ``device`` ('cpu': gloo): before
    any model is placed, so each process gets its GPU.
    Weight-sharding engines are refused: our checkpoint saves, generation and RL loop need whole weights."""
    if not launched():
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ConfigError("FSDP is not supported yet (biopost saves and generates with whole weights on each "
                          "process); launch with configs/accelerate/ddp.yaml or deepspeed-zero2.yaml (docs/scale.md)")
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ConfigError("DeepSpeed ZeRO-3 is not supported yet (it shards the weights biopost saves and generates "
                          "with); use ZeRO-2: configs/accelerate/deepspeed-zero2.yaml (docs/scale.md)")
    _state(cpu=device == "cpu")


def world_size() -> int:
    return _state().num_processes if launched() else 1


def rank() -> int:
    """This process's index; read from the launcher's ``RANK`` (what accelerate reads too), so that asking it,
    e.g. to print an error once, does not open the process group."""
    return int(os.environ["RANK"]) if launched() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait until every process is here (nothing to wait for in one process)."""
    if world_size() > 1:
        _state().wait_for_everyone()


def main_lock(lock):
    """``lock`` (a context manager) held by the main process only; the others hold nothing."""
    return lock if is_main() else contextlib.nullcontext()


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by the main process only (it may write files), its result given to every process."""
    if world_size() == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box = [fn() if is_main() else None]
    return broadcast_object_list(box, from_process=0)[0]


def gather(items: list) -> list:
    """Every process's ``items`` concatenated in process order, on every process."""
    if world_size() == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def gather_tensor(values):
    """1-d tensors of any length concatenated in process order, on every process (via their lists)."""
    import torch

    if world_size() == 1:
        return values
    return torch.tensor(gather(values.tolist()), dtype=values.dtype)


def reduce_gradients(params: list, reduction: str) -> None:
    """Each parameter's gradient replaced by its ``reduction`` ("sum", "mean") over processes.

    "sum": the RL loop, whose forwards go through ``Policy.logits``/``embed`` (a fused model's projectors live
    beside the LM), so it cannot hand one module to DDP: it does DDP's all-reduce itself, once per optimiser
    step (each process holds its share of the batch's loss). "mean": what DDP does for the Trainer's own model,
    for the parameters it does not wrap (a fused model's projectors)."""
    if world_size() == 1:
        return
    from accelerate.utils import reduce

    for param in params:
        if param.grad is not None:
            param.grad.copy_(reduce(param.grad, reduction=reduction))


def share_size(n: int, what: str) -> int:
    """How many of ``n`` items (a step's global batch, named ``what``) each process takes; they must split
    evenly, so that every process does the same number of forwards and backwards."""
    world = world_size()
    if n % world:
        raise ValueError(f"{what}={n} does not split evenly over {world} processes; make it a multiple of {world}")
    return n // world


def shard_bounds(n: int, what: str) -> slice:
    """This process's contiguous share of ``n`` items (:func:`share_size` of them): the same rows one process
    would hold in its place."""
    size = share_size(n, what)
    return slice(rank() * size, (rank() + 1) * size)


def round_robin(n: int) -> list[int]:
    """Indices ``0..n-1`` this process takes when work is dealt out one item at a time."""
    return list(range(rank(), n, world_size()))


@contextlib.contextmanager
def main_writes() -> Iterator[bool]:
    """Yield whether this process writes; everyone waits at the end until the main process has written."""
    yield is_main()
    barrier()


def describe() -> dict[str, Any]:
    """The process layout, for ``env.json``."""
    return {"world_size": world_size(), "launched": launched()}
