#!/usr/bin/env bash
# CI: klmonitor.verl and klmonitor.openrlhf against the real frameworks, each in its own clean
# virtual environment (verl pins transformers<5.11, OpenRLHF transformers==5.15 with deepspeed
# and flash-attn), CPU only. Installs only what their contract tests import: verl's DataProto
# and V1 trainer modules, OpenRLHF's Experience (OpenRLHF itself --no-deps). Keep the versions
# in step with pyproject.toml's [verl] / [openrlhf] extras.
#
# Usage: .ci/frameworks.sh [install|test|all] [VENV_ROOT]
#   install: create the venvs (touches nothing in the source tree: .ci/run runs it in the
#            background, beside the main tests); test: run the contract tests with this checkout
#            on PYTHONPATH (klmonitor is not installed into the venvs: no second build of the
#            native kernel in the source tree); all (default): both, in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
MODE="${1:-all}"
ROOT="${2:-}"
if [ -z "$ROOT" ]; then ROOT="$(mktemp -d)"; trap 'rm -rf "$ROOT"' EXIT; fi
KLM_DEPS=(torchmetrics pytorch-lightning tensorboard numpy pytest hypothesis)
V="$ROOT/verl"
O="$ROOT/openrlhf"

install() {
    # --- verl 0.9.x ---
    [ -x "$V/bin/python" ] || python -m venv "$V"
    "$V/bin/pip" install -q torch==2.13.0
    "$V/bin/pip" install -q --no-deps verl==0.9.1
    # DataProto: ray, tensordict, omegaconf, transformers; the V1 trainer: verl's [verl-core] part
    "$V/bin/pip" install -q ray==2.60.0 "tensordict>=0.8,<=0.10.0,!=0.9.0" omegaconf hydra-core \
        "transformers>=5.5.3,<5.11,!=5.6.0" TransferQueue codetiming datasets cachetools uvicorn fastapi \
        torchdata peft "${KLM_DEPS[@]}"
    # --- OpenRLHF 0.11.x ---
    [ -x "$O/bin/python" ] || python -m venv "$O"
    "$O/bin/pip" install -q torch==2.13.0
    "$O/bin/pip" install -q --no-deps openrlhf==0.11.2
    # Experience imports openrlhf.utils: transformers (OpenRLHF's pin) and pylatexenc
    "$O/bin/pip" install -q transformers==5.15.0 pylatexenc "${KLM_DEPS[@]}"
    # the PPOTrainer module (klmonitor's trainer mixin): ray and datasets (vLLM/DeepSpeed are faked)
    "$O/bin/pip" install -q ray==2.60.0 datasets
}

run_tests() {
    # This checkout on the path (the native kernel, if the main install built it, is found and
    # checked as usual; otherwise the torch path runs).
    PYTHONPATH="$PWD" "$V/bin/python" -m pytest -q -p no:cacheprovider tests/test_verl.py
    PYTHONPATH="$PWD" "$O/bin/python" -m pytest -q -p no:cacheprovider tests/test_openrlhf.py
}

case "$MODE" in
    install) install ;;
    test) run_tests ;;
    all) install; run_tests ;;
    *) echo "usage: $0 [install|test|all] [VENV_ROOT]" >&2; exit 2 ;;
esac
