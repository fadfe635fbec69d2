"""Run a study's plan: sequentially here (``local``), as Ray tasks (``ray``), or as SLURM jobs (``slurm``).

Every executor calls :func:`execute_run` for each unfinished run, donors before the runs that branch off
them. A run is an ordinary pipeline run in ``runs/<id>/`` (output in ``logs/<id>.log``); a finished one is
skipped and an interrupted one resumes, so rerunning a finished study does nothing and a killed one finishes
what is left. The study directory must be on a file system every worker sees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from biopost import durable
from biopost.environ import temporary_environ
from biopost.locks import DirectoryLock
from biopost.runlog import DONE
from biopost.study.plan import Plan, PlannedRun
from biopost.trackers import check_installed

EXECUTORS = ("local", "ray", "slurm")


@dataclass
class Resources:
    """What one run asks of a Ray cluster or a SLURM node."""

    cpus: int | None = None  # per run; also its torch threads (None: local runs keep torch's default, others 1)
    gpus: int = 0
    address: str | None = None  # ray: an existing cluster ("auto" or host:port); None starts a local one
    cluster: str | None = None  # slurm: submitit's cluster ("slurm", or "local" to try it on this machine)
    partition: str | None = None
    time_min: int = 24 * 60


def run_dir_of(study_dir: Path, run_id: str) -> Path:
    return Path(study_dir) / "runs" / run_id


def is_done(study_dir: Path, run_id: str) -> bool:
    return (run_dir_of(study_dir, run_id) / DONE).is_file()


def execute_run(study_dir: str, entry: dict, threads: int | None = None, *after, study: str | None = None) -> str:
    """Run one planned run, first copying the prefix it shares with its donor; safe to call again.

    ``threads``: the threads of torch and every native pool during the run (small models on a busy machine run
    several times faster on one; see :func:`limited_threads`).
    ``after``: the donors' results (Ray passes them so a branch waits for its donor).
    ``study``: the study's name, the group of the run in experiment trackers.
    """
    import torch
    import transformers

    from biopost.pipeline import run as run_pipeline
    from biopost.study.branch import MARKER, materialise

    # transformers' load reports and warnings go to the terminal, not the run's log, and land over the progress bar
    transformers.logging.set_verbosity_error()
    run = PlannedRun.from_json(entry)
    study_dir = Path(study_dir)
    run_dir = run_dir_of(study_dir, run.id)
    if (run_dir / DONE).is_file():
        return run.id
    log = study_dir / "logs" / f"{run.id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started, cpu = time.perf_counter(), cpu_seconds()
    with limited_threads(threads), log.open("a") as out, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):
        if run.donor and not (run_dir / MARKER).is_file():
            donor_dir = run_dir_of(study_dir, run.donor)
            if not (donor_dir / DONE).is_file():
                raise RuntimeError(f"run {run.id}: its donor {run.donor} has not finished")
            if not materialise(donor_dir, run_dir, run):
                # the donor finished without the snapshot (it ran before this plan): train the prefix too
                print(f"run {run.id}: donor {run.donor} kept no snapshot at {run.branch}; training from the start")
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                durable.write_json(run_dir / MARKER, {"donor": None, "reason": "donor kept no snapshot"})
            else:
                print(f"run {run.id}: copied {run.branch} from {run.donor}")
        run_pipeline(run.config, run_dir, snapshots=run.snapshots, group=study)
    # what this attempt cost (a resumed run records its last attempt): the study's compute, whatever the executor
    log.with_suffix(".cost.json").write_text(json.dumps(
        {"wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(cpu_seconds() - cpu, 2)}))
    return run.id


# Every native thread pool a run can start. Two one-CPU runs on a two-core machine ran 4 to 5 times slower
# per step when any pool kept its default size: its idle threads spin on the core the other run needs.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
                    "RAYON_NUM_THREADS")


def thread_environment(threads: int) -> dict[str, str]:
    """Environment for a worker process that may use ``threads`` threads (read by the libraries as they load)."""
    return {name: str(threads) for name in THREAD_VARIABLES} | {"TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def limited_threads(threads: int | None):
    """Cap torch's and every native pool of this process at ``threads`` for one run (None: no cap): pools already
    loaded through threadpoolctl, pools loaded later through the environment they read. The caller's settings
    come back afterwards (the local executor runs in the caller's process)."""
    if not threads:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    saved_torch = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with temporary_environ(thread_environment(threads)), threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(saved_torch)


def cpu_seconds() -> float:
    """CPU seconds of this process, all its threads (a Ray or SLURM worker runs one run at a time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def execute(plan: Plan, study_dir: Path, executor: str = "local", resources: Resources | None = None) -> list[str]:
    """Run every unfinished run of ``plan``; returns the ids of runs that failed (or whose donor failed)."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    study_dir = Path(study_dir).resolve()
    with DirectoryLock(study_dir, "study"):
        return execute_locked(plan, study_dir, executor, resources)


def execute_locked(plan: Plan, study_dir: Path, executor: str, resources: Resources | None) -> list[str]:
    todo = [r for r in plan.runs if not is_done(study_dir, r.id)]
    if not todo:
        print(f"all {len(plan.runs)} runs of study {plan.study} have finished; nothing to do")
        return []
    check_installed(sorted({name for r in todo for name in r.config.report_to}))  # once, before any run starts
    print(f"study {plan.study}: {len(todo)} of {len(plan.runs)} runs to do ({executor}); logs in {study_dir / 'logs'}")
    progress = Progress(plan, todo)
    runner = {"local": run_local, "ray": run_ray, "slurm": run_slurm}[executor]
    try:
        failed = runner(study_dir, plan.study, todo, resources or Resources(), progress)
    finally:
        progress.close()
    for run_id, reason in failed.items():
        print(f"run {run_id} failed: {reason} (log: {study_dir / 'logs' / (run_id + '.log')})")
    return sorted(failed)


# Relative costs for the time-left estimate, in SFT optimizer steps; measured on the demo's tiny models on CPU
# (an SFT step ~0.1 CPU-s, a GRPO step with its rollouts ~1.5, scoring three splits of 128 examples ~2.5,
# starting a run ~2.5). Only the estimate depends on them, never a result.
STEP_COST = {"rl": 15.0}
EVAL_COST = RUN_COST = 25.0


def run_cost(run: PlannedRun) -> float:
    """What a run still has to do, in SFT-step units: its own optimizer steps and evaluation points."""
    first, skip = run.branch or (0, 0)
    cost = RUN_COST
    for index, stage in enumerate(run.stages[first:], start=first):
        steps = (stage["steps"] or 0) - (skip if index == first else 0)
        evals = 1 if stage["kind"] == "eval" else steps // stage["eval_every"] if stage["eval_every"] else 0
        cost += STEP_COST.get(stage["kind"], 1.0) * steps + EVAL_COST * evals
    return cost


class Progress:
    """Runs done / total, with time left estimated from the steps and evaluations still to do."""

    def __init__(self, plan: Plan, todo: list[PlannedRun]):
        self.total, self.done = len(plan.runs), len(plan.runs) - len(todo)
        self.weight = {r.id: run_cost(r) for r in todo}
        self.study = plan.study
        self.bar = tqdm(total=sum(self.weight.values()), desc=self.label(), smoothing=0,
                        bar_format="{l_bar}{bar}| [{elapsed} elapsed, {remaining} left]")

    def label(self) -> str:
        return f"study {self.study}: runs {self.done}/{self.total}"

    def finished(self, run_id: str) -> None:
        self.done += 1
        self.bar.set_description_str(self.label(), refresh=False)
        self.bar.update(self.weight[run_id])

    def close(self) -> None:
        self.bar.close()


def blocked(run: PlannedRun, failed: dict[str, str]) -> str | None:
    return f"its donor {run.donor} failed" if run.donor in failed else None


# ---------------------------------------------------------------- local
def run_local(study_dir: Path, study: str, todo: list[PlannedRun], resources: Resources,
              progress: Progress) -> dict[str, str]:
    failed: dict[str, str] = {}
    for run in todo:  # plan order: every donor comes before its branches
        reason = blocked(run, failed)
        if reason:
            failed[run.id] = reason
            continue
        try:
            execute_run(str(study_dir), run.to_json(), resources.cpus, study=study)
        except Exception as err:  # one failed run must not stop the others; it is reported at the end
            failed[run.id] = f"{err.__class__.__name__}: {err}"
            with (study_dir / "logs" / f"{run.id}.log").open("a") as out:
                traceback.print_exc(file=out)
            continue
        progress.finished(run.id)
    return failed


# ---------------------------------------------------------------- ray
def run_ray(study_dir: Path, study: str, todo: list[PlannedRun], resources: Resources,
            progress: Progress) -> dict[str, str]:
    """Each run a Ray task with its CPUs/GPUs; a branch's task takes its donor's result, so Ray orders them."""
    import ray

    started = not ray.is_initialized()
    if started:
        # no worker output or startup banner over the progress bar (each run logs to logs/<run>.log)
        ray.init(address=resources.address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    try:
        cpus = resources.cpus or 1
        task = ray.remote(num_cpus=cpus, num_gpus=resources.gpus, max_retries=0,
                          runtime_env={"env_vars": thread_environment(cpus)})(execute_run)
        refs: dict[str, object] = {}
        for run in todo:
            after = [refs[run.donor]] if run.donor in refs else []
            refs[run.id] = task.remote(str(study_dir), run.to_json(), cpus, *after, study=study)
        ids = {ref: run_id for run_id, ref in refs.items()}
        failed: dict[str, str] = {}
        pending = list(refs.values())
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            run_id = ids[ready[0]]
            try:
                ray.get(ready[0])
                progress.finished(run_id)
            except Exception as err:  # noqa: BLE001 (a RayTaskError wraps the run's own error)
                failed[run_id] = str(err).strip().splitlines()[-1]
        return failed
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- slurm
def run_slurm(study_dir: Path, study: str, todo: list[PlannedRun], resources: Resources,
              progress: Progress) -> dict[str, str]:
    """One job per run through submitit, a job array per wave (runs whose donors are all done)."""
    import submitit

    executor = submitit.AutoExecutor(folder=study_dir / "slurm" / "%j", cluster=resources.cluster)
    cpus = resources.cpus or 1
    params = {"timeout_min": resources.time_min, "cpus_per_task": cpus, "name": f"biopost-{study_dir.name}",
              "slurm_setup": [f"export {name}={value}" for name, value in thread_environment(cpus).items()]}
    if resources.gpus:
        params["gpus_per_node"] = resources.gpus
    if resources.partition:
        params["slurm_partition"] = resources.partition
    executor.update_parameters(**params)
    failed: dict[str, str] = {}
    for wave in sorted({r.wave for r in todo}):
        runs = []
        for run in (r for r in todo if r.wave == wave):
            reason = blocked(run, failed)
            if reason:
                failed[run.id] = reason
            else:
                runs.append(run)
        with executor.batch():
            jobs = [executor.submit(execute_run, str(study_dir), run.to_json(), cpus, study=study) for run in runs]
        waiting = dict(zip(jobs, runs))
        while waiting:
            for job in [j for j in waiting if j.done()]:
                run = waiting.pop(job)
                try:
                    job.result()
                    progress.finished(run.id)
                except Exception as err:  # noqa: BLE001 (submitit re-raises the job's error)
                    failed[run.id] = str(err).strip().splitlines()[-1]
            time.sleep(1 if waiting else 0)
    return failed
