#!/usr/bin/env bash
# Installs AnyMS and its notebook extras into the current Python (3.10+).
# torch: if it is not installed yet, this installs torch 2.13.0 from pip. On a GPU machine install
# the torch build for your platform first (https://pytorch.org/get-started/locally/); it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install -q "torch==2.13.0"
fi
"$PYTHON" -m pip install -q -e ".[notebooks${EXTRAS:-}]"
