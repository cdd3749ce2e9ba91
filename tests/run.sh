#!/usr/bin/env bash
# The test command of README.md: installs what the suite needs, then runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked
