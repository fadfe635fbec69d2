"""Experiment trackers (``report_to``) receive exactly the rows of metrics.jsonl, read back offline: TensorBoard
event files, W&B offline run files, an MLflow file store. Resumes, study grouping and config errors too."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

import biopost.trackers
from biopost.cli import main
from biopost.config import ConfigError, SFTStage, validate_config
from biopost.pipeline import run
from biopost.runlog import RunLog, read_metrics
from biopost.stages.context import StageContext
from biopost.stages.trainer import training_arguments
from biopost.trackers import Identity, open_trackers

pytestmark = pytest.mark.usefixtures("one_thread")
needs = {name: pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"{name} is not installed")
         for name in ("tensorboard", "wandb", "mlflow")}
INSTALLED = [name for name in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(name)]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """W&B in offline mode, MLflow on its file store in the run directory, neither phoning home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        # and what the trackers set themselves (W&B its service's address, MLflow's file-store switch): recorded,
        # so an absent variable is absent again after this module (a later test's subprocesses would inherit it)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_SERVICE",
                     "MLFLOW_ALLOW_FILE_STORE"):
            patch.setenv(name, "")
            patch.delenv(name)
        yield


# ---------------------------------------------------------------- what the trackers should hold, and readers
def expected(rows: list[dict], task: str) -> dict[tuple[str, str, int], float]:
    """(stage, tag, step) -> value: ``<split>/<metric>`` (after the task if it is another task's row), and the
    interval bounds beside it."""
    out = {}
    for r in rows:
        if r["value"] is None:
            continue
        tag = f"{r['split']}/{r['metric']}" if r["task"] == task else f"{r['task']}/{r['split']}/{r['metric']}"
        out[(r["stage"], tag, r["step"])] = r["value"]
        for bound in ("ci_low", "ci_high"):
            if r.get(bound) is not None:
                out[(r["stage"], f"{tag}_{bound}", r["step"])] = r[bound]
    return out


def tensorboard_scalars(run_dir: Path) -> dict[tuple[str, str, int], float]:
    """Every scalar TensorBoard shows for the run; a (tag, step) seen twice fails (a resume must not duplicate)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    out = {}
    for stage_dir in sorted((run_dir / "tensorboard").iterdir()):
        events = EventAccumulator(str(stage_dir), size_guidance={SCALARS: 0}).Reload()
        for tag in events.Tags()["scalars"]:
            points = events.Scalars(tag)
            steps = [p.step for p in points]
            assert len(steps) == len(set(steps)), f"{stage_dir.name}/{tag}: a step logged twice: {steps}"
            out.update({(stage_dir.name, tag, p.step): p.value for p in points})
    return out


def wandb_records(run_dir: Path) -> list:
    """The records of the run's offline W&B files (W&B's log format: 7-byte header, 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, chunk = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
                pos += 32768 - pos % 32768
                continue
            _, size, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0:
                break
            chunk, pos = chunk + data[pos + 7 : pos + 7 + size], pos + 7 + size
            if kind in (1, 4):  # a whole record, or the last chunk of one
                record = pb.Record()
                record.ParseFromString(chunk)
                records.append(record)
                chunk = b""
    return records


def wandb_scalars(run_dir: Path) -> dict[tuple[str, str, int], float]:
    """Every point of the run's W&B history; a point sent twice, or a step going back, fails (a zig-zag chart)."""
    out = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") != "history":
            continue
        logged = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        keys = [k for k in logged if not k.startswith("_")]
        stage = keys[0].split("/")[0]
        assert all(k.startswith(f"{stage}/") for k in keys), keys  # one stage per call, no Trainer keys
        step = logged.pop(f"{stage}/step")
        for key in keys:
            point = (stage, key.split("/", 1)[1], step)
            if key == f"{stage}/step":
                continue
            earlier = [s for (g, t, s) in out if (g, t) == point[:2]]
            assert step > max(earlier, default=-1), f"{point}: sent again or out of order after steps {earlier}"
            out[point] = logged[key]
    return out


def wandb_run(run_dir: Path):
    return next(r.run for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run")


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())


