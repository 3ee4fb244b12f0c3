#!/usr/bin/env bash
# install-deps.sh — installs the Debian packages kvhost needs to build and test, when any is missing.
# Needs root (or sudo). Safe to run again: it does nothing when everything is present.
set -euo pipefail
packages=(build-essential cmake pkg-config libopenblas-dev libinih-dev libcjson-dev libcriterion-dev
          libpcre2-dev valgrind parallel libmicrohttpd-dev python3-pip)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if [ "${#missing[@]}" -ne 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The `openai` Python client, for the kvhost serve API test (tests/serve_client.py; it skips without it).
# Not fatal: Debian has no package for it, and a machine without network still builds and tests.
if ! python3 -c 'import openai' 2>/dev/null; then
  echo "install-deps: pip install openai (for tests/serve_client.py)"
  python3 -m pip install -q openai 2>/dev/null || python3 -m pip install -q --break-system-packages openai ||
    echo "install-deps: could not install the openai package: the serve_client test will be skipped"
fi
