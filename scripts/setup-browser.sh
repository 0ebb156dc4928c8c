#!/usr/bin/env bash
# The browser the UI tests drive: Debian's chromium (Playwright drives it through executable_path, so
# nothing is downloaded from Playwright's CDN), and fonts for Chinese text and emoji in the screenshots.
# Installs with apt-get when run as root; otherwise says what to install (the browser tests then skip).
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
fc-list 2>/dev/null | grep -qi "Noto Sans CJK" || need+=(fonts-noto-cjk)
fc-list 2>/dev/null | grep -qi "Noto Color Emoji" || need+=(fonts-noto-color-emoji)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "sdstudio: installing ${need[*]} for the browser tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${need[@]}" >/dev/null 2>&1; } \
    || echo "sdstudio: could not install ${need[*]}; the browser tests will be skipped"
else
  echo "sdstudio: the browser tests need: ${need[*]} (e.g. sudo apt-get install ${need[*]}); they will be skipped"
fi
exit 0
