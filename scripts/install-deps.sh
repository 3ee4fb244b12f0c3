#!/usr/bin/env bash
# install-deps.sh — installs the Debian packages kvhost needs to build and test, when any is missing.
# Needs root (or sudo). Safe to run again: it does nothing when everything is present.
set -euo pipefail
packages=(build-essential cmake pkg-config libopenblas-dev libinih-dev libcjson-dev libcriterion-dev
          libpcre2-dev valgrind parallel)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
