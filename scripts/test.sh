#!/bin/bash
# The test command the README gives and CI runs: set up, then the whole suite.
#   --fast   only the tests that use no real component (`-m "not real"`): a few minutes,
#            as a normal user too (tests that need root skip saying so).
# Further arguments go to pytest, e.g. `bash scripts/test.sh tests/snapshotter -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
tier=()
if [ "${1:-}" = --fast ]; then
  tier=(-m "not real")
  shift
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "${tier[@]}" "$@"
