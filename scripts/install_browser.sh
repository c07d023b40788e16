#!/usr/bin/env bash
# Installs Debian's Chromium for the real-browser tests (tests/browser/), only if no Chromium is found.
# Playwright's own browser download does not work on these machines; the tests launch Chromium
# through Playwright's executable_path instead ($CHROMIUM_PATH, else /usr/bin/chromium).
#
#   bash scripts/install_browser.sh           # find Chromium, else install it (apt, needs root or sudo)
#   bash scripts/install_browser.sh --check   # only say whether one is found (exit 1 if not)
#
# It installs nothing else: `apt-get install --no-install-recommends chromium`, and it refuses (exit 1)
# when that would upgrade any package already installed (checked with a dry run first).
set -euo pipefail

CANDIDATES=${ANYMS_CHROMIUM_CANDIDATES:-"${CHROMIUM_PATH:-} /usr/bin/chromium /usr/bin/chromium-browser"}
for candidate in $CANDIDATES; do
    if [ -x "$candidate" ]; then
        echo "install_browser: found $candidate"
        exit 0
    fi
done
if [ "${1:-}" = "--check" ]; then
    echo "install_browser: no Chromium found (looked at: $CANDIDATES)"
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
plan=$($SUDO apt-get install -s --no-install-recommends chromium)
# In a dry run, an upgrade of an installed package reads "Inst name [installed version] (new version ...)".
upgrades=$(printf '%s\n' "$plan" | grep -E '^Inst [^ ]+ \[' | cut -d' ' -f2 | tr '\n' ' ' || true)
if [ -n "$upgrades" ]; then
    echo "install_browser: installing chromium would upgrade installed packages ($upgrades); not doing that." >&2
    echo "install_browser: install Chromium yourself and set CHROMIUM_PATH, or upgrade first." >&2
    exit 1
fi
$SUDO apt-get install -y -q --no-install-recommends chromium
echo "install_browser: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
