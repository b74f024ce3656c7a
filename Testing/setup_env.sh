#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install what it needs.
# Sourced by run_demo.sh and run_tests.sh; safe to run again (does nothing when up to date).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IMBALANCESEG_VENV:-$ROOT/.venv}"

find_python() {
  for py in "${PYTHON:-}" python3.11 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$py"; return 0
    fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)" || { echo "error: Python 3.11 is required (slicer-core ships cp311 wheels); set PYTHON=/path/to/python3.11" >&2; exit 1; }
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.imbalanceseg-installed"
WANT="$(cat "$ROOT/Testing/requirements.txt" "$ROOT/ImbalanceSegLib/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing Python packages (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/Testing/requirements.txt"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT/ImbalanceSegLib"
  echo "$WANT" > "$STAMP"
fi

# Offscreen OpenGL (OSMesa) for the slice snapshots rendered by Slicer's displayable managers.
if ! ldconfig -p 2>/dev/null | grep -q 'libOSMesa\.so'; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing libosmesa6 (offscreen OpenGL) with apt-get"
    (apt-get install -y -qq libosmesa6 >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libosmesa6 >/dev/null; })
  else
    echo "[setup] warning: libOSMesa not found and not root; install Debian's libosmesa6 for the PNG snapshots" >&2
  fi
fi

export VTK_DEFAULT_OPENGL_WINDOW="${VTK_DEFAULT_OPENGL_WINDOW:-vtkOSOpenGLRenderWindow}"
export PYTHONPATH="$ROOT/ImbalanceSeg${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON_BIN="$VENV/bin/python"
