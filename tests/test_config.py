"""Typed config: unknown keys and wrong types are one-line errors naming the key; dotted overrides; run ids."""

from __future__ import annotations

import pytest
import yaml

import biopost.models.policy
import biopost.pipeline
from biopost.cli import main
from biopost.config import ConfigError, apply_override, dump_config, load_config, validate_config


def minimal() -> dict:
    return {"task": {"name": "cell_type/pbmc68k"}, "stages": [{"kind": "sft"}]}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    return path


def error_of(path, *overrides) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    message = str(err.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    return message


@pytest.mark.parametrize("override, key, some_valid", [
    ("foo=1", "'foo'", ["model", "stages", "task"]),
    ("model.lora.rnk=3", "'model.lora.rnk'", ["rank", "alpha"]),
    ("stages.0.epoch=2", "'stages.0.epoch'", ["epochs", "max_steps", "lr"]),
])
def test_unknown_key_names_dotted_key_and_lists_valid_keys(config_file, override, key, some_valid):
    message = error_of(config_file, override)
    assert "unknown key" in message and key in message
    listed = message.split("valid keys here:")[1]
    for valid in some_valid:
        assert valid in listed


def test_wrong_type_names_the_key(config_file):
    message = error_of(config_file, "stages.0.lr=abc")
    assert "'stages.0.lr'" in message and "abc" in message


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match="'task'"):
        validate_config({"stages": [{"kind": "sft"}]})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_set_list_items_and_parse_values_as_yaml(config_file):
    config = load_config(config_file, [
        "stages.0.epochs=2", "stages.0.lr=1e-4", "model.lora=null", "eval.splits=[val, ood_test]", "seed=7",
    ])
    assert config.stages[0].epochs == 2
    assert config.stages[0].lr == pytest.approx(1e-4)
    assert config.model.lora is None
    assert config.eval.splits == ["val", "ood_test"]
    assert config.seed == 7


def test_override_values_are_typed_before_validation():
    raw = apply_override(minimal(), "task.options.scale=1e-4")
    raw = apply_override(raw, "task.options.flag=true")
    raw = apply_override(raw, "task.options.none=null")
    assert raw["task"]["options"] == {"scale": 1e-4, "flag": True, "none": None}
    assert isinstance(raw["task"]["options"]["scale"], float)


@pytest.mark.parametrize("override, fragment", [
    ("model.lora.rank", "KEY=VALUE"),
    ("stages.3.lr=1", "index below 1"),
    ("stages.x.lr=1", "index below 1"),
    ("task.name.x=1", "not a section"),
    ("model.lora.rank=[1,", "not valid YAML"),
])
def test_bad_override_syntax_is_a_config_error(config_file, override, fragment):
    assert fragment in error_of(config_file, override)


