#!/bin/sh
# Debian's Chromium for the console's browser tests (tests/server/console), driven by playwright with
# executable_path=/usr/bin/chromium: playwright's own browser download needs a host we cannot reach.
# Idempotent: does nothing when chromium is already there; skips (exit 0) when not root or without apt,
# and the browser tests then skip with a message saying how to install it.
set -eu
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: chromium is missing; as root run: apt-get install -y chromium chromium-driver" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
echo "install-browser: installed $(chromium --version 2>/dev/null || echo chromium)"
