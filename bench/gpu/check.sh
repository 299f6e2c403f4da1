#!/usr/bin/env bash
# The prepared GPU check (bench/gpu/check.py): torch bf16 on CUDA, a bf16 distillation step, `--parallel fsdp`
# under torchrun with one process, ModelOpt FP8 PTQ and its unified export; one result line each, a JSON of all.
# Made for a GPU machine without network that gets this working tree and, optionally, a folder of wheels
# (e.g. nvidia-modelopt and those of its dependencies the machine lacks): they are installed first, offline.
#
#   bench/gpu/check.sh [--dry-run] [--wheels DIR] [--out DIR] [check.py's other options]
#
# PYTHON picks the interpreter (default python3: the machine's own, with its torch). Exit status 0 iff no FAIL.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
        --wheels=*) WHEELS=${1#--wheels=}; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1

status="none"
if [ -n "$WHEELS" ]; then
    # Every wheel in DIR, resolved offline against DIR and what is installed; if that fails (a dependency that is
    # neither), the wheels alone without their dependencies: modelopt imports without some of them. A failure here
    # is not fatal: the modelopt step reports SKIP with this status.
    log=$(mktemp)
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if [ ! -d "$WHEELS" ]; then
        status="not installed: $WHEELS is not a folder"
    elif [ ${#wheels[@]} -eq 0 ]; then
        status="not installed: no .whl files in $WHEELS"
    elif "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "${wheels[@]}" > "$log" 2>&1; then
        status="installed ${#wheels[@]} wheel(s) from $WHEELS"
    elif "$PYTHON" -m pip install -q --no-index --no-deps "${wheels[@]}" >> "$log" 2>&1; then
        status="installed ${#wheels[@]} wheel(s) from $WHEELS without dependency resolution ($(grep -m1 -i error "$log" || true))"
    else
        status="install failed: $(grep -i error "$log" | tail -n 1 || true)"
    fi
    rm -f "$log"
    echo "wheels: $status"
fi
export CHECK_WHEELS_STATUS="$status"
exec "$PYTHON" "$ROOT/bench/gpu/check.py" ${args[@]+"${args[@]}"}
