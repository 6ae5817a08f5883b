#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Builds the Linux guest's initramfs: the static `init` of guest/init plus the few nodes the
# kernel needs before init mounts devtmpfs. Writes resources/build/initramfs.cpio (git-ignored)
# and prints its path.
#
# Usage: resources/build_initramfs.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out_dir="$here/build"
out="$out_dir/initramfs.cpio"
target=x86_64-unknown-linux-gnu

log() { printf 'build_initramfs: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v python3 >/dev/null || die "python3 is needed to write the archive"

# crt-static links glibc in, so init runs with no libraries in the initramfs. The explicit
# --target matters: with it, RUSTFLAGS applies only to that target and not to build scripts
# and proc-macros, which are host programs and would fail to build (or load) statically.
# Stripped: the release profile's line tables would quadruple the size, and every byte of the
# archive is unpacked by guest kernel code, which is slow where KVM is nested.
log "building init"
(cd "$root" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
    cargo build --release --target "$target" -p guest-init)
target_dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
init="$target_dir/$target/release/init"
[ -x "$init" ] || die "no $init after the build"

# Static means no program interpreter (PT_INTERP): the kernel then runs init as it is. A
# static-pie still has a PT_DYNAMIC, which it relocates itself, so that one is fine.
python3 - "$init" <<'EOF' || die "$init is not statically linked (it has a PT_INTERP)"
import struct, sys
with open(sys.argv[1], "rb") as f:
    elf = f.read()
assert elf[:4] == b"\x7fELF" and elf[4] == 2, "not a 64-bit ELF"
phoff, = struct.unpack_from("<Q", elf, 32)
phentsize, phnum = struct.unpack_from("<HH", elf, 54)
PT_INTERP = 3
types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
sys.exit(1 if PT_INTERP in types else 0)
EOF

# A newc archive written here rather than by cpio(1): it holds /dev/console, a device node,
# which only root could create on disk for cpio to pick up. The kernel opens /dev/console as
# init's stdin/stdout/stderr before init can mount devtmpfs, so without it the guest's console
# output would be lost.
mkdir -p "$out_dir"
python3 - "$init" "$out.tmp" <<'EOF'
import sys

init_path, out_path = sys.argv[1], sys.argv[2]
with open(init_path, "rb") as f:
    init = f.read()

S_IFMT, S_IFDIR, S_IFREG, S_IFCHR = 0o170000, 0o040000, 0o100000, 0o020000
# (name, mode, (rdev major, minor), data); uid, gid and mtime are 0 so the archive is
# reproducible.
entries = [
    ("dev", S_IFDIR | 0o755, (0, 0), b""),
    ("dev/console", S_IFCHR | 0o600, (5, 1), b""),
    ("proc", S_IFDIR | 0o555, (0, 0), b""),
    ("sys", S_IFDIR | 0o555, (0, 0), b""),
    ("tmp", S_IFDIR | 0o1777, (0, 0), b""),
    ("init", S_IFREG | 0o755, (0, 0), init),
    ("TRAILER!!!", 0, (0, 0), b""),
]

def pad4(n):
    return b"\0" * (-n % 4)

out = bytearray()
for ino, (name, mode, (major, minor), data) in enumerate(entries, start=1):
    name_z = name.encode() + b"\0"
    nlink = 2 if mode & S_IFMT == S_IFDIR else 1
    fields = [
        0 if name == "TRAILER!!!" else ino,  # c_ino
        mode,  # c_mode
        0, 0,  # c_uid, c_gid
        nlink,  # c_nlink
        0,  # c_mtime
        len(data),  # c_filesize
        0, 0,  # c_devmajor, c_devminor (of the file system holding it)
        major, minor,  # c_rdevmajor, c_rdevminor
        len(name_z),  # c_namesize
        0,  # c_check (unused by newc)
    ]
    header = b"070701" + b"".join(b"%08x" % v for v in fields)
    assert len(header) == 110
    out += header + name_z
    out += pad4(len(header) + len(name_z))
    out += data + pad4(len(data))

with open(out_path, "wb") as f:
    f.write(out)
EOF
mv "$out.tmp" "$out"
log "init is $(stat -c %s "$init") bytes"
echo "$out"
