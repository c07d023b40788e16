#!/usr/bin/env bash
# Installs what the tests need (package, dev extras) and runs the whole suite. .ci/run calls exactly this.
# Browser tests (tests/browser/) need Chromium: in CI (CI set) it is installed if missing (apt, no
# upgrades); elsewhere nothing is installed into the system, and without Chromium those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=",dev" bash scripts/setup.sh
if [ -n "${CI:-}" ]; then
    bash scripts/install_browser.sh
elif ! bash scripts/install_browser.sh --check >/dev/null; then
    echo "test.sh: no Chromium found, browser tests will skip (enable: CI=1 bash scripts/test.sh, or bash scripts/install_browser.sh, or CHROMIUM_PATH=/path/to/chromium)"
fi
${PYTHON:-python3} -m pytest "$@"
