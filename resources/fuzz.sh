#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Runs every fuzz target (fuzz/fuzz_targets/*.rs) for SECONDS each, with AddressSanitizer, on
# the stable toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the sanitizer flags), starting
# from the committed seeds in fuzz/corpus/TARGET. Installs cargo-fuzz if it is missing. Needs
# root (virtio_net makes a network namespace and a TAP). Exits non-zero on the first crash; the
# crashing input is in fuzz/artifacts/TARGET/: fix the bug, then keep the input in
# fuzz/regressions/TARGET/ (vmm/tests/fuzz_corpus.rs replays it from then on).
#
# Usage: resources/fuzz.sh SECONDS [TARGET...]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
log() { printf 'fuzz: %s\n' "$*" >&2; }

seconds=${1:-}
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    log "usage: resources/fuzz.sh SECONDS [TARGET...]"
    exit 2
fi
shift
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi
cd "$root/fuzz"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
start=$(date +%s)
log "building ${#targets[@]} targets (AddressSanitizer)"
cargo fuzz build --release --sanitizer address >/dev/null
log "built in $(( $(date +%s) - start )) s"
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log "$t: ${seconds} s"
    # -max_len: a migration frame or a driver's memory needs more than libFuzzer's default 4 KiB.
    cargo fuzz run --release --sanitizer address "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
        2>"target/$t.log" || { tail -40 "target/$t.log" >&2; log "$t: FAILED (input in fuzz/artifacts/$t/)"; exit 1; }
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' "target/$t.log" | sed "s/^/fuzz: $t: /" >&2 || true
done
log "all ${#targets[@]} targets ran ${seconds} s each without a crash ($(( $(date +%s) - start )) s in all)"
