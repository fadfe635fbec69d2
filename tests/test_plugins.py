"""Plug-ins: a task from an installed package (entry point group `biopost.tasks`), reward functions by
`module:function` in an RL stage, and `biopost train` running SFT then RL on a table task defined only in YAML."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from biopost import registry
from biopost.cli import main
from biopost.config import ConfigError, RLStage, load_config, validate_config
from biopost.data import Example
from biopost.runlog import read_metrics
from biopost.stages import rl

PLUGIN = '''
from biopost.data import Example
from biopost.tasks.base import LabelTask

MOTIFS = {"TATAAA": "TBP", "CACGTG": "MYC", "GGAAGT": "ETS1", "CCAAT": "NFYA"}


class MotifTask(LabelTask):
    """Which factor binds a site: a third-party task, registered through an entry point."""

    name = "toy/motifs"
    domain = "genomics"
    default_ood_field = "flank"
    default_ood_test_groups = ["G"]
    user_template = "Which factor binds {{ dna }}?{% if choices %} One of: {{ choices | join(', ') }}.{% endif %}"

    def load(self):
        self.labels = sorted(MOTIFS.values())
        return [Example(f"s{i}", {}, factor, dna=flank * (1 + i % 5) + motif + "ACGT"[i % 4] * (i // 4 + 1),
                        meta={"flank": flank})
                for i, (flank, (motif, factor)) in enumerate(
                    (f, m) for f in "ACGT" for m in MOTIFS.items() for _ in range(3))]
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "biopost-toy-motifs"
version = "0.1.0"

[project.entry-points."biopost.tasks"]
"toy/motifs" = "biopost_toy_motifs:MotifTask"
'''


@pytest.fixture
def clean_registry(monkeypatch):
    """Plug-ins registered by a test are forgotten afterwards (and their modules unloaded)."""
    registry.task_names()  # built-in tasks registered before the snapshot
    tasks, plugins, modules = dict(registry.TASKS), dict(registry.PLUGINS), set(sys.modules)
    yield
    registry.TASKS.clear(), registry.TASKS.update(tasks)
    registry.PLUGINS.clear(), registry.PLUGINS.update(plugins)
    for name in set(sys.modules) - modules:
        if name.startswith(("biopost_toy", "toy_rewards")):
            del sys.modules[name]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The plug-in package, built and installed by pip into a throwaway directory (offline, the shared venv untouched)."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "src" / "biopost_toy_motifs").mkdir(parents=True)
    (root / "src" / "pyproject.toml").write_text(PYPROJECT)
    (root / "src" / "biopost_toy_motifs" / "__init__.py").write_text(PLUGIN)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(root / "site"), str(root / "src")], check=True, capture_output=True)
    assert (root / "site" / "biopost_toy_motifs-0.1.0.dist-info" / "entry_points.txt").is_file()
    return root / "site"


def test_installed_plugin_task_is_listed_and_runs(plugin_site, monkeypatch, clean_registry, capsys):
    assert "toy/motifs" not in registry.task_names()
    monkeypatch.syspath_prepend(str(plugin_site))
    assert main(["tasks"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("toy/motifs"))
    assert "[genomics]" in line and "ood_test=12" in line and "plug-in: biopost-toy-motifs 0.1.0" in line
    config = validate_config({"task": {"name": "toy/motifs", "prompt": {"user": "Site: {{ dna }}"}},
                              "stages": [{"kind": "sft"}]})
    from biopost.pipeline import load_task_and_splits

    task, splits = load_task_and_splits(config)
    assert {e.meta["flank"] for e in splits.ood_test} == {"G"}
    assert task.messages(splits.train[0])[-1]["content"] == f"Site: {splits.train[0].dna}"


def test_broken_plugin_fails_in_one_line_only_when_asked_for(tmp_path, monkeypatch, clean_registry):
    """The metadata pip writes, by hand: a package whose entry point names a module that does not exist."""
    info = tmp_path / "biopost_toy_broken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: biopost-toy-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text('[biopost.tasks]\ntoy/broken = biopost_toy_broken.tasks:Broken\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.get_task("cell_type/pbmc68k").name == "cell_type/pbmc68k"  # other tasks are unaffected
    with pytest.raises(ConfigError) as err:
        registry.get_task("toy/broken")
    assert str(err.value) == ("plug-in task 'toy/broken' (biopost_toy_broken.tasks:Broken from biopost-toy-broken "
                              "1.0) failed to import: ModuleNotFoundError: No module named 'biopost_toy_broken'")


def fake_plugin(site: Path, package: str, entry_name: str, module_text: str, target: str = "Task") -> None:
    """A package installed in ``site`` as pip leaves it (dist-info with an entry point, and its module)."""
    info = site / f"{package}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f'[biopost.tasks]\n{entry_name} = {package}:{target}\n')
    (site / f"{package}.py").write_text(module_text)


FAULTY = PLUGIN.replace('name = "toy/motifs"', 'name = "toy/faulty"') + '''

class Task(MotifTask):
    def __init__(self, options=None):
        super().__init__(options)
        raise RuntimeError("needs a licence file")


class Loads(MotifTask):
    name = "toy/loads"

    def load(self):
        return {}["motifs"]
'''


def test_plugin_that_fails_to_build_or_load_names_its_package(tmp_path, monkeypatch, clean_registry, capsys):
    fake_plugin(tmp_path, "biopost_toy_faulty", "toy/faulty", FAULTY)
    fake_plugin(tmp_path / "other", "biopost_toy_loads", "toy/loads", FAULTY.replace("toy/faulty", "toy/other"), "Loads")
    monkeypatch.syspath_prepend(str(tmp_path)), monkeypatch.syspath_prepend(str(tmp_path / "other"))
    with pytest.raises(ConfigError) as err:  # was: the plug-in's RuntimeError, as a traceback
        registry.get_task("toy/faulty")
    assert str(err.value) == ("plug-in task 'toy/faulty' (biopost_toy_faulty:Task from biopost-toy-faulty 1.0) failed "
                              "to build: RuntimeError: needs a licence file; fix the package or pip uninstall "
                              "biopost-toy-faulty")
    (tmp_path / "run.yaml").write_text(json.dumps({"task": {"name": "toy/loads"}, "stages": [{"kind": "sft"}]}))
    assert main(["train", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        "biopost train: plug-in task 'toy/loads' (biopost_toy_loads:Loads from biopost-toy-loads 1.0) failed to load "
        "its data: KeyError: 'motifs'; fix the package or pip uninstall biopost-toy-loads")


def test_plugin_named_like_a_builtin_task_or_another_plugin_is_refused(tmp_path, monkeypatch, clean_registry, capsys):
    fake_plugin(tmp_path, "biopost_toy_table", "table", PLUGIN.replace('"toy/motifs"', '"table"'), "MotifTask")
    monkeypatch.syspath_prepend(str(tmp_path))
    clash = ("plug-in task 'table' (biopost_toy_table:MotifTask from biopost-toy-table 1.0) has the name of a "
             "built-in task; rename the plug-in's entry point and task (e.g. '<package>/table'), or pip uninstall "
             "biopost-toy-table")
    with pytest.raises(ConfigError) as err:  # was: the built-in silently kept, and `biopost tasks` a traceback
        registry.get_task("table", {"source": "x.csv", "columns": {"answer": "a", "group": "g"}, "prompt": "x"})
    assert str(err.value) == clash
    assert main(["tasks"]) == 2 and capsys.readouterr().err.strip() == f"biopost tasks: {clash}"
    assert registry.TASKS["table"].__module__ == "biopost.tasks.table"  # never replaced

    monkeypatch.syspath_prepend(str(tmp_path / "b")), monkeypatch.syspath_prepend(str(tmp_path / "a"))
    for package in ("a", "b"):
        fake_plugin(tmp_path / package, f"biopost_toy_{package}", "toy/motifs", PLUGIN, "MotifTask")
    with pytest.raises(ConfigError, match=r"^plug-in task 'toy/motifs' \(biopost_toy_b:MotifTask from biopost-toy-b "
                                          r"1.0\) and plug-in task 'toy/motifs' \(biopost_toy_a:MotifTask from "
                                          r"biopost-toy-a 1.0\) have the same name; uninstall one of them"):
        registry.get_task("toy/motifs")


# ---------------------------------------------------------------- reward functions by module:function
REWARDS = '''
import json, os

def names_a_gene(prompts, completions, genes, **kwargs):
    """1 when the completion names a gene of the cell, 0 when not; abstains (None) on every other completion."""
    out = [None if i % 2 else float(any(g in c for g in row.split())) for i, (c, row) in enumerate(zip(completions, genes))]
    if os.environ.get("TOY_REWARDS_LOG"):
        with open(os.environ["TOY_REWARDS_LOG"], "a") as fh:
            fh.write(json.dumps({"values": out, "prompt_has_genes": all(g in p for p, g in zip(prompts, genes)),
                                 "columns": sorted(kwargs)}) + "\\n")
    return out

def constant(prompts, completions, **kwargs):
    return [0.25] * len(completions)

def positional_only(prompts, completions):
    return [0.0] * len(completions)

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def toy_rewards(tmp_path, monkeypatch, clean_registry):
    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_custom_rewards_join_the_builtin_ones_and_none_abstains(toy_rewards):
    stage = RLStage(rewards={"correctness": 1.0, "format": 0.5, "custom": [
        {"function": "toy_rewards:names_a_gene", "weight": 2.0}, {"function": "toy_rewards:constant", "name": "flat"}]})
    task = registry.get_task("cell_type/pbmc68k")
    task.labels = ["B", "T"]
    funcs = rl.reward_functions(task, stage)
    assert list(funcs) == ["correctness", "format", "names_a_gene", "flat"]
    examples = [Example(f"e{i}", {"genes": "CD3E LCK"}, "T") for i in range(4)]
    completions = ["<think>\nCD3E\n</think>\n\nAnswer: T", "Answer: B", "no gene", "<think>\nLCK\n</think>\n\nAnswer: B"]
    batch = rl.Rollouts(examples, None, None, None, torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]]), completions, {},
                        prompts=["p"] * 4)
    scores = rl.score_rollouts(batch, funcs, stage)
    assert scores["reward_names_a_gene"][[0, 2]].tolist() == [1.0, 0.0] and scores["reward_names_a_gene"][[1, 3]].isnan().all()
    assert scores["reward_names_a_gene_none"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert rl.mean_or_none(scores["reward_names_a_gene"]) == 0.5  # abstentions are left out of the mean
    # correctness (1, 0, 0, 0) + 0.5 * format (1, 0, 0, 1) + 2 * names_a_gene (1, -, 0, -) + 1 * flat (.25 each)
    assert scores["reward"].tolist() == pytest.approx([1 + 0.5 + 2 + 0.25, 0.25, 0.25, 0.5 + 0.25])
    assert rl.mean_or_none(torch.tensor([float("nan")] * 2)) is None


@pytest.mark.parametrize("function, message", [
    ("toy_rewards.constant", "is not 'module:function'"),
    ("no_such_module:f", "cannot import 'no_such_module' (ModuleNotFoundError"),
    ("toy_rewards:missing", "module 'toy_rewards' has no attribute 'missing'"),
    ("toy_rewards:NOT_A_FUNCTION", "is not callable"),
    ("toy_rewards:positional_only", "must accept **kwargs"),
])
def test_bad_reward_paths_are_one_line_config_errors(toy_rewards, monkeypatch, capsys, function, message):
    monkeypatch.chdir(toy_rewards)
    path = toy_rewards / "run.yaml"
    path.write_text(json.dumps({"task": {"name": "cell_type/pbmc68k"}, "stages": [
        {"kind": "rl", "rewards": {"custom": [{"function": function, "weight": 0.5}]}}]}))
    with pytest.raises(ConfigError, match=r"^config error: 'stages.0.rewards.custom.0.function': reward "):
        load_config(path)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_custom_reward_names_must_be_unique(toy_rewards):
    with pytest.raises(ConfigError, match="reward name 'format' is taken"):
        validate_config({"task": {"name": "x"}, "stages": [{"kind": "rl", "rewards": {"custom": [
            {"function": "toy_rewards:constant", "name": "format"}]}}]})


# ---------------------------------------------------------------- acceptance: SFT then RL on a table, from YAML only
TABLE_RUN = """
name: table-acceptance
task:
  name: table
  options:
    source: cells.csv
    columns: {id: cell_id, answer: cell_type, group: phase}
    prompt: "Genes of one cell, most expressed first: {{ genes }}. Which cell type is it?"
    answer_kind: label
  split: {ood_test_groups: [S, G2M]}
