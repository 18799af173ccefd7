#!/usr/bin/env bash
# CI: klmonitor.verl and klmonitor.openrlhf against the real frameworks, each in its own clean
# virtual environment (verl pins transformers<5.11, OpenRLHF transformers==5.15 with deepspeed
# and flash-attn), CPU only. Installs only what their contract tests import: verl's DataProto
# and V1 trainer modules, OpenRLHF's Experience (OpenRLHF itself --no-deps). Keep the versions
# in step with pyproject.toml's [verl] / [openrlhf] extras.
# Usage: .ci/frameworks.sh [VENV_ROOT]   (default: a temporary folder, removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ROOT="${1:-}"
if [ -z "$ROOT" ]; then ROOT="$(mktemp -d)"; trap 'rm -rf "$ROOT"' EXIT; fi
KLM_DEPS=(torchmetrics pytorch-lightning tensorboard numpy pytest hypothesis)

# --- verl 0.9.x ---
V="$ROOT/verl"
[ -x "$V/bin/python" ] || python -m venv "$V"
"$V/bin/pip" install -q torch==2.13.0
"$V/bin/pip" install -q --no-deps verl==0.9.1
# DataProto: ray, tensordict, omegaconf, transformers; the V1 trainer: verl's [verl-core] part
"$V/bin/pip" install -q ray==2.60.0 "tensordict>=0.8,<=0.10.0,!=0.9.0" omegaconf hydra-core \
    "transformers>=5.5.3,<5.11,!=5.6.0" TransferQueue codetiming datasets cachetools uvicorn fastapi \
    torchdata peft "${KLM_DEPS[@]}"
"$V/bin/pip" install -q --no-deps -e .
"$V/bin/python" -m pytest -q -p no:cacheprovider tests/test_verl.py

# --- OpenRLHF 0.11.x ---
O="$ROOT/openrlhf"
[ -x "$O/bin/python" ] || python -m venv "$O"
"$O/bin/pip" install -q torch==2.13.0
"$O/bin/pip" install -q --no-deps openrlhf==0.11.2
# Experience imports openrlhf.utils: transformers (OpenRLHF's pin) and pylatexenc
"$O/bin/pip" install -q transformers==5.15.0 pylatexenc "${KLM_DEPS[@]}"
"$O/bin/pip" install -q --no-deps -e .
"$O/bin/python" -m pytest -q -p no:cacheprovider tests/test_openrlhf.py
