#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# The main job: sets everything up (resources/setup.sh), then runs the live-migration demo:
# hosts A and B and a client as network namespaces on one L2 segment, a guest serving TCP echo
# on host A, a client streaming numbered messages through it, a live migration to host B, and a
# summary (downtime, bytes, rounds, the client's largest gap, bytes lost). Everything the demo
# creates is removed when it ends. Extra arguments go to the demo (`--round-trip` migrates back
# to A as well; `--no-announce` skips the address announce and `--no-tcp-kick` the duplicate
# ACKs after the move, to see what each is worth).
#
# Usage: resources/demo.sh [--round-trip] [--no-announce] [--no-tcp-kick]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
"$here/setup.sh"
exec "$(dirname "$here")/target/x86_64-unknown-linux-gnu/release/vmm-demo" "$@"
