#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Builds the Linux guest kernel (vmlinux + bzImage) from Debian's linux-source-6.12 package with
# resources/kernel/microvm.config applied on top of tinyconfig and resources/kernel/patches/*.patch.
#
# The build is cached outside the work tree, in $VMM_CACHE_DIR (default ~/.cache/vmm), keyed by a
# hash of everything that decides its output: the source package version, the config fragment,
# the patches and this script. A second run with the same key costs nothing. The result is
# exposed at resources/build/vmlinux and resources/build/bzImage (git-ignored symlinks).
#
# Usage: resources/build_kernel.sh [--print-path]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out_dir="$here/build"
cache_root="${VMM_CACHE_DIR:-$HOME/.cache/vmm}/kernel"
fragment="$here/kernel/microvm.config"
pkg=linux-source-6.12

log() { printf 'build_kernel: %s\n' "$*" >&2; }

need_packages=()
dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need_packages+=("$pkg")
for tool in make:make gcc:gcc flex:flex bison:bison bc:bc perl:perl xz:xz-utils patch:patch; do
    command -v "${tool%%:*}" >/dev/null || need_packages+=("${tool#*:}")
done
# Headers the host tools of the kernel build include.
[ -e /usr/include/libelf.h ] || need_packages+=(libelf-dev)
[ -e /usr/include/openssl/ssl.h ] || need_packages+=(libssl-dev)
if [ ${#need_packages[@]} -gt 0 ]; then
    log "installing ${need_packages[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        log "error: need root to install ${need_packages[*]} (or install them yourself)"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi

version=$(dpkg-query -W -f='${Version}' "$pkg")
tarball=/usr/src/$pkg.tar.xz
[ -f "$tarball" ] || { log "error: $tarball missing although $pkg is installed"; exit 1; }

key=$( { echo "$pkg $version"; cat "$fragment"; cat "$here"/kernel/patches/*.patch 2>/dev/null; cat "$0"; } \
    | sha256sum | cut -c1-16)
cache="$cache_root/$key"

if [ ! -f "$cache/vmlinux" ] || [ ! -f "$cache/bzImage" ]; then
    log "no cached kernel for key $key: building $pkg $version (about 9 minutes on 2 cores)"
    work="$cache_root/$key.work"
    rm -rf "$work"
    mkdir -p "$work"
    tar -xJf "$tarball" -C "$work"
    src="$work/$pkg"
    for p in "$here"/kernel/patches/*.patch; do
        [ -e "$p" ] || continue
        log "applying $(basename "$p")"
        patch -s -p1 -d "$src" < "$p"
    done
    make -s -C "$src" tinyconfig >/dev/null
    (cd "$src" && KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null)
    make -s -C "$src" olddefconfig >/dev/null

    # Every option the fragment asks for must be in the final config: Kconfig silently drops
    # options whose dependencies are unmet, and a guest without, say, virtio-mmio boots but is deaf.
    missing=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*)
                grep -qxF "$line" "$src/.config" || { log "config: wanted '$line', got '$(grep -E "^(# )?${line%%=*}[= ]" "$src/.config" || echo unset)'"; missing=1; } ;;
            "# CONFIG_"*" is not set")
                opt=${line#\# }; opt=${opt%% *}
                if grep -qE "^$opt=" "$src/.config"; then log "config: wanted $opt off, but it is on"; missing=1; fi ;;
        esac
    done < "$fragment"
    [ "$missing" -eq 0 ] || { log "error: the config fragment did not fully apply"; exit 1; }

    make -s -C "$src" -j"$(nproc)" vmlinux bzImage
    cp "$src/vmlinux" "$work/vmlinux.tmp"
    cp "$src/arch/x86/boot/bzImage" "$work/bzImage.tmp"
    cp "$src/.config" "$work/config.tmp"
    mkdir -p "$cache"
    mv "$work/config.tmp" "$cache/config"
    mv "$work/bzImage.tmp" "$cache/bzImage"
    mv "$work/vmlinux.tmp" "$cache/vmlinux"
    rm -rf "$work"
    log "built and cached in $cache"
else
    log "using cached kernel $cache"
fi

mkdir -p "$out_dir"
ln -sfn "$cache/vmlinux" "$out_dir/vmlinux"
ln -sfn "$cache/bzImage" "$out_dir/bzImage"
ln -sfn "$cache/config" "$out_dir/kernel.config"
if [ "${1:-}" = "--print-path" ]; then
    echo "$out_dir/vmlinux"
fi
