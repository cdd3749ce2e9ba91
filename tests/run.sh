#!/usr/bin/env bash
# The test command of README.md: installs what the suite needs, then runs it.
# The Redis tests start their own redis-server processes on free 127.0.0.1 ports;
# nothing here touches a system Redis on 6379.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "tests/run.sh: installing redis-server (Debian package)"
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $as_root apt-get update -qq
  $as_root apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

cargo test --locked
