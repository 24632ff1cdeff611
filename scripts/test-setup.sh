#!/usr/bin/env bash
# What the tests need beyond the Python packages: Debian's Chromium for the report page's browser
# test. Installed where missing and possible (root with apt-get); otherwise that test skips, saying why.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test-setup: installing Debian's chromium for the browser test"
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
    || echo "test-setup: could not install chromium; the browser test will skip"
else
  echo "test-setup: chromium missing and not root with apt-get; the browser test will skip"
fi
exit 0