def mlflow_scalars(run_dir: Path) -> tuple[object, dict[tuple[str, str, int], float]]:
    """The run's one MLflow run and its points; a step logged twice fails."""
    client = mlflow_client(run_dir)
    [experiment] = [e for e in client.search_experiments() if e.name != "Default"]
    [found] = client.search_runs([experiment.experiment_id])
    out = {}
    for key in found.data.metrics:
        stage, tag = key.split("/", 1)
        history = client.get_metric_history(found.info.run_id, key)
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {steps}"
        out.update({(stage, tag, m.step): m.value for m in history})
    return SimpleNamespace(experiment=experiment, run=found), out


def same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    for key, value in want.items():  # TensorBoard keeps scalars as float32
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), key


# ---------------------------------------------------------------- a tiny SFT run with every tracker
@pytest.fixture(scope="module")
def tracked(tmp_path_factory, fast_config):
    raw = fast_config()
    raw["report_to"] = INSTALLED
    config = validate_config(raw)
    run_dir = run(config, tmp_path_factory.mktemp("tracked") / "run")
    rows = read_metrics(run_dir)
    return SimpleNamespace(dir=run_dir, rows=rows, want=expected(rows, rows[0]["task"]), config=config)


def test_the_rows_cover_training_and_evaluation(tracked):
    metrics = {(r["split"], r["metric"]) for r in tracked.rows}
    assert {("train", "loss"), ("train", "lr"), ("val", "accuracy"), ("ood_test", "accuracy")} <= metrics
    assert any(r["ci_low"] is not None for r in tracked.rows if r["split"] == "val")
    assert {step for stage, tag, step in tracked.want if tag == "val/accuracy"} == {0, 3, 6}


@needs["tensorboard"]
def test_tensorboard_event_files_hold_the_metrics_rows(tracked):
    assert [p.name for p in (tracked.dir / "tensorboard").iterdir()] == ["sft"]
    same(tensorboard_scalars(tracked.dir), tracked.want)


@needs["wandb"]
def test_wandb_offline_run_holds_the_metrics_rows(tracked):
    same(wandb_scalars(tracked.dir), tracked.want)
    record = wandb_run(tracked.dir)
    ids = json.loads((tracked.dir / "trackers.json").read_text())
    assert record.display_name == "fast" and record.run_group == "" and record.run_id == ids["wandb"]


@needs["mlflow"]
def test_mlflow_file_store_holds_the_metrics_rows_and_moves_with_the_run(tracked, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(tracked.dir, moved)
    found, values = mlflow_scalars(moved)
    same(values, tracked.want)
    assert found.experiment.name == "fast" and found.run.info.run_name == "fast"
    assert found.run.info.status == "FINISHED" and found.run.data.params["model.lora.rank"] == "4"
    assert found.run.data.tags["biopost.run_id"] == tracked.config.run_id()
    if "tensorboard" in INSTALLED:
        same(tensorboard_scalars(moved), tracked.want)


def test_trainer_reports_to_no_tracker_itself(tmp_path):
    """SFT and CPT train in transformers' Trainer: its own tracker callbacks stay off, so no row arrives twice."""
    ctx = SimpleNamespace(stage=SFTStage(), stage_dir=tmp_path, device="cpu", dtype="float32",
                          config=SimpleNamespace(model=SimpleNamespace(gradient_checkpointing=False)))
    assert training_arguments(ctx, total=4, every=2).report_to in ([], "none", ["none"])


@needs["tensorboard"]
def test_every_stage_kind_reaches_tensorboard(fast_config, tmp_path):
    """CPT perplexity, SFT loss and lr, RL rewards, and the evaluations of each: one TensorBoard run per stage."""
    raw = fast_config()
    raw["report_to"] = ["tensorboard"]
    raw["eval"].update(splits=["val"], max_examples=4, max_new_tokens=8)
    raw["stages"] = [
        {"kind": "cpt", "corpus": {"source": "go", "take": 60, "heldout": 20}, "seq_length": 32, "batch_size": 4,
         "max_steps": 2, "eval_every_steps": 2, "eval_task": True},
        {"kind": "sft", "max_steps": 2, "eval_every_steps": 2, "batch_size": 8},
        {"kind": "rl", "max_steps": 2, "eval_every_steps": 2, "prompts_per_step": 2, "num_generations": 2,
         "max_completion_length": 8},
    ]
    run_dir = run(validate_config(raw), tmp_path / "run")
    rows = read_metrics(run_dir)
    want = expected(rows, rows[0]["task"])
    same(tensorboard_scalars(run_dir), want)
    tags = {(stage, tag) for stage, tag, _ in want}
    assert {("cpt", "heldout/perplexity"), ("cpt", "train/lr"), ("sft", "train/loss"), ("rl", "train/reward"),
            ("rl", "train/reward_correctness"), ("rl", "val/accuracy_ci_low")} <= tags
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir()) == ["cpt", "rl", "sft"]