model: {backbone: tiny-s, lora: {rank: 4, alpha: 8, dropout: 0.0}}
eval: {splits: [val, id_test, ood_test], max_examples: 4, batch_size: 4, max_new_tokens: 8, bootstrap: 10}
stages:
  - {kind: sft, lora: full, max_steps: 2, batch_size: 8, lr: 1.0e-2, eval_every_steps: 2, eval_at_start: false}
  - kind: rl
    max_steps: 2
    prompts_per_step: 2
    num_generations: 2
    max_completion_length: 8
    eval_every_steps: 2
    eval_at_start: false
    rewards: {correctness: 1.0, format: 0.5, custom: [{function: "toy_rewards:names_a_gene", weight: 0.5}]}
"""


@pytest.mark.usefixtures("one_thread")
def test_train_runs_sft_then_rl_on_a_yaml_table_and_logs_the_custom_reward(toy_rewards, monkeypatch, capsys):
    monkeypatch.chdir(toy_rewards)
    monkeypatch.setenv("TOY_REWARDS_LOG", str(toy_rewards / "calls.jsonl"))
    types = {"B": "MS4A1 CD79A", "T": "CD3E CD3D", "NK": "NKG7 GNLY", "Mono": "LYZ CD14"}
    lines = ["cell_id,genes,cell_type,phase"] + [
        f"c{i},{types[t]} GENE{i},{t},{['G1', 'G1', 'S', 'G2M'][i // 4 % 4]}" for i, t in enumerate(list(types) * 10)]
    (toy_rewards / "cells.csv").write_text("\n".join(lines) + "\n")
    (toy_rewards / "run.yaml").write_text(TABLE_RUN)
    assert main(["train", "run.yaml", "--output-dir", "run"]) == 0
    rows = read_metrics(toy_rewards / "run")
    assert {(r["stage"], r["split"]) for r in rows if r["metric"] == "accuracy"} == {
        (s, split) for s in ("sft", "rl") for split in ("val", "id_test", "ood_test")}
    logged = {(r["step"], r["metric"]): r["value"] for r in rows if r["stage"] == "rl" and r["split"] == "train"}
    calls = [json.loads(line) for line in (toy_rewards / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and all(c["prompt_has_genes"] for c in calls)
    assert {"phase", "answer", "id", "examples", "completion_lengths"} <= set(calls[0]["columns"])
    for step, call in enumerate(calls, 1):
        given = [v for v in call["values"] if v is not None]
        assert logged[step, "reward_names_a_gene"] == pytest.approx(sum(given) / len(given))
        assert logged[step, "reward_names_a_gene_none"] == pytest.approx(0.5)  # every other completion abstains
        expected = logged[step, "reward_correctness"] + 0.5 * logged[step, "reward_format"] + 0.5 * sum(given) / 4
        assert logged[step, "reward"] == pytest.approx(expected)
