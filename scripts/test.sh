#!/usr/bin/env bash
# Installs everything the tests need (package, dev extras, Debian's Chromium for the browser tests)
# and runs the whole suite. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=",dev" bash scripts/setup.sh
bash scripts/install_browser.sh
${PYTHON:-python3} -m pytest "$@"
