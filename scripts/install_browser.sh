#!/usr/bin/env bash
# Installs Debian's Chromium for the real-browser tests (tests/browser/).
# Playwright's own browser download does not work on these machines; the tests launch
# /usr/bin/chromium through Playwright's executable_path instead. Needs root or sudo.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) is already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
echo "install_browser: installed $(/usr/bin/chromium --version)"
