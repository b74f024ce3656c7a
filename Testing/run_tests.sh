#!/usr/bin/env bash
# Test command: set up the environment if needed, then run the library and module tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/Testing/setup_env.sh"
cd "$ROOT"
exec "$PYTHON_BIN" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" ImbalanceSegLib/tests ImbalanceSeg/Testing/Python Testing/Python "$@"
