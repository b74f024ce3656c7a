#!/usr/bin/env bash
# Main job: set up the environment if needed, then segment the embedded demo case
# through the ImbalanceSeg module Logic on a real MRML scene. Outputs go to output/demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/Testing/setup_env.sh"
cd "$ROOT"
exec "$PYTHON_BIN" "$ROOT/ImbalanceSeg/ImbalanceSegSlicer/demo.py" "$@"
