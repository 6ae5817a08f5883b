#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Runs COMMAND inside the *nested host*: a Linux VM under QEMU's software emulator (TCG) whose
# CPU model includes AMD SVM, so that it has a KVM of its own (kvm_amd with nested paging) with
# ordinary semantics. On machines whose /dev/kvm emulates guest kernel code (kvm_pvm), that is
# where Linux guests run at a usable speed.
#
# The nested host runs Debian's Linux 6.1 (package linux-image-amd64) from an initramfs built
# here from that kernel's modules and busybox-static, cached in $VMM_CACHE_DIR/l1-<key>
# (default ~/.cache/vmm), keyed by its inputs. It mounts this machine's root file system
# read-only over 9p, puts tmpfs on /tmp, /var/tmp and /run, and runs COMMAND chrooted there in
# the current directory, with this environment (plus VMM_L1=1). COMMAND's output (stdout and
# stderr together) streams to stdout; l1.sh exits with COMMAND's status.
#
# Usage: resources/l1.sh [--smp N] [--mem MIB] [--rw DIR]... [--timeout S] [--boot-timeout S]
#                        [--freeze-timeout S] -- COMMAND [ARG...]
#        resources/l1.sh --prepare
#   --smp N           vCPUs of the nested host (default 2)
#   --mem MIB         its memory (default 4096)
#   --rw DIR          also share DIR writable (created if missing), at the same path inside
#   --timeout S       kill the nested host after S seconds in all (default 3600): status 124
#   --boot-timeout S  fail if its KVM is not ready after S seconds (default 300)
#   --freeze-timeout S  stop it when its heartbeat (every 10 s) is silent for S seconds
#                     (default 120): status 123
#   --prepare         only install what is missing and build the initramfs (setup.sh does this)
#
# Status: COMMAND's, or 124 on a timeout, or 125 when the nested host cannot be built, does not
# come up or ends without COMMAND's status, or 123 when it ended because its own kernel crashed
# (a panic or BUG on its console: under QEMU's emulated SVM this happens, rarely, in the nested
# host's KVM; callers may run COMMAND once more) or froze (its heartbeat went silent: seen once,
# a whole nested host silent for 14 minutes in the middle of a test, QEMU at 100 %). QEMU never outlives this script: it is killed on
# exit, on INT, TERM and HUP, and (through its parent-death signal) if this script is killed.
set -euo pipefail
# All of the script is one block, read before any of it runs: a checkout or an edit while it runs
# (tests can run for long) cannot change what it does halfway.
{

here=$(cd "$(dirname "$0")" && pwd)
log() { printf 'l1: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 125; }
usage() { sed -n '/^# Usage:/,/^# Status:/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 125; }

smp=2 mem=4096 timeout=3600 boot_timeout=300 freeze_timeout=120 prepare=
rw=()
while [ $# -gt 0 ]; do
    case "$1" in
        --smp) smp=${2:?--smp needs a value}; shift 2 ;;
        --mem) mem=${2:?--mem needs a value}; shift 2 ;;
        --rw) rw+=("$(realpath -m "${2:?--rw needs a directory}")"); shift 2 ;;
        --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
        --boot-timeout) boot_timeout=${2:?--boot-timeout needs a value}; shift 2 ;;
        --freeze-timeout) freeze_timeout=${2:?--freeze-timeout needs a value}; shift 2 ;;
        --prepare) prepare=1; shift ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) log "unknown argument $1"; usage ;;
    esac
