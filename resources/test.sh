#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Runs all tests: sets everything up (resources/setup.sh), checks formatting, clippy and the API
# documentation, then runs every test of the workspace in release mode: unit tests, KVM probes,
# and the end-to-end tests that boot real guests, migrate them between network namespaces and
# check the network, the API and the address takeover. Needs root and /dev/kvm (without
# /dev/kvm the tests that need it say so loudly and skip). Then the fuzzing smoke run: every fuzz target for
# VMM_FUZZ_SECONDS (default 30) with AddressSanitizer (resources/fuzz.sh; 0 skips it).
#
# Usage: resources/test.sh [extra cargo test arguments]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
# With the tests' own dependencies, so that `cargo test` below compiles nothing twice.
"$here/setup.sh" --all-targets
# Rust as setup.sh may just have installed it.
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cd "$root"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
# The API documentation builds without a warning (a broken link is a warning).
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps --workspace --quiet
cargo test --release --workspace "$@"
fuzz_seconds=${VMM_FUZZ_SECONDS:-30}
if [ "$fuzz_seconds" -gt 0 ]; then
    "$here/fuzz.sh" "$fuzz_seconds"
fi
