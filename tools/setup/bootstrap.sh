#!/usr/bin/env bash
# Create or repair the kiv virtual environment: torch, the OpenMMLab 2.x stack
# with mmcv's CPU ops built from source (cached), and kiv in editable mode.
#
# Idempotent: when nothing changed since the last successful run it only
# verifies the imports (seconds). A run that stopped half-way leaves no
# "ready" stamp, so the next run redoes the install steps (pip skips what is
# already there) instead of trusting a half-built environment.
#
# Environment variables:
#   KIV_VENV        virtual environment directory     (default: .venv)
#   KIV_PYTHON      interpreter used to create it     (default: python3)
#   KIV_CACHE_DIR   cache for built wheels            (default: ${XDG_CACHE_HOME:-~/.cache}/kiv)
#   KIV_TORCH_REQS  torch requirements file           (default: requirements/torch.txt)
#   KIV_JOBS        parallel compile jobs for mmcv    (default: nproc)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
VENV=${KIV_VENV:-.venv}
PY_BOOT=${KIV_PYTHON:-python3}
CACHE=${KIV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiv}
TORCH_REQS=${KIV_TORCH_REQS:-requirements/torch.txt}
JOBS=${KIV_JOBS:-$(nproc 2>/dev/null || echo 2)}
PY="$VENV/bin/python"
STAMP="$VENV/.kiv-setup-ok"
LOG="$VENV/kiv-setup.log"
CONSTRAINTS=requirements/constraints.txt
# The stack must import; kiv must be installed (its own code is the tests' job).
VERIFY='import mmcv.ops, mmdet.models, mmseg.models, mmpretrain.models, importlib.util as u; assert u.find_spec("kiv")'

say() { printf '[kiv-setup] %s\n' "$*"; }

# Everything that decides what gets installed goes into the stamp.
fingerprint() {
  cat requirements/*.txt requirements.txt setup.py tools/setup/bootstrap.sh \
      tools/setup/build_mmcv.py "$TORCH_REQS" 2>/dev/null | sha256sum | cut -d' ' -f1
}

# step NAME HINT -- COMMAND...: run COMMAND, on failure name the step and the fix.
step() {
  local name=$1 hint=$2; shift 3
  say "$name"
  if ! "$@" >>"$LOG" 2>&1; then
    say "FAILED at step: $name"
    say "last lines of $LOG:"
    tail -n 25 "$LOG" | sed 's/^/    /'
    say "what to do: $hint"
    say "then run 'make env' again: finished steps are reused."
    exit 1
  fi
}

want=$(fingerprint)
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  if "$PY" -c "$VERIFY" >/dev/null 2>&1; then
    say "environment $VENV is ready (cached)"
    exit 0
  fi
  say "environment $VENV failed its import check: repairing it"
fi

# A venv whose interpreter does not run is rebuilt from scratch.
if [ -d "$VENV" ] && ! "$PY" -c 'import sys' >/dev/null 2>&1; then
  say "removing broken virtual environment $VENV"
  rm -rf "$VENV"
fi
if [ ! -d "$VENV" ]; then
  "$PY_BOOT" -m venv "$VENV" || { say "FAILED at step: create venv with $PY_BOOT (install python3-venv)"; exit 1; }
fi
rm -f "$STAMP"
: >"$LOG"
PIP=("$PY" -m pip install --disable-pip-version-check -c "$CONSTRAINTS")

step "1/6 build tools (setuptools<81, wheel, ninja, numpy)" \
  "check that PyPI is reachable" -- \
  "${PIP[@]}" "setuptools>=77.0.3,<81" wheel ninja "numpy<2.4"
step "2/6 torch + torchvision ($TORCH_REQS)" \
  "check $TORCH_REQS; GPU users: see README 'GPU install'" -- \
  "${PIP[@]}" -r "$TORCH_REQS"

say "3/6 mmcv 2.1.0 with CPU ops (cache: $CACHE/wheels)"
if ! wheel=$("$PY" tools/setup/build_mmcv.py --cache-dir "$CACHE/wheels" --jobs "$JOBS" 2>>"$LOG" | tail -n 1) || [ ! -f "$wheel" ]; then
  say "FAILED at step: mmcv build"
  tail -n 25 "$LOG" | sed 's/^/    /'
  say "what to do: install gcc/g++ and python3-dev, free ~3 GB of RAM, then run 'make env' again"
  exit 1
fi
step "    install $(basename "$wheel")" "delete $CACHE/wheels and retry" -- \
  "${PIP[@]}" --no-deps "$wheel"

step "4/6 OpenMMLab stack and runtime requirements" \
  "check that PyPI is reachable; see requirements/mminstall.txt" -- \
  "${PIP[@]}" -r requirements/mminstall.txt -r requirements/runtime.txt -r requirements/tests.txt
step "5/6 kiv (editable)" "see the pip output above" -- \
  "${PIP[@]}" --no-deps --no-build-isolation -e .
step "6/6 verify the stack imports (mmcv.ops, mmdet, mmseg, mmpretrain)" \
  "the stack imports fail; see the traceback above" -- \
  "$PY" -c "$VERIFY; import mmcv.ops as o; assert hasattr(o, 'MultiScaleDeformableAttention')"

echo "$want" >"$STAMP"
say "environment $VENV is ready"
