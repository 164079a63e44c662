#!/usr/bin/env bash
# The test command: installs what the tests need, checks formatting and lints, builds every binary and runs
# every test (unit, integration, guest boots). CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Integration tests run the built binaries (tessera, tessera-core, tessera-chardev, tessera-blk, ...).
cargo build --workspace --bins --locked
cargo test --workspace --locked -- --test-threads=2
