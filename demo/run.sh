#!/bin/bash
# The demo (README's first command): on a fresh Debian 12 machine as root it installs
# what it needs, then builds images, publishes them and starts them from the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python demo/demo.py "$@"
