#!/usr/bin/env bash
# System binaries the test suite uses for real: promtool and the Prometheus server
# (Debian package `prometheus`), shellcheck for the deploy/ shell scripts.
# Idempotent and quick when already installed.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are missing or older than a day.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
  $SUDO apt-get update -qq
fi
# --no-install-recommends keeps it to the server + promtool; the package's service is never started here.
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v shellcheck >/dev/null