done
[ $# -gt 0 ] || [ -n "$prepare" ] || { log "no COMMAND given"; usage; }
for n in "$smp" "$mem" "$timeout" "$boot_timeout"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "not a positive number: $n"
done

# --- What the nested host is made of; installed with apt-get where missing. ---
# Its kernel stays at 6.1: newer kvm_amd versions want NRIPS, which TCG does not emulate.
kernel_version() {
    local v
    for v in $(ls -1 /lib/modules 2>/dev/null | grep -E '^6\.1\.[0-9]+-[0-9]+-amd64$' | sort -V -r); do
        if [ -r "/boot/vmlinuz-$v" ] && [ -f "/lib/modules/$v/modules.dep" ]; then
            echo "$v"
            return
        fi
    done
}
is_static() { [ -x "$1" ] && ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter'; }
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
[ -n "$(kernel_version)" ] || missing+=(linux-image-amd64)
is_static /bin/busybox || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
command -v readelf >/dev/null || missing+=(binutils)
command -v modprobe >/dev/null || missing+=(kmod)
command -v setpriv >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "need root to install ${missing[*]} (or install them yourself)"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "cannot install ${missing[*]}"
fi
kver=$(kernel_version)
[ -n "$kver" ] || die "no Linux 6.1 kernel with its modules in /boot and /lib/modules after installing linux-image-amd64"
is_static /bin/busybox || die "/bin/busybox is not a static binary (install busybox-static)"
vmlinuz=/boot/vmlinuz-$kver

# Modules in load order: KVM for AMD, what the test bed uses (TAP, veth, bridges) and 9p over
# virtio-pci for the file systems.
wanted=(kvm-amd tun veth bridge 9p 9pnet_virtio virtio_pci)
modules=$(for m in "${wanted[@]}"; do modprobe -S "$kver" --show-depends "$m" || exit 1; done |
    awk '$1 == "insmod" && !seen[$2]++ { print $2 }') || die "cannot resolve the modules of $kver"

# --- The nested host's init (busybox sh). ---
init_script=$(cat <<'EOF'
#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /host /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
stty -onlcr 2>/dev/null
fail() { echo "l1: error inside the nested host: $*"; poweroff -f; sleep 60; }
for m in $(cat /modules.order); do
    insmod "/modules/$(basename "$m")" || fail "insmod $m"
done
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm-amd (does the CPU model have SVM?)"
ip link set lo up
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
opts=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$opts,ro" host0 /host || fail "cannot mount the host's root over 9p"
for d in proc sys dev; do mount --rbind "/$d" "/host/$d" || fail "bind /$d"; done
for d in tmp var/tmp run; do mount -t tmpfs tmpfs "/host/$d" || fail "tmpfs on /$d"; done
chmod 1777 /host/tmp /host/var/tmp
mkdir -p /host/run/l1
mount -t 9p -o "$opts" job0 /host/run/l1 || fail "cannot mount the job directory"
n=0
while read -r dir; do
    mkdir -p "/host$dir" 2>/dev/null
    mount -t 9p -o "$opts" "rw$n" "/host$dir" || fail "cannot mount $dir writable"
    n=$((n + 1))
done < /host/run/l1/rw
echo ready > /host/run/l1/ready
# A heartbeat for l1.sh: a nested host whose kernel froze stops it.
( while :; do echo > /host/run/l1/alive; sleep 10; done ) &
chroot /host /bin/bash /run/l1/job.sh </dev/null
echo $? > /host/run/l1/status.tmp
mv /host/run/l1/status.tmp /host/run/l1/status
# l1.sh stops QEMU once it sees the status (a poweroff would print the kernel's last words).
sleep 60
poweroff -f
EOF
)

# --- The initramfs, built once per key. ---
cache_root="${VMM_CACHE_DIR:-$HOME/.cache/vmm}"
key=$( { echo "$kver"; sha256sum "$vmlinuz" /bin/busybox; echo "$modules"; echo "$init_script"; } |
    sha256sum | cut -c1-16)
cache="$cache_root/l1-$key"
if [ ! -f "$cache/initramfs.cpio.gz" ]; then
    log "building the nested host's initramfs (Linux $kver, key $key)"
    mkdir -p "$cache_root"
    tmp=$(mktemp -d "$cache_root/l1-$key.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/root/bin" "$tmp/root/modules"
    cp /bin/busybox "$tmp/root/bin/busybox"
    printf '%s\n' "$init_script" > "$tmp/root/init"
    chmod 755 "$tmp/root/init"
    for m in $modules; do
        case "$m" in
            *.ko) cp "$m" "$tmp/root/modules/" ;;
            *.ko.xz) xz -dc "$m" > "$tmp/root/modules/$(basename "$m" .xz)" ;;
            *.ko.zst) zstd -qdc "$m" > "$tmp/root/modules/$(basename "$m" .zst)" ;;
            *) die "unexpected module file $m" ;;
        esac
        basename "${m%.xz}" | sed 's/\.zst$//' >> "$tmp/root/modules.order"
    done
    (cd "$tmp/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible | gzip -1 > "$tmp/initramfs.cpio.gz") ||
        die "cannot pack the initramfs"
    mkdir -p "$cache"
    mv "$tmp/initramfs.cpio.gz" "$cache/initramfs.cpio.gz"
    rm -rf "$tmp"
    trap - EXIT
fi

if [ -n "$prepare" ]; then
    log "ready: Linux $kver, $cache/initramfs.cpio.gz"
    exit 0
fi

# --- The job: what the init runs in the chroot, with this environment and directory. ---
job=$(mktemp -d "${TMPDIR:-/tmp}/vmm-l1-job.XXXXXX")
qpid=
watchdogs=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM HUP
    if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
        kill -TERM "$qpid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$qpid" 2>/dev/null || true
        wait "$qpid" 2>/dev/null || true
    fi
    for w in "${watchdogs[@]}"; do kill "$w" 2>/dev/null || true; done
    rm -rf "$job"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

{
    echo '# Generated by resources/l1.sh'
    export -p | grep -v -E '^declare -x (OLDPWD|PWD|SHLVL|_)(=|$)'
    echo 'export VMM_L1=1'
    printf 'cd %q || exit 125\n' "$PWD"
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
} > "$job/job.sh"
: > "$job/rw"
share_args=()
for i in "${!rw[@]}"; do
    mkdir -p "${rw[$i]}"
    echo "${rw[$i]}" >> "$job/rw"
    share_args+=(-virtfs "local,path=${rw[$i]},mount_tag=rw$i,security_model=none")
done

# --- Boot. Serial console on stdout; QEMU's own messages on stderr. ---
log "booting the nested host (Linux $kver, $smp vCPUs, $mem MiB, TCG with SVM)"
setpriv --pdeathsig KILL -- qemu-system-x86_64 \
    -accel tcg -cpu max -M pc -smp "$smp" -m "$mem" \
    -nodefaults -no-user-config -display none -no-reboot \
    -chardev "stdio,id=console,signal=off,logfile=$job/console.log" -serial chardev:console \
    -kernel "$vmlinuz" -initrd "$cache/initramfs.cpio.gz" \
    -append "console=ttyS0 rdinit=/init panic=-1 softlockup_panic=1 mitigations=off quiet loglevel=3" \
    -virtfs local,path=/,mount_tag=host0,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$job,mount_tag=job0,security_model=none" \
    "${share_args[@]}" </dev/null &
qpid=$!
started=$SECONDS

# Watchdog: the nested host must be ready within the boot timeout and done within the timeout.
# It also stops QEMU once COMMAND's status is there. One loop of short sleeps, so that nothing
# of it lingers once it is killed.
(
    start=$SECONDS
    checked=$SECONDS
    while kill -0 "$qpid" 2>/dev/null; do
        sleep 0.2
        t=$((SECONDS - start))
        silent=0
        if [ -e "$job/alive" ] && [ $((SECONDS - checked)) -ge 5 ]; then
            checked=$SECONDS
            silent=$(( $(date +%s) - $(stat -c %Y "$job/alive" 2>/dev/null || date +%s) ))
        fi
        if [ -e "$job/status" ]; then
            kill -KILL "$qpid" 2>/dev/null
            break
        elif [ "$silent" -ge "$freeze_timeout" ]; then
            echo frozen > "$job/timeout"
        elif [ ! -e "$job/ready" ] && [ "$t" -ge "$boot_timeout" ]; then
            echo boot > "$job/timeout"
        elif [ "$t" -ge "$timeout" ]; then
            echo run > "$job/timeout"
        else
            continue
        fi
        kill -TERM "$qpid" 2>/dev/null
        break
    done
) &
watchdogs+=($!)

qemu_status=0
# (stderr: bash would report the KILL that ends QEMU once the status is there.)
{ wait "$qpid" || qemu_status=$?; } 2>/dev/null
qpid=
elapsed=$((SECONDS - started))
if [ -f "$job/timeout" ]; then
    if [ "$(cat "$job/timeout")" = frozen ]; then
        log "error: the nested host froze: no heartbeat from it for $freeze_timeout s after $elapsed s (its console above)"
        exit 123
    fi
    if [ "$(cat "$job/timeout")" = boot ]; then
        log "error: the nested host was not ready within $boot_timeout s (its kernel or KVM did not come up)"
        exit 125
    fi
    log "error: timeout: COMMAND did not end within $timeout s; the nested host was stopped"
    exit 124
fi
if [ ! -f "$job/status" ]; then
    if grep -q -E 'Kernel panic|BUG: |general protection fault|stack guard page' "$job/console.log" 2>/dev/null; then
        log "error: the nested host's kernel crashed after $elapsed s (its console above says how)"
        exit 123
    fi
    if [ -e "$job/ready" ]; then
        log "error: the nested host stopped after $elapsed s without COMMAND's status (QEMU status $qemu_status)"
    else
        log "error: the nested host stopped after $elapsed s before its KVM was ready (QEMU status $qemu_status)"
    fi
    exit 125
fi
status=$(cat "$job/status")
log "COMMAND exited with status $status after $elapsed s in the nested host"
exit "$status"
}