# ---------------------------------------------------------------- resume, backlog, naming
class Interrupt(Exception):
    pass


def test_a_resumed_stage_leaves_every_tracker_equal_to_metrics(fast_config, tmp_path, monkeypatch):
    """Steps 3 and 4 were sent before the crash and are redone by the resume from step 2: TensorBoard purges
    them, W&B and MLflow (which cannot delete) still hold each point once, in order, in the same tracker run."""
    raw = fast_config()
    raw["report_to"] = INSTALLED
    raw["eval"]["splits"] = ["val"]
    raw["stages"][0].update(max_steps=6, eval_every_steps=2)
    config = validate_config(raw)
    original = StageContext.evaluate_and_save

    def crash_at_step_4(self, policy, step, epoch, *args, **kwargs):
        if step == 4:
            raise Interrupt
        return original(self, policy, step, epoch, *args, **kwargs)

    monkeypatch.setattr(StageContext, "evaluate_and_save", crash_at_step_4)
    with pytest.raises(Interrupt):
        run(config, tmp_path / "run")
    ids = json.loads((tmp_path / "run" / "trackers.json").read_text())
    if "tensorboard" in INSTALLED:
        assert ("sft", "train/loss", 3) in tensorboard_scalars(tmp_path / "run")  # then dropped by the resume
    monkeypatch.setattr(StageContext, "evaluate_and_save", original)
    run(config, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    want = expected(rows, rows[0]["task"])
    assert {step for _, tag, step in want if tag == "train/loss"} == {1, 2, 3, 4, 5, 6}
    assert json.loads((tmp_path / "run" / "trackers.json").read_text()).items() >= {
        k: v for k, v in ids.items() if k != "sent"}.items()  # the same tracker runs, continued
    if "tensorboard" in INSTALLED:
        same(tensorboard_scalars(tmp_path / "run"), want)
    if "wandb" in INSTALLED:
        same(wandb_scalars(tmp_path / "run"), want)
        runs = {r.run.run_id for r in wandb_records(tmp_path / "run") if r.WhichOneof("record_type") == "run"}
        assert runs == {ids["wandb"]}
    if "mlflow" in INSTALLED:
        found, values = mlflow_scalars(tmp_path / "run")
        same(values, want)
        assert found.run.info.run_id == ids["mlflow"] and found.run.info.status == "FINISHED"


class Recorder(biopost.trackers.AppendOnlyTracker):
    """An append-only tracker that records what it is sent, continuing its run when trackers.json names it."""

    key = "recorder"

    def __init__(self, run_dir, identity):
        super().__init__(run_dir, identity)
        self.points, self.failed = [], None
        self.continue_or_start("recorded", continued=self.saved_id(self.key) is not None)

    def send(self, points):
        self.points += [(stage, step, values["train/loss"]) for stage, step, values in points]

    def finish(self, failed):
        self.failed = failed


def test_an_append_only_tracker_is_sent_settled_rows_once_in_order(tmp_path):
    """Killed after step 5 (saves at 2 and 4), then resumed from 2 (the save at 4 found damaged): the rows past
    the last save wait, none is sent twice, and a redone step not sent before carries the kept run's value."""
    identity = Identity(name="r", run_id="abc", task="t")

    def loss(*steps):
        return [{"stage": "sft", "step": s, "split": "train", "metric": "loss", "value": v} for s, v in steps]

    killed = RunLog(tmp_path, {"task": "t"}, [Recorder(tmp_path, identity)])
    killed.write(loss((1, 1.0), (2, 0.9)))
    killed.settle("sft", 2)
    killed.write(loss((3, 0.8), (4, 0.7)))
    killed.settle("sft", 4)
    killed.write(loss((5, 0.6)))  # then SIGKILL: never closed
    assert killed.trackers[0].points == [("sft", 1, 1.0), ("sft", 2, 0.9), ("sft", 3, 0.8), ("sft", 4, 0.7)]

    with RunLog(tmp_path, {"task": "t"}, [Recorder(tmp_path, identity)]) as resumed:
        assert [r["value"] for r in resumed.drop_rows("sft", after_step=2)] == [1.0, 0.9]
        resumed.write(loss((3, 0.8), (4, 0.7), (5, 0.55)))
        resumed.settle("sft", 4)
        resumed.write(loss((6, 0.5)))
        resumed.settle("sft")
        recorder = resumed.trackers[0]
    assert recorder.points == [("sft", 5, 0.55), ("sft", 6, 0.5)] and recorder.failed is False
    assert [r["value"] for r in read_metrics(tmp_path)] == [1.0, 0.9, 0.8, 0.7, 0.55, 0.5]

    recorder = Recorder(tmp_path, identity)
    with pytest.raises(Interrupt), RunLog(tmp_path, {"task": "t"}, [recorder]) as failing:
        failing.write(loss((7, 0.4)))
        raise Interrupt  # a failed run may never be resumed: its last rows are sent as it closes
    assert recorder.points == [("sft", 7, 0.4)] and recorder.failed is True
    assert json.loads((tmp_path / "trackers.json").read_text())["sent"]["recorder"] == {"sft/train/loss": 7}


@needs["mlflow"]
def test_a_baseline_measured_again_reaches_the_tracker_and_one_measured_alike_does_not(tmp_path):
    """`biopost baseline` run again replaces its rows at step 0: another value (other features) is sent, so the
    tracker's latest value is the one metrics.jsonl holds; the same value is not sent twice."""
    identity = Identity(name="r", run_id="abc", task="t")
    for value in (0.25, 0.75, 0.75):
        with RunLog(tmp_path, {"task": "t"}, open_trackers(["mlflow"], tmp_path, identity)) as log:
            log.drop_rows("baseline")
            log.write([{"stage": "baseline", "step": 0, "split": "val", "metric": "accuracy", "value": value}])
    assert [r["value"] for r in read_metrics(tmp_path)] == [0.75]
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    history = mlflow_client(tmp_path).get_metric_history(run_id, "baseline/val/accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (0, 0.75)]


def test_a_tracker_run_fed_before_sent_steps_were_recorded_is_not_sent_its_rows_again(tmp_path):
    """trackers.json from before it kept the steps sent ({"wandb": id}): that tracker run was sent every row as
    written, so continuing it sends only the rows written since."""
    identity = Identity(name="r", run_id="abc", task="t")
    rows = [{"stage": "sft", "step": s, "split": "train", "metric": "loss", "value": 1 / s} for s in (1, 2, 3)]
    RunLog(tmp_path, {"task": "t"}).write(rows)
    (tmp_path / "trackers.json").write_text(json.dumps({"recorder": "recorded"}))
    with RunLog(tmp_path, {"task": "t"}, [Recorder(tmp_path, identity)]) as log:
        log.write([{"stage": "sft", "step": 4, "split": "train", "metric": "loss", "value": 0.2}])
        recorder = log.trackers[0]
    assert recorder.points == [("sft", 4, 0.2)]
    assert json.loads((tmp_path / "trackers.json").read_text())["sent"]["recorder"] == {"sft/train/loss": 4}


def test_rows_written_before_a_tracker_existed_reach_it_once(tmp_path):
    """A study run whose prefix was copied from a donor, or trackers turned on for an interrupted run."""
    names = INSTALLED
    rows = [{"stage": "sft", "step": s, "split": "train", "metric": "loss", "value": 1 / (s + 1)} for s in range(3)]
    RunLog(tmp_path, {"task": "t"}).write(rows)
    identity = Identity(name="r", run_id="abc", task="t")
    with RunLog(tmp_path, {"task": "t"}, open_trackers(names, tmp_path, identity)) as log:
        log.write([{"stage": "sft", "step": 3, "split": "val", "metric": "accuracy_pass@2", "value": 0.5,
                    "ci_low": 0.25, "ci_high": 0.75},
                   {"stage": "sft", "step": 3, "split": "id_test", "metric": "accuracy", "value": 0.125, "task": "go"},
                   {"stage": "sft", "step": 3, "split": "val", "metric": "note", "value": None}])
    with RunLog(tmp_path, {"task": "t"}, open_trackers(names, tmp_path, identity)) as log:  # reopened: no replay
        log.write([{"stage": "baseline", "step": 0, "split": "val", "metric": "accuracy", "value": 0.25}])
    want = expected(read_metrics(tmp_path), "t")
    assert ("sft", "go/id_test/accuracy", 3) in want and ("sft", "val/accuracy_pass@2_ci_high", 3) in want
    if "tensorboard" in names:
        same(tensorboard_scalars(tmp_path), want)
    if "wandb" in names:
        same(wandb_scalars(tmp_path), want)
        runs = [r.run.run_id for r in wandb_records(tmp_path) if r.WhichOneof("record_type") == "run"]
        assert len(runs) == 2 and set(runs) == {json.loads((tmp_path / "trackers.json").read_text())["wandb"]}
    if "mlflow" in names:  # MLflow refuses "@" in names
        values = mlflow_scalars(tmp_path)[1]
        same(values, {(s, t.replace("@", "_"), n): v for (s, t, n), v in want.items()})


# ---------------------------------------------------------------- config
def test_report_to_is_typed_and_not_part_of_the_run_id():
    raw = {"task": {"name": "cell_type/pbmc68k"}, "stages": [{"kind": "sft"}]}
    plain = validate_config(raw)
    assert plain.report_to == []
    assert validate_config({**raw, "report_to": ["tensorboard", "mlflow"]}).run_id() == plain.run_id()
    with pytest.raises(ConfigError, match=r"'report_to.0'.*'tensorboard', 'wandb' or 'mlflow'.*\"neptune\""):
        validate_config({**raw, "report_to": ["neptune"]})
    with pytest.raises(ConfigError, match="each tracker is named once"):
        validate_config({**raw, "report_to": ["wandb", "wandb"]})


def test_a_tracker_not_installed_is_a_one_line_error_before_anything_runs(tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("task: {name: cell_type/pbmc68k}\nstages: [{kind: sft}]\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(biopost.trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    code = main(["train", str(config), "--output-dir", str(tmp_path / "out"), "report_to=[wandb]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("biopost train: config error: 'report_to': wandb is not installed; "
                                 "pip install biopost[wandb]")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- studies
def test_study_runs_report_grouped_by_the_study(fast_config, tmp_path):
    from biopost.study.config import study_from_dict
    from biopost.study.execute import execute
    from biopost.study.plan import prepare

    base = fast_config()
    base["eval"].update(splits=["val"], max_examples=4, max_new_tokens=8)
    base["stages"] = [{"kind": "sft", "max_steps": 4, "eval_every_steps": 2, "batch_size": 8, "lr": 1e-2,
                       "schedule": {"name": "constant", "warmup_steps": 0}}]
    raw = {"name": "grouped", "base": base, "report_to": INSTALLED,
           "grid": {"stages.sft.max_steps": [2, 4]}}  # the 2-step run copies its prefix from the 4-step one
    plan = prepare(study_from_dict(raw), tmp_path)
    assert [r.config.report_to for r in plan.runs] == [INSTALLED, INSTALLED]
    assert any(r.donor for r in plan.runs)
    assert execute(plan, tmp_path) == []
    for planned in plan.runs:
        run_dir = tmp_path / "runs" / planned.id
        want = expected(read_metrics(run_dir), "cell_type/pbmc68k")
        assert {step for _, tag, step in want if tag == "val/accuracy"} == {0, 2, planned.stages[0]["steps"]}
        if "tensorboard" in INSTALLED:
            same(tensorboard_scalars(run_dir), want)  # a branch's copied prefix included, nothing past it
        if "wandb" in INSTALLED:
            record = wandb_run(run_dir)
            assert (record.display_name, record.run_group) == (planned.id, "grouped")
            same(wandb_scalars(run_dir), want)
        if "mlflow" in INSTALLED:
            found, values = mlflow_scalars(run_dir)
            assert (found.experiment.name, found.run.info.run_name) == ("grouped", planned.id)
            same(values, want)
    ids = [json.loads((tmp_path / "runs" / r.id / "trackers.json").read_text()) for r in plan.runs]
    assert all(a != b for a, b in zip(*[i.values() for i in ids]))  # no tracker run shared with the donor

    for axis in ({"grid": {"report_to": [["wandb"], []]}}, {"pipelines": {"a": {"stages": ["sft"],
                                                                                 "set": {"report_to": []}}}}):
        with pytest.raises(ConfigError, match="trackers are not an axis"):
            study_from_dict({**raw, **axis})
