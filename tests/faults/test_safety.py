"""Safety: what biopost loads never runs code. Checkpoints are safetensors, every torch.load is weights_only,
a model's own code runs only when the config trusts that model, data and completions are never evaluated, and
names from a config never put a file outside the run or study directory."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import biopost
from biopost.cli import main
from biopost.config import ConfigError, ModelConfig, validate_config
from biopost.models.policy import load_policy
from biopost.registry import get_task

SRC = Path(biopost.__file__).parent


def calls(tree: ast.AST):
    """(dotted name of the callee, call node) for every call in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            parts.append(func.id if isinstance(func, ast.Name) else "<expr>")  # x().eval() is not eval()
            yield ".".join(reversed(parts)), node


SOURCES = {path.relative_to(SRC).as_posix(): ast.parse(path.read_text()) for path in sorted(SRC.rglob("*.py"))}


# ---------------------------------------------------------------- nothing in src/ evaluates or unpickles
def test_source_never_evaluates_code_or_unpickles():
    banned = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "marshal.loads", "dill.load",
              "joblib.load", "yaml.load", "yaml.unsafe_load", "numpy.load", "np.load"}
    found = [f"{path}:{node.lineno} {name}" for path, tree in SOURCES.items() for name, node in calls(tree)
             if name in banned]
    assert not found, found
    imported = {(path, alias.name) for path, tree in SOURCES.items() for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    unpicklers = {(path, name) for path, name in imported if name in {"pickle", "dill", "marshal", "shelve", "cloudpickle"}}
    # The one exception: Geneformer ships its dictionaries as pickles, which the cell encoder reads through an
    # Unpickler whose find_class always raises; every callable a pickle can run (REDUCE, NEWOBJ, INST, OBJ, EXT*)
    # must come from find_class, so such an unpickler builds only plain dicts, lists, strings and numbers.
    assert unpicklers <= {("models/cell_encoder.py", "pickle")}, unpicklers
    for path, _ in unpicklers:
        assert_only_refusing_unpicklers(path, SOURCES[path])


def assert_only_refusing_unpicklers(path: str, tree: ast.AST) -> None:
    """``pickle`` in ``path`` is used only to subclass ``pickle.Unpickler`` with a ``find_class`` that raises
    and nothing else, and to name ``pickle.UnpicklingError``; only that subclass is ever called."""
    refusing = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and [ast.unparse(b) for b in node.bases] == ["pickle.Unpickler"]:
            methods = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
            assert set(methods) == {"find_class"}, f"{path}: {node.name} overrides {sorted(methods)}"
            body = [b for b in methods["find_class"].body if not isinstance(b, ast.Expr)]  # a docstring may stay
            assert len(body) == 1 and isinstance(body[0], ast.Raise), f"{path}: {node.name}.find_class must only raise"
            refusing.add(node.name)
    uses = {ast.unparse(node) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pickle"}
    assert refusing and uses <= {"pickle.Unpickler", "pickle.UnpicklingError"}, f"{path}: {uses}"
    loads = [ast.unparse(node.func.value) for name, node in calls(tree) if name.endswith(".load")
             and isinstance(node.func.value, ast.Call)]
    assert all(load.split("(")[0] in refusing for load in loads), f"{path}: {loads}"


def test_every_torch_load_is_weights_only():
    loads = [(path, node) for path, tree in SOURCES.items() for name, node in calls(tree) if name == "torch.load"]
    assert loads, "the RL resume state is read with torch.load"
    for path, node in loads:
        weights_only = [k.value for k in node.keywords if k.arg == "weights_only"]
        assert weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True, \
            f"{path}:{node.lineno} torch.load without weights_only=True"


def test_code_is_imported_by_name_only_for_custom_rewards():
    """``module:function`` from a config (rewards) is the one dynamic import; never a string from data or output."""
    users = sorted({path for path, tree in SOURCES.items() for name, _ in calls(tree)
                    if name in ("importlib.import_module", "import_module")})
    assert users == ["rewards.py"]


def test_every_auto_class_load_passes_trust_remote_code():
    """Every AutoModel / AutoTokenizer / AutoConfig load says whether remote code may run, and never hard-codes yes."""
    for path, tree in SOURCES.items():
        for name, node in calls(tree):
            if name.startswith("Auto") and name.endswith(".from_pretrained"):
                given = {k.arg: k.value for k in node.keywords}
                assert "trust_remote_code" in given, f"{path}:{node.lineno} {name} without trust_remote_code"
                value = given["trust_remote_code"]
                assert not (isinstance(value, ast.Constant) and value.value is True), f"{path}:{node.lineno}"


# ---------------------------------------------------------------- checkpoints and resume state load weights-only
def test_checkpoints_are_safetensors_and_trainer_state_loads_weights_only(fast_config, tmp_path, monkeypatch, one_thread):
    import biopost.stages.context
    from biopost.pipeline import run

    # Keep the Trainer's resume state, which a finished stage deletes, to read it back.
    monkeypatch.setattr(biopost.stages.context.shutil, "rmtree", lambda *args, **kwargs: None)
    raw = fast_config()
    raw["eval"].update(splits=["val"], max_examples=2, max_new_tokens=4)
    raw["stages"][0].update(max_steps=2, eval_every_steps=2, eval_at_start=False)
    run_dir = run(validate_config(raw), tmp_path / "run")
    final = run_dir / "stages" / "0-sft" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not [p for p in final.iterdir() if p.suffix in
                                                                    (".bin", ".pt", ".pth", ".pkl")]
    pickled = sorted(p.name for p in run_dir.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl"))
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(pickled) and "training_args.bin" not in pickled
    from transformers.trainer_pt_utils import safe_globals

    for path in run_dir.rglob("*"):
        if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
            with safe_globals():  # what the Trainer allows when it resumes: numpy arrays and dtypes (its RNG state)
                torch.load(path, weights_only=True)  # UnpicklingError on anything else


@pytest.mark.parametrize("schedule", ["cosine", "constant", "warmup_stable_decay", "linear"])
def test_rl_resume_state_round_trips_weights_only(schedule, tiny_backbone, tmp_path, one_thread):
    from biopost.config import RLStage
    from biopost.stages.rl import ResumeState, make_scheduler

    stage = RLStage(schedule={"name": schedule, "warmup_ratio": 0.5})
    policy = load_policy(tiny_backbone)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=stage.lr)
    scheduler = make_scheduler(stage, optimizer, 8)
    policy.model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    ctx = SimpleNamespace(stage_dir=tmp_path, name="rl")
    ResumeState.save(ctx, policy, optimizer, scheduler, 1)
    state = torch.load(tmp_path / "resume" / "state.pt", weights_only=True)
    assert state["python_rng"] == random.getstate() and torch.equal(state["torch_rng"], torch.get_rng_state())
    random.random(), torch.rand(1)  # move both generators on; load must put them back

    again = load_policy(tiny_backbone)
    optimizer2 = torch.optim.AdamW(again.model.parameters(), lr=stage.lr)
    scheduler2 = make_scheduler(stage, optimizer2, 8)
    assert ResumeState.load(ctx, again, optimizer2, scheduler2).step == 1
    assert scheduler2.state_dict()["last_epoch"] == 1 and optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    moments = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b["exp_avg"]) for a, b in zip(moments, optimizer2.state_dict()["state"].values()))
    assert random.getstate() == state["python_rng"] and torch.equal(torch.get_rng_state(), state["torch_rng"])


