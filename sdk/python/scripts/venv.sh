#!/usr/bin/env bash
# Create (once) and print the Python of the SDK's test venv.
#
# The venv lives outside the clone, at ~/.cache/spendguard/venv/<key>, where <key> is a hash of
# requirements-test.txt and the Python version: a changed pin or interpreter gets a fresh venv,
# an unchanged one is reused in well under a second. The SDK is installed editable, so source
# edits need no reinstall. The last line of stdout is the venv's python path; everything else
# goes to stderr.
#
#   PY=$(sdk/python/scripts/venv.sh | tail -n1) && "$PY" -m pytest sdk/python/tests
#
# Env: PYTHON (interpreter to build from; default python3.11, else python3),
#      SPENDGUARD_VENV_ROOT (default ~/.cache/spendguard/venv).
set -euo pipefail

SDK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$SDK_DIR/requirements-test.txt"

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
case "$PY_VERSION" in
  3.1[1-9].*|3.[2-9][0-9].*) ;;
  *) echo "venv.sh: need Python >= 3.11, $PYTHON is $PY_VERSION" >&2; exit 1 ;;
esac

KEY="$( { cat "$REQ"; echo "python=$PY_VERSION"; } | sha256sum | cut -c1-16)"
ROOT="${SPENDGUARD_VENV_ROOT:-$HOME/.cache/spendguard/venv}"
VENV="$ROOT/$KEY"
VPY="$VENV/bin/python"
STAMP="$VENV/.spendguard-ready"

# Warm path: requirements installed; only re-link the editable package if this clone moved.
if [ -f "$STAMP" ] && [ -x "$VPY" ] && [ "$(cat "$STAMP")" = "$SDK_DIR" ]; then
  echo "$VPY"
  exit 0
fi

mkdir -p "$ROOT"
# One builder at a time (parallel test runs share the cache).
exec 9>"$ROOT/.lock-$KEY"
flock 9

if [ ! -f "$STAMP" ] || [ ! -x "$VPY" ]; then
  echo "venv.sh: creating $VENV" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VPY" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$VPY" -m pip install --quiet --disable-pip-version-check -r "$REQ" >&2
fi
# Editable install without touching dependencies (all pinned above, setuptools included).
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$SDK_DIR" >&2
"$VPY" -c "import spendguard" >&2
echo "$SDK_DIR" >"$STAMP"
echo "$VPY"
