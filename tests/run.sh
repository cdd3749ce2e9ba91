#!/usr/bin/env bash
# The test command of README.md: installs what the suite needs (Debian's redis-server,
# chromium, nginx-light, nodejs, npm, curl (the SSE tests' client), prometheus (promtool) and
# systemd (systemd-analyze), cargo-deb from crates.io, and Python's websockets from PyPI; the client
# package's test installs its `ws` dependency from the npm registry), checks formatting, clippy
# and the docs, then runs the suite.
# The Redis tests start their own redis-server processes on free 127.0.0.1 ports;
# nothing here touches a system Redis on 6379. The browser tests drive Debian's
# chromium headless against nodes on 127.0.0.1 (screenshots in target/test-output/).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v curl >/dev/null 2>&1 || missing+=(curl)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
# promtool, for the alert rules' tests (Debian's prometheus package).
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# systemd-analyze, for the package's unit (tests/package.rs).
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]} (Debian packages)"
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $as_root apt-get update -qq
  $as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# cargo-deb builds the Debian package that tests/package.rs installs and removes.
cargo deb --version >/dev/null 2>&1 || cargo install cargo-deb --version 3.8.0 --locked

# Python's websockets: a real client not written here, for the permessage-deflate tests.
python3 -c 'import websockets' 2>/dev/null || python3 -m pip install -q websockets

# The house's lints: formatting, clippy with every warning an error, and documentation
# (private items included) without a warning. rustup's default profile has both tools;
# a minimal one gets them added.
if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
  rustup component add clippy rustfmt
fi
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --document-private-items

cargo test --locked
