#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Sets everything up on a fresh Debian 12 machine (run as root): the packages the build and the
# tests need, the Linux guest kernel (built once, then cached outside the work tree), the Linux
# guest's initramfs, the nested host of resources/l1.sh (packages and its initramfs), and the
# whole workspace in release mode (the VMM, our own guest kernel, the
# demo and the benchmarks).
#
# Usage: resources/setup.sh [--all-targets]
#   --all-targets  also build the tests (resources/test.sh): with their dev-dependencies the
#                  features of shared crates differ, so building the binaries alone first and
#                  the tests after compiles about 160 crates twice (5 more minutes on 2 cores).
set -euo pipefail

targets=()
case "${1:-}" in
    --all-targets) targets=(--all-targets) ;;
    "") ;;
    *) printf 'setup: error: unknown argument %s (usage: resources/setup.sh [--all-targets])\n' "$1" >&2; exit 2 ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "error: run as root: KVM, network namespaces and TAP devices need it"
    exit 1
fi
# iproute2 (ip netns, bridges, veth, TAP), util-linux (unshare, setpriv), python3 (the initramfs
# packer): tests and the demo use them. A C toolchain links the Rust binaries; libclang-dev is
# what the userfaultfd crate's build generates its kernel bindings with (bindgen); fonts-dejavu-core
# is the benchmark plot's font; curl fetches rustup if there is no Rust. etcd-server (the
# cluster's store; tests and the cluster demo start their own), etcd-client (etcdctl, to look
# at it) and protobuf-compiler (protoc: the etcd client crate generates its gRPC code with it).
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v unshare >/dev/null || missing+=(util-linux)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v python3 >/dev/null || missing+=(python3)
command -v cc >/dev/null || missing+=(build-essential)
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null || missing+=(libclang-dev)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
command -v etcd >/dev/null || missing+=(etcd-server)
command -v etcdctl >/dev/null || missing+=(etcd-client)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
# mkfs.ext4 and e2fsck: the Linux ext4 disk test makes its image and checks it with them.
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
[ -x "$HOME/.cargo/bin/cargo" ] || command -v cargo >/dev/null || missing+=(curl ca-certificates)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Rust: Debian's own is too old for this workspace (edition 2024), so rustup's stable.
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! command -v cargo >/dev/null; then
    log "installing Rust (rustup, stable)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy >/dev/null
    . "$HOME/.cargo/env"
fi

log "Linux guest kernel"
"$here/build_kernel.sh"
log "Linux guest initramfs"
"$here/build_initramfs.sh" >/dev/null
log "nested host (resources/l1.sh: QEMU, Linux 6.1, busybox; Linux tests run in it where KVM emulates kernel code)"
"$here/l1.sh" --prepare
log "workspace (release${targets:+, with the tests})"
(cd "$root" && cargo build --release --workspace "${targets[@]}")
log "done: target/x86_64-unknown-linux-gnu/release/vmm, target/x86_64-unknown-linux-gnu/release/vmm-guest, resources/build/{vmlinux,initramfs.cpio}"
