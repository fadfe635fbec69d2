"""docs/tasks.md stays runnable: its table snippet writes cells.csv, its YAML is the shipped demo config and
loads into a task with the documented split, and its reward function follows the contract."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from biopost.config import load_config
from biopost.pipeline import load_task_and_splits
from biopost.rewards import call_reward, load_reward_function

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "tasks.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, re.DOTALL)


def test_yaml_in_the_docs_is_the_shipped_demo_config():
    assert blocks("yaml")[0] == (ROOT / "configs" / "demo" / "table-csv-tiny.yaml").read_text()


def test_table_snippet_and_demo_config_give_the_documented_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks("python")[0], "docs/tasks.md", "exec"), {})
    config = load_config(ROOT / "configs" / "demo" / "table-csv-tiny.yaml")
    assert [s.kind for s in config.stages] == ["sft", "rl"]
    task, splits = load_task_and_splits(config)
    assert sum(splits.sizes().values()) == 700 and len(task.labels) == 10
    assert {e.meta["phase"] for e in splits.ood_test} == {"S", "G2M"}
    assert {e.meta["phase"] for e in splits.train} == {"G1"}
    example = splits.train[0]
    assert task.messages(example)[-1]["content"].startswith("Genes of one cell, most expressed first: ")
    assert len(example.fields["genes"].split()) == 24


def test_reward_in_the_docs_follows_the_contract(tmp_path, monkeypatch):
    module = next(b for b in blocks("python") if b.startswith("# myrewards.py"))
    (tmp_path / "myrewards.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    func = load_reward_function("myrewards:names_a_prompt_gene")
    completions = ["<think>\nCD3E is high\n</think>\n\nAnswer: T", "<think>\nno idea\n</think>\n\nAnswer: T", "Answer: T"]
    assert call_reward("genes", func, ["p"] * 3, completions, genes=["CD3E LCK"] * 3) == [1.0, 0.0, None]


@pytest.fixture(autouse=True)
def _forget_myrewards():
    import sys

    yield
    sys.modules.pop("myrewards", None)


def prompt_row(name: str) -> list[str]:
    """The cells of the prompts table's row naming task ``name`` (``\\|`` inside a cell is a literal bar)."""
    row = next(line for line in DOC.splitlines() if line.startswith("| ") and f"`{name}`" in line.split(" | ")[0])
    return [cell.replace("\\|", "|") for cell in re.split(r" (?<!\\)\| ", row.strip("| "))]


@pytest.mark.parametrize("name", ["kegg/disease", "tf_class/jaspar", "variant_effect/coding", "variant_effect/non_snv"])
def test_documented_default_prompts_are_the_tasks_own(name):
    """The system prompt as written, and the user prompt as a template that renders to the task's default."""
    from biopost.data import Example
    from biopost.registry import get_task
    from biopost.tasks.prompts import PromptTemplate

    task = get_task(name, {} if name == "tf_class/jaspar" else {"source": "variants.csv"})  # loads no data
    task.labels = ["C2H2 zinc finger", "bZIP"]
    _, system, user, _ = prompt_row(name)
    assert system == task.system_prompt.replace("<", "\\<").replace(">", "\\>")
    dna = "ACGT" if name == "tf_class/jaspar" else ("ACGTAC", "ACCTAC")
    example = Example("e1", {"question": "Which disease does this variant cause?", "site": "ACGT"}, "x", dna=dna)
    template = "\n".join(re.findall(r"`([^`]*)`", user.split(" (")[0]))
    assert PromptTemplate(template).render(task.prompt_variables(example), "docs", "e1") == task.user_prompt(example)
