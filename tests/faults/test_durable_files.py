"""Atomic files, torn JSON lines and checksummed checkpoint directories (biopost.durable)."""

from __future__ import annotations

import json

import pytest

from biopost import durable
from biopost.runlog import RunLog, read_metrics


def test_an_interrupted_replacement_leaves_the_old_file_whole(tmp_path):
    path = durable.write_json(tmp_path / "selection.json", {"best_step": 2})
    with pytest.raises(RuntimeError), durable.replacing(path) as tmp:
        tmp.write_text('{"best_st')  # half written when the writer dies
        raise RuntimeError
    assert json.loads(path.read_text()) == {"best_step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["selection.json"]


def test_a_torn_last_metrics_line_is_dropped_on_read_and_cut_before_the_next_append(tmp_path, capsys):
    log = RunLog(tmp_path)
    log.write([{"step": 1, "value": 0.5}, {"step": 2, "value": 0.6}])
    with log.metrics_path.open("a") as fh:
        fh.write('{"step": 3, "val')  # a kill in the middle of an append
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "torn last line" in capsys.readouterr().err
    log.write([{"step": 3, "value": 0.7}])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert log.metrics_path.read_text().count("\n") == 3


def test_a_damaged_line_inside_the_file_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(tmp_path)


def test_published_directories_are_whole_and_damage_is_detected(tmp_path):
    target = tmp_path / "step-000002"
    with durable.publishing(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"\x01" * 1000)
        (tmp / "config.json").write_text("{}")
    assert durable.check_manifest(target) is None
    with pytest.raises(RuntimeError), durable.publishing(target) as tmp:  # a failed re-save keeps the old copy
        (tmp / "model.safetensors").write_bytes(b"\x02")
        raise RuntimeError
    assert durable.check_manifest(target) is None and not list(tmp_path.glob(".tmp-*"))

    weights = target / "model.safetensors"
    weights.write_bytes(b"\x01" * 999)
    assert "truncated (999 of 1000 bytes)" in durable.check_manifest(target)
    weights.write_bytes(b"\x01" * 999 + b"\x00")
    assert "does not match its checksum" in durable.check_manifest(target)
    weights.unlink()
    assert "missing" in durable.check_manifest(target)
    (target / durable.MANIFEST).unlink()
    assert "did not finish" in durable.check_manifest(target)