# ---------------------------------------------------------------- a model's own code runs only when trusted
@pytest.fixture
def model_with_code(tmp_path):
    """A model directory whose config asks transformers to import its own module; importing it leaves a mark."""
    mark = tmp_path / "EXECUTED"
    folder = tmp_path / "remote-model"
    folder.mkdir()
    (folder / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(mark)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\nclass CustomConfig(PretrainedConfig):\n    model_type = 'custom-x'\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "custom-x", "auto_map": {
        "AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}}))
    return SimpleNamespace(path=folder, mark=mark)


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False
    assert validate_config({"task": {"name": "cell_type/pbmc68k"}, "stages": [{"kind": "sft"}]}).model.trust_remote_code is False


def test_a_model_with_its_own_code_is_refused_unless_trusted(model_with_code):
    with pytest.raises(ValueError, match="runs its own code: set model.trust_remote_code: true"):
        load_policy(model_with_code.path)
    assert not model_with_code.mark.exists()
    with pytest.raises(Exception):  # trusted: its module is imported (and lacks the model class it names)
        load_policy(model_with_code.path, trust_remote_code=True)
    assert model_with_code.mark.read_text() == "ran"  # the check above can see code running


def test_train_refuses_a_backbone_with_code_by_default(model_with_code, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"task": {"name": "cell_type/pbmc68k"}, "model": {"backbone": str(model_with_code.path)},
                                  "stages": [{"kind": "eval"}], "eval": {"max_examples": 1}}))
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "runs its own code: set model.trust_remote_code: true" in err[-1]
    assert not model_with_code.mark.exists()


