#!/usr/bin/env bash
# Create (once) and print the path of a moto_server, which tests start (through
# spendguard_testkit::moto) to stand in for AWS KMS (runtime/evidence) and S3 (runtime/workers).
#
# Same scheme as sdk/python/scripts/venv.sh: the venv lives outside the clone, at
# ~/.cache/spendguard/venv/moto-<key>, where <key> hashes moto-requirements.txt and the Python
# version, so a changed pin or interpreter gets a fresh venv and an unchanged one is reused at
# once. The last line of stdout is the moto_server path; everything else goes to stderr.
#
#   MOTO=$(runtime/testkit/moto/moto-venv.sh | tail -n1) && "$MOTO" -H 127.0.0.1 -p 5123
#
# Env: PYTHON (interpreter to build from; default python3.11, else python3),
#      SPENDGUARD_VENV_ROOT (default ~/.cache/spendguard/venv).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQ="$HERE/moto-requirements.txt"

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
case "$PY_VERSION" in
  3.9.*|3.1[0-9].*|3.[2-9][0-9].*) ;;
  *) echo "moto-venv.sh: need Python >= 3.9, $PYTHON is $PY_VERSION" >&2; exit 1 ;;
esac

KEY="$( { cat "$REQ"; echo "python=$PY_VERSION"; } | sha256sum | cut -c1-16)"
ROOT="${SPENDGUARD_VENV_ROOT:-$HOME/.cache/spendguard/venv}"
VENV="$ROOT/moto-$KEY"
MOTO="$VENV/bin/moto_server"
STAMP="$VENV/.spendguard-ready"

if [ -f "$STAMP" ] && [ -x "$MOTO" ]; then
  echo "$MOTO"
  exit 0
fi

mkdir -p "$ROOT"
# One builder at a time (test binaries and parallel runs share the cache).
exec 9>"$ROOT/.lock-moto-$KEY"
flock 9

if [ ! -f "$STAMP" ] || [ ! -x "$MOTO" ]; then
  echo "moto-venv.sh: creating $VENV" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ" >&2
  "$VENV/bin/python" -c "import moto.server" >&2
  touch "$STAMP"
fi
echo "$MOTO"
