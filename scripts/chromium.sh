#!/usr/bin/env bash
# Debian's headless Chromium, for the test that loads optuna-dashboard in a real browser.
#   scripts/chromium.sh install    install Debian's chromium if no chromium is found
set -euo pipefail
case "${1:-}" in
install)
    if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
        exit 0
    fi
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
    command -v chromium >/dev/null
    ;;
*)
    echo "usage: $0 install" >&2
    exit 2
    ;;
esac
