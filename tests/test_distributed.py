"""One run config under a distributed launcher: SFT then RL with 2 CPU processes (gloo) gives the metrics rows
and final weights of 1 process with the same global batch, and only the main process writes files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import fast_config_dict

SRC = Path(__file__).resolve().parents[1] / "src"

REWARDS = '''
def by_length(prompts, completions, **kwargs):
    """Spreads rewards within a group (correctness alone is 0 for a tiny model), so RL updates are not zero."""
    return [float(len(c) % 3) for c in completions]
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, config: Path, out: Path) -> subprocess.CompletedProcess:
    """``biopost train`` under torch's launcher (what ``accelerate launch`` runs for several processes)."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "biopost.cli", "train", str(config), "--output-dir", str(out)]
    done = subprocess.run(cmd, cwd=config.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def rows_by_key(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keyed = {(r["stage"], r["step"], r["split"], r["metric"]): r for r in rows}
    assert len(keyed) == len(rows)  # no row written twice (one writer)
    return keyed


def files_of(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock.json"}


def test_two_processes_match_one(tmp_path, tiny_backbone):
    config = fast_config_dict(tiny_backbone)
    config["eval"].update(splits=["val", "ood_test"], max_examples=8, batch_size=4, max_new_tokens=8)  # 2 batches
    config["stages"] = [
        {"kind": "sft", "max_steps": 4, "eval_every_steps": 2, "batch_size": 4, "lr": 1e-2,
         "schedule": {"name": "constant", "warmup_ratio": 0.0}},
        {"kind": "rl", "max_steps": 2, "eval_every_steps": 2, "prompts_per_step": 2, "num_generations": 2,
         "micro_batch_size": 2, "max_completion_length": 8, "lr": 1e-2, "beta": 0.04,
         "rewards": {"custom": [{"function": "spread_rewards:by_length", "weight": 1.0}]}},
    ]
    (tmp_path / "spread_rewards.py").write_text(REWARDS)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, path, one)
    launch(2, path, two)

    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    assert files_of(one) == files_of(two)  # the same files, written once (by the main process)
    rows_one, rows_two = rows_by_key(one), rows_by_key(two)
    assert rows_one.keys() == rows_two.keys()
    assert {k[0] for k in rows_one} == {"sft", "rl"} and any(k[2] == "ood_test" for k in rows_one)
    for key, row in rows_one.items():
        other = rows_two[key]
        assert row["n"] == other["n"], key
        if isinstance(row["value"], float):
            assert other["value"] == pytest.approx(row["value"], rel=1e-4, abs=1e-5), key
        else:
            assert other["value"] == row["value"], key
    spread = [r["value"] for k, r in rows_one.items() if k[0] == "rl" and k[3] == "reward_by_length"]
    assert len(spread) == 2 and any(v > 0 for v in spread)  # rewards differed: the RL updates were not empty

    for stage in ("0-sft", "1-rl"):
        w_one = load_file(one / "stages" / stage / "final" / "adapter_model.safetensors")
        w_two = load_file(two / "stages" / stage / "final" / "adapter_model.safetensors")
        assert w_one.keys() == w_two.keys()
        for name in w_one:
            torch.testing.assert_close(w_two[name], w_one[name], rtol=1e-4, atol=1e-6, msg=name)
