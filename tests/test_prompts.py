"""Prompt overrides for every task (`task.prompt: {system, user}`): what the model reads changes, in one place,
and bad templates fail before training in one line."""

from __future__ import annotations

import pytest

from biopost.config import ConfigError, validate_config
from biopost.data.splits import LeakageError
from biopost.pipeline import load_task_and_splits
from biopost.stages.sft import tokenize_example

PBMC = "cell_type/pbmc68k"
PARAPHRASE = "Here is a human cell, genes listed from most to least expressed: {{ cell }}. Name its type."


def pbmc_with_prompt(**prompt):
    config = validate_config({"task": {"name": PBMC, "options": {"top_k_genes": 16}, "prompt": prompt},
                              "stages": [{"kind": "sft"}]})
    return load_task_and_splits(config)


def test_default_prompt_is_the_documented_template(pbmc_task, pbmc_splits):
    example = pbmc_splits.val[0]
    genes = example.fields["genes"]
    assert pbmc_task.messages(example) == [
        {"role": "system", "content": pbmc_task.system_prompt},
        {"role": "user", "content": f"Organism: Homo sapiens. The {len(genes)} most highly expressed genes of one "
                                    f"cell, in decreasing order: {' '.join(genes)}.\nWhich cell type is this cell? "
                                    f"Choose one of: {'; '.join(pbmc_task.labels)}."},
    ]


def test_paraphrased_prompt_changes_what_the_model_reads(pbmc_task, pbmc_splits, sft_run):
    from biopost.models.policy import load_policy

    task, splits = pbmc_with_prompt(system="Answer as a haematologist.", user=PARAPHRASE)
    assert splits.fingerprints() == pbmc_splits.fingerprints()  # same data, another wording
    example = splits.val[0]
    system, user = (m["content"] for m in task.messages(example))
    assert system == "Answer as a haematologist."
    assert user == f"Here is a human cell, genes listed from most to least expressed: {' '.join(example.fields['genes'])}. Name its type."
    # SFT, evaluation and RL all tokenize task.messages: the paraphrase is what the model is trained on
    policy = load_policy(sft_run.final)
    ids = tokenize_example(policy, task, example, 512)["input_ids"]
    default_ids = tokenize_example(policy, pbmc_task, example, 512)["input_ids"]
    assert ids != default_ids
    assert "haematologist" in policy.tokenizer.decode(ids) and "Name its type." in policy.tokenizer.decode(ids)
    assert task.training_texts([example])[0].startswith("Answer as a haematologist.\nHere is a human cell")
    # a fused cell encoder reads the cell: the paraphrase shows its placeholder
    task.fused_modalities = frozenset({"cell"})
    assert "expressed: <|cell|>. Name its type." in task.messages(example)[-1]["content"]


def test_leakage_check_reads_the_rendered_prompt():
    """A paraphrase that drops the genes makes every prompt the same: the leakage check must see that."""
    with pytest.raises((LeakageError, ConfigError), match="identical"):
        pbmc_with_prompt(user="A cell of {{ organism }}. Which cell type?")


@pytest.mark.parametrize("user, message", [
    ("Genes: {{ genez }}", "task.prompt.user: the template uses genez, which example "),
    ("Genes: {{ genez }}", "does not provide; its variables: cell, choices, genes, organism"),
    ("{{ cell.__class__.__mro__ }}", "task.prompt.user: the template fails on example "),
    ("{{ cell.__class__.__mro__ }}", "(SecurityError"),
    ("{{ genes[40] }}", "(UndefinedError"),
])
def test_bad_user_templates_fail_at_load_in_one_line(user, message):
    with pytest.raises(ValueError) as err:
        pbmc_with_prompt(user=user)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_template_syntax_error_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^config error: 'task.prompt.user': template syntax error \(line 1\): "):
        validate_config({"task": {"name": PBMC, "prompt": {"user": "{% if choices %}no end"}}, "stages": [{"kind": "sft"}]})
    with pytest.raises(ConfigError, match=r"unknown key 'task.prompt.users'; valid keys here: system, user"):
        validate_config({"task": {"name": PBMC, "prompt": {"users": "x"}}, "stages": [{"kind": "sft"}]})


def test_data_is_never_run_as_a_template():
    from biopost.data import Example
    from biopost.tasks.prompts import PromptTemplate

    example = Example("x", {"note": "{{ 7 * 7 }} {% for i in range(3) %}x{% endfor %}"}, "y")
    assert PromptTemplate("Note: {{ note }}").render(example.fields) == "Note: " + example.fields["note"]


def test_a_checkpoint_keeps_its_prompt(sft_run, tmp_path):
    """`biopost eval` / `predict` rebuild the task with the prompt it was trained on."""
    import json

    from biopost.inference import task_for_checkpoint
    from biopost.models.policy import CHECKPOINT_FILE

    marker = json.loads((sft_run.final / CHECKPOINT_FILE).read_text())
    marker["task"]["config_task"]["prompt"] = {"system": "Be brief.", "user": PARAPHRASE}
    (tmp_path / CHECKPOINT_FILE).write_text(json.dumps(marker))
    task, _ = task_for_checkpoint(tmp_path, PBMC)
    example = task.example_from_input({"id": "c", "genes": ["CD3E", "LCK"]}, "in:1")
    assert [m["content"] for m in task.messages(example)] == [
        "Be brief.", "Here is a human cell, genes listed from most to least expressed: CD3E LCK. Name its type."]