def test_run_id_is_stable_and_changes_with_any_field(tmp_path):
    a = validate_config(minimal())
    assert a.run_id() == validate_config(minimal()).run_id()
    reordered = {"stages": [{"kind": "sft"}], "task": {"name": "cell_type/pbmc68k"}}
    assert validate_config(reordered).run_id() == a.run_id()
    dump_config(a, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").run_id() == a.run_id()
    changed = apply_override(minimal(), "stages.0.lr=0.5")
    assert validate_config(changed).run_id() != a.run_id()
    assert validate_config(apply_override(minimal(), "eval.seed=1")).run_id() != a.run_id()


def test_cli_train_reports_bad_key_in_one_line_before_loading_anything(config_file, tmp_path, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model or run was started before the config was validated")

    monkeypatch.setattr(biopost.pipeline, "run", forbidden)
    monkeypatch.setattr(biopost.models.policy, "load_policy", forbidden)
    out_dir = tmp_path / "out"
    code = main(["train", str(config_file), "--output-dir", str(out_dir), "model.lora.rnk=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "'model.lora.rnk'" in err and "rank" in err
    assert not out_dir.exists()


# ---------------------------------------------------------------- YAML 1.2 values, and indexes into defaults
def rl_minimal() -> dict:
    return {"task": {"name": "cell_type/pbmc68k"}, "stages": [{"kind": "sft"}, {"kind": "rl"}]}


@pytest.fixture
def rl_config_file(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(rl_minimal()))
    return path


def test_overrides_read_numbers_and_booleans_as_yaml_1_2(rl_config_file):
    config = load_config(rl_config_file, ["stages.0.max_steps=010", "stages.1.eval_at_start=false",
                                          "stages.1.beta=1e-3", "task.options.top_k_genes=0016"])
    assert config.stages[0].max_steps == 10  # not octal 8
    assert config.stages[1].eval_at_start is False and config.stages[1].beta == pytest.approx(1e-3)
    assert config.task.options == {"top_k_genes": 16}
    assert apply_override(minimal(), "task.options.flag=yes")["task"]["options"]["flag"] == "yes"


@pytest.mark.parametrize("override, key, got", [
    ("stages.1.beta=yes", "'stages.1.beta'", '"yes"'),  # was 1.0
    ("stages.0.max_steps=on", "'stages.0.max_steps'", '"on"'),  # was 1
    ("stages.1.eval_at_start=off", "'stages.1.eval_at_start'", '"off"'),  # was False
    ("task.split.allow_overlap=yes", "'task.split.allow_overlap'", '"yes"'),
])
def test_yaml_1_1_words_are_strings_that_numbers_and_booleans_refuse(rl_config_file, override, key, got):
    message = error_of(rl_config_file, override)
    assert key in message and f"(got {got})" in message


def test_yaml_1_1_words_in_a_config_file_are_refused_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: {name: cell_type/pbmc68k}\nstages:\n  - kind: sft\n    eval_at_start: no\n")
    assert "write true or false" in error_of(path)


def test_an_index_into_a_default_list_edits_the_default(config_file):
    config = load_config(config_file, ["eval.splits.0=val", "eval.splits.3=id_test"])
    assert config.eval.splits == ["val", "id_test", "ood_test", "id_test"]


@pytest.mark.parametrize("override, fragment", [
    ("eval.splits.4=val", "'eval.splits.4': '4' is not an index below 4"),
    ("model.lora.target_modules.0=q", "'model.lora.target_modules': no list here to index (default \"all-linear\")"),
    ("task.split.ood_test_groups.0=G1", "'task.split.ood_test_groups': no list here to index (default null)"),
])
def test_an_index_without_a_list_says_why(config_file, override, fragment):
    assert fragment in error_of(config_file, override)


def test_dumped_configs_read_back_identically(tmp_path):
    assert validate_config(apply_override(minimal(), "name=010")).name == "010"  # a text field keeps the text
    with pytest.raises(ConfigError, match="'name': Input should be a valid string .*; quote it"):
        validate_config({**minimal(), "name": 10})  # in a file, YAML has read a number already
    config = validate_config({**minimal(), "name": "1e3",
                              "task": {"name": "cell_type/pbmc68k", "options": {"x": "yes"}}})
    dump_config(config, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert text.index("name:") < text.index("task:") < text.index("stages:")  # field order kept
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("override", ["stages.0.freeze_projector=yes", "model.encoders.dna.trust_remote_code=on",
                                      "model.encoders.dna.cache=off"])
def test_every_boolean_field_refuses_yaml_1_1_words(override, tmp_path):
    """yes / on / off are strings in YAML 1.2: no boolean field (fusion ones included) turns them into True/False."""
    path = tmp_path / "c.yaml"
    path.write_text("task: {name: cell_type/pbmc68k}\nmodel: {encoders: {dna: {name: tiny-dna}}}\nstages: [{kind: sft}]\n")
    with pytest.raises(ConfigError, match="valid boolean"):
        load_config(path, [override])


# ---------------------------------------------------------------- YAML 1.2 core schema; typed overrides
@pytest.mark.parametrize("override, key", [
    ("stages.0.max_steps=1_000", "'stages.0.max_steps'"),  # was 1000
    ("stages.0.max_steps=0b11", "'stages.0.max_steps'"),  # was 3
    ("stages.0.lr=1_0e-4", "'stages.0.lr'"),
    ("eval.max_examples=2024-01-01", "'eval.max_examples'"),  # was a date
    ("task.options.top_k_genes=1_6", "'task.options.top_k_genes'"),  # a task's own number option
])
def test_non_core_numbers_are_text_that_number_fields_refuse(config_file, override, key):
    from biopost.registry import get_task

    value = override.split("=", 1)[1]
    try:  # a task's options are validated when the task is built
        config = load_config(config_file, [override])
        get_task(config.task.name, config.task.options)
    except ConfigError as err:
        message = str(err)
    assert message == (f'config error: {key}: a number is expected (got "{value}"); YAML 1.2 reads this as text: '
                       "write digits with an optional sign, point and exponent, e.g. 1000 or 1e-4")


def test_errors_in_the_eval_section_name_it(config_file):
    assert "unknown key 'eval.batchsize'; valid keys here: batch_size, bootstrap" in error_of(config_file, "eval.batchsize=2")


def test_non_core_numbers_in_a_file_are_refused_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: {name: cell_type/pbmc68k}\nstages:\n  - kind: sft\n    max_steps: 1_000\n")
    assert "'stages.0.max_steps': a number is expected (got \"1_000\")" in error_of(path)
    path.write_text("task: {name: cell_type/pbmc68k}\nstages:\n  - kind: sft\n    name: 2024-01-01\n")
    assert load_config(path).stages[0].name == "2024-01-01"  # a date is text, which a text field takes


@pytest.mark.parametrize("override, path, expected", [
    ("model.revision=1234567", ("model", "revision"), "1234567"),  # a short git sha: was the int 1234567, refused
    ("model.revision=0123456", ("model", "revision"), "0123456"),  # was 123456
    ("model.revision=1234e56", ("model", "revision"), "1234e56"),  # was the float 1.234e59
    ("model.encoders.dna.revision=20240101", ("model", "encoders", "dna", "revision"), "20240101"),
    ("name=1e3", ("name",), "1e3"),
    ("model.revision=null", ("model", "revision"), None),
    ("task.options.revision=0123", ("task", "options", "revision"), "0123"),  # a task's own text option
])
def test_text_fields_keep_override_text_as_typed(override, path, expected):
    raw = {"task": {"name": "table"}, "model": {"encoders": {"dna": {"name": "tiny-dna"}}}, "stages": [{"kind": "sft"}]}
    node = apply_override(raw, override)
    for part in path:
        node = node[part]
    assert node == expected


def test_numbers_stay_numbers_where_a_field_takes_both(config_file):
    config = load_config(config_file, ["task.split.ood_test_groups=0.25", "stages.0.lr=1e-3", "model.lora.rank=010"])
    assert config.task.split.ood_test_groups == 0.25 and config.stages[0].lr == 1e-3 and config.model.lora.rank == 10


@pytest.mark.parametrize("lora", ["{rank: 8}", "full"])
def test_continue_with_its_own_lora_is_an_error_naming_both_keys(config_file, lora):
    message = error_of(config_file, "stages.0.kind=rl", "stages.0.adapter=continue", f"stages.0.lora={lora}")
    assert "'stages.0'" in message and "adapter: continue" in message and "`lora`" in message
    assert load_config(config_file, ["stages.0.kind=rl", "stages.0.adapter=continue"]).stages[0].adapter == "continue"
