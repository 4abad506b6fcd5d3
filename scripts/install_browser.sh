#!/usr/bin/env bash
# Installs Debian's chromium + chromium-driver for the search page's browser test (tests/serve/test_page_browser.py).
# Idempotent: does nothing when both are on PATH. Needs root (or passwordless sudo) and the Debian archive;
# when that is impossible it says so and exits 0 — the browser test then names this script in its skip reason
# (and fails under CI=true, where the browser is required).
set -uo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "setup: chromium and chromedriver (the browser test's) are installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: no apt-get here; install chromium and its matching chromedriver yourself to run the browser test" >&2
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "setup: installing chromium needs root: run 'sudo apt-get install chromium chromium-driver'" >&2
    exit 0
fi
echo "setup: installing Debian's chromium and chromium-driver with apt-get (about 1 minute, ~300 MB)"
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver; then
    # a stale or missing package list is the usual cause on a fresh machine
    "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver || {
        echo "setup: apt-get could not install chromium chromium-driver (see above); the browser test is skipped (and fails under CI=true)" >&2
        exit 0
    }
fi
echo "setup: installed in $((SECONDS - start)) s: $(chromium --version 2>/dev/null | head -1)"