# ---------------------------------------------------------------- data and completions stay text
SNEAKY = "{{ ''.__class__.__mro__[1].__subclasses__() }} __import__('os').system('touch {mark}')"


def test_dataset_values_and_completions_are_never_run(tmp_path):
    mark = tmp_path / "EXECUTED"
    sneaky = SNEAKY.format(mark=mark)
    rows = [{"id": f"r{i}", "note": sneaky if i == 0 else f"n{i}", "label": "ab"[i % 2], "group": "ABC"[i % 3]}
            for i in range(12)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("table", {"source": str(tmp_path / "rows.jsonl"), "prompt": "Note: {{ note }}. Label?",
                              "columns": {"id": "id", "answer": "label", "group": "group"}})
    examples = {e.id: e for e in task.load()}
    task.fit(list(examples.values()))
    prompt = task.messages(examples["r0"])[-1]["content"]
    assert prompt == f"Note: {sneaky}. Label?"  # inserted as text: the template in the data is not rendered
    completion = f"<think>{sneaky}</think>\n\nAnswer: {sneaky}"
    assert task.score(completion, examples["r0"])["accuracy"] == 0.0
    assert task.prediction(completion)["strict"] is None and task.reward([completion], [examples["r0"]]) == [0.0]
    from biopost.tasks.proteins.go_terms import go_ids

    assert go_ids(f"[{sneaky!r}, __import__('os').system('touch {mark}')]") == []  # literal_eval: literals only
    assert not mark.exists()


def test_a_template_from_a_config_cannot_reach_python_internals(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "label": "ab"[i % 2], "group": "ABC"[i % 3]})
                                                 + "\n" for i in range(6)))
    task = get_task("table", {"source": str(tmp_path / "rows.jsonl"), "prompt": "{{ ''.__class__.__mro__ }} Label?",
                              "columns": {"id": "id", "answer": "label", "group": "group"}})
    example = task.load()[0]
    with pytest.raises(Exception, match="unsafe|__class__|__mro__"):  # jinja2's sandbox refuses dunder access
        task.messages(example)


# ---------------------------------------------------------------- names from a config stay inside the run
@pytest.mark.parametrize("override", ["stages.0.name=../../escaped", "stages.0.name=/tmp/escaped", "name=../escaped",
                                      "stages.0.name=.hidden"])
def test_names_that_would_leave_the_run_directory_are_config_errors(override, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"task": {"name": "cell_type/pbmc68k"}, "stages": [{"kind": "sft"}]}))
    assert main(["train", str(config), "--output-dir", str(tmp_path / "a" / "run"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "may use letters, digits, '_', '.', '-' only" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_a_study_name_that_would_leave_studies_is_a_config_error(tmp_path):
    from biopost.study.config import load_study

    study = tmp_path / "study.yaml"
    study.write_text(json.dumps({"name": "../../x", "base": {"task": {"name": "cell_type/pbmc68k"},
                                                             "stages": [{"kind": "sft"}]}}))
    with pytest.raises(ConfigError, match="may use letters"):
        load_study(study)
