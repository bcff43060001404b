#!/usr/bin/env bash
# System packages the test suite needs beyond the Python environment; idempotent (installs
# only what is missing). Today: headless Chromium for the dashboard test
# (tests/test_server_live.py::test_dashboard_in_headless_chromium). chromium-driver comes
# along for anyone who prefers WebDriver; the test itself speaks the DevTools protocol.
#
#   scripts/ci-deps.sh            # install what is missing (apt-based images: Debian/Ubuntu)
#   SEQROUTE_CHROMIUM=/path/to/chrome pytest ...   # use another browser binary instead
set -euo pipefail

have_chromium() {
  [ -n "${SEQROUTE_CHROMIUM:-}" ] && [ -x "${SEQROUTE_CHROMIUM}" ] && return 0
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1 || [ -x /usr/bin/chromium ]
}

if have_chromium && { command -v chromedriver >/dev/null 2>&1 || [ -n "${SEQROUTE_CHROMIUM:-}" ]; }; then
  echo "ci-deps: chromium already installed"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci-deps: no apt-get here; install Chromium yourself (or set SEQROUTE_CHROMIUM)," \
       "otherwise the dashboard browser test is skipped" >&2
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "ci-deps: not root and no sudo; cannot install chromium (the browser test will skip)" >&2
    exit 0
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "ci-deps: installed $(chromium --version 2>/dev/null || echo chromium)"
