// SPDX-License-Identifier: Apache-2.0
//! What each kind of thread may ask of the kernel, as tables.
//!
//! A thread kind's [`Profile`] lists its system calls (any arguments), its ioctls (by request
//! number, in named groups) and the socket families it may create. [`COMMON`] holds what every
//! thread needs (memory, futexes, signals, its own end). A filter is inherited by the threads a
//! thread starts, and stacked filters allow only what all of them allow, so a kind's filter also
//! allows what the kinds it starts need before they install their own: [`ThreadKind::children`]
//! says which, and `super::rule_map` takes the union.
//!
//! To extend: add the system call or ioctl to the profile of the thread that makes it (run with
//! `--seccomp log` and read the kernel log's `type=1326` lines to find what a filter misses:
//! each names the thread, `comm=`, and the call, `syscall=`).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_ioeventfd, kvm_irq_level, kvm_irqchip,
    kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs, kvm_pit_config, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_translation, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

use super::ThreadKind;

/// What one kind of thread may do besides [`COMMON`].
pub struct Profile {
    /// System calls allowed with any arguments.
    pub syscalls: &'static [i64],
    /// ioctl request numbers allowed, in groups by the device they go to.
    pub ioctls: &'static [&'static [u64]],
    /// Address families `socket` may create.
    pub socket_domains: &'static [i32],
}

// ioctl request numbers (include/uapi/asm-generic/ioctl.h): direction, size, type, number.
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const KVMIO: u64 = 0xae;
const fn kvm_io(nr: u64) -> u64 {
    ioc(0, KVMIO, nr, 0)
}
const fn kvm_iow<T>(nr: u64) -> u64 {
    ioc(1, KVMIO, nr, std::mem::size_of::<T>())
}
const fn kvm_ior<T>(nr: u64) -> u64 {
    ioc(2, KVMIO, nr, std::mem::size_of::<T>())
}
const fn kvm_iowr<T>(nr: u64) -> u64 {
    ioc(3, KVMIO, nr, std::mem::size_of::<T>())
}

// /dev/kvm (include/uapi/linux/kvm.h).
const KVM_GET_API_VERSION: u64 = kvm_io(0x00);
const KVM_CREATE_VM: u64 = kvm_io(0x01);
const KVM_GET_MSR_INDEX_LIST: u64 = kvm_iowr::<kvm_msr_list>(0x02);
const KVM_CHECK_EXTENSION: u64 = kvm_io(0x03);
const KVM_GET_VCPU_MMAP_SIZE: u64 = kvm_io(0x04);
const KVM_GET_SUPPORTED_CPUID: u64 = kvm_iowr::<kvm_cpuid2>(0x05);
const KVM_GET_MSR_FEATURE_INDEX_LIST: u64 = kvm_iowr::<kvm_msr_list>(0x0a);
// VM.
const KVM_CREATE_VCPU: u64 = kvm_io(0x41);
const KVM_GET_DIRTY_LOG: u64 = kvm_iow::<kvm_dirty_log>(0x42);
const KVM_SET_USER_MEMORY_REGION: u64 = kvm_iow::<kvm_userspace_memory_region>(0x46);
const KVM_SET_TSS_ADDR: u64 = kvm_io(0x47);
const KVM_CREATE_IRQCHIP: u64 = kvm_io(0x60);
const KVM_IRQ_LINE: u64 = kvm_iow::<kvm_irq_level>(0x61);
const KVM_GET_IRQCHIP: u64 = kvm_iowr::<kvm_irqchip>(0x62);
const KVM_SET_IRQCHIP: u64 = kvm_ior::<kvm_irqchip>(0x63);
const KVM_IRQFD: u64 = kvm_iow::<kvm_irqfd>(0x76);
const KVM_CREATE_PIT2: u64 = kvm_iow::<kvm_pit_config>(0x77);
const KVM_IOEVENTFD: u64 = kvm_iow::<kvm_ioeventfd>(0x79);
const KVM_SET_CLOCK: u64 = kvm_iow::<kvm_clock_data>(0x7b);
const KVM_GET_CLOCK: u64 = kvm_ior::<kvm_clock_data>(0x7c);
const KVM_GET_PIT2: u64 = kvm_ior::<kvm_pit_state2>(0x9f);
const KVM_SET_PIT2: u64 = kvm_iow::<kvm_pit_state2>(0xa0);
// vCPU.
const KVM_RUN: u64 = kvm_io(0x80);
const KVM_GET_REGS: u64 = kvm_ior::<kvm_regs>(0x81);
const KVM_SET_REGS: u64 = kvm_iow::<kvm_regs>(0x82);
const KVM_GET_SREGS: u64 = kvm_ior::<kvm_sregs>(0x83);
const KVM_SET_SREGS: u64 = kvm_iow::<kvm_sregs>(0x84);
const KVM_TRANSLATE: u64 = kvm_iowr::<kvm_translation>(0x85);
const KVM_GET_MSRS: u64 = kvm_iowr::<kvm_msrs>(0x88);
const KVM_SET_MSRS: u64 = kvm_iow::<kvm_msrs>(0x89);
const KVM_SET_FPU: u64 = kvm_iow::<kvm_fpu>(0x8d);
const KVM_GET_LAPIC: u64 = kvm_ior::<kvm_lapic_state>(0x8e);
const KVM_SET_LAPIC: u64 = kvm_iow::<kvm_lapic_state>(0x8f);
const KVM_SET_CPUID2: u64 = kvm_iow::<kvm_cpuid2>(0x90);
const KVM_GET_CPUID2: u64 = kvm_iowr::<kvm_cpuid2>(0x91);
const KVM_GET_MP_STATE: u64 = kvm_ior::<kvm_mp_state>(0x98);
const KVM_SET_MP_STATE: u64 = kvm_iow::<kvm_mp_state>(0x99);
const KVM_GET_VCPU_EVENTS: u64 = kvm_ior::<kvm_vcpu_events>(0x9f);
const KVM_SET_VCPU_EVENTS: u64 = kvm_iow::<kvm_vcpu_events>(0xa0);
const KVM_GET_DEBUGREGS: u64 = kvm_ior::<kvm_debugregs>(0xa1);
const KVM_SET_DEBUGREGS: u64 = kvm_iow::<kvm_debugregs>(0xa2);
const KVM_SET_TSC_KHZ: u64 = kvm_io(0xa2);
const KVM_GET_TSC_KHZ: u64 = kvm_io(0xa3);
const KVM_GET_XSAVE: u64 = kvm_ior::<kvm_xsave>(0xa4);
const KVM_SET_XSAVE: u64 = kvm_iow::<kvm_xsave>(0xa5);
const KVM_GET_XCRS: u64 = kvm_ior::<kvm_xcrs>(0xa6);
const KVM_SET_XCRS: u64 = kvm_iow::<kvm_xcrs>(0xa7);
const KVM_KVMCLOCK_CTRL: u64 = kvm_io(0xad);

// TAP (include/uapi/linux/if_tun.h): what a running NIC changes on its TAP.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
// Terminals (include/uapi/asm-generic/ioctls.h): isatty() on the console, FIONBIO from std.
const TCGETS: u64 = 0x5401;
const FIONBIO: u64 = 0x5421;

/// Asking /dev/kvm about the host, and making VMs.
const KVM_SYSTEM: &[u64] = &[
    KVM_GET_API_VERSION,
    KVM_CREATE_VM,
    KVM_GET_MSR_INDEX_LIST,
    KVM_CHECK_EXTENSION,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_MSR_FEATURE_INDEX_LIST,
];
/// Building a VM: its interrupt controllers, PIT, devices' wiring and vCPUs.
const KVM_VM_BUILD: &[u64] =
    &[KVM_CREATE_VCPU, KVM_SET_TSS_ADDR, KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2, KVM_IRQFD, KVM_IOEVENTFD, KVM_IRQ_LINE];
/// Guest memory slots (dirty logging is switched by re-registering them).
const KVM_MEMSLOTS: &[u64] = &[KVM_SET_USER_MEMORY_REGION];
/// A VM's own state, saved and restored by migrations.
const KVM_VM_STATE: &[u64] =
    &[KVM_GET_DIRTY_LOG, KVM_GET_IRQCHIP, KVM_SET_IRQCHIP, KVM_GET_CLOCK, KVM_SET_CLOCK, KVM_GET_PIT2, KVM_SET_PIT2];
/// Running a vCPU. KVM_TRANSLATE serves the report of an internal error (the bytes of the
/// instruction KVM could not emulate), which must not itself be stopped by the filter.
const KVM_VCPU_RUN: &[u64] = &[KVM_RUN, KVM_KVMCLOCK_CTRL, KVM_TRANSLATE];
/// A vCPU's state: set up for boot, saved on its own thread for a migration, restored on the
/// destination before it runs.
const KVM_VCPU_STATE: &[u64] = &[
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_GET_MSRS,
    KVM_SET_MSRS,
    KVM_SET_FPU,
    KVM_GET_LAPIC,
    KVM_SET_LAPIC,
    KVM_SET_CPUID2,
    KVM_GET_CPUID2,
    KVM_GET_MP_STATE,
    KVM_SET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_SET_DEBUGREGS,
    KVM_SET_TSC_KHZ,
    KVM_GET_TSC_KHZ,
    KVM_GET_XSAVE,
    KVM_SET_XSAVE,
    KVM_GET_XCRS,
    KVM_SET_XCRS,
];
// userfaultfd (include/uapi/linux/userfaultfd.h, type 0xaa).
const UFFDIO: u64 = 0xaa;
const UFFDIO_REGISTER: u64 = ioc(3, UFFDIO, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(2, UFFDIO, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(2, UFFDIO, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(3, UFFDIO, 0x03, 40);
const UFFDIO_ZEROPAGE: u64 = ioc(3, UFFDIO, 0x04, 32);
/// Giving guest memory to a userfaultfd (the VMM thread, once the memory exists).
const UFFD_REGISTER: &[u64] = &[UFFDIO_REGISTER];
/// Filling registered memory, waking its waiters, and letting it go when it is all there.
const UFFD_FILL: &[u64] = &[UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE, UFFDIO_UNREGISTER];

const TAP: &[u64] = &[TUNSETOFFLOAD, TUNSETVNETHDRSZ];
const TERMINAL: &[u64] = &[TCGETS, FIONBIO];

/// Every thread: memory (never executable: `mmap` and `mprotect` get their own rule in
/// `super::rule_map`), futexes, signals (the vCPU kick, the seccomp report), time, its own end.
pub const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    // std asks how many CPUs it may use (channels, threads).
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    // Logs go to stderr.
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Opening files: nothing is opened once a thread's filter is on, yet libc sometimes tries on its
/// own (glibc reads /sys/devices/system/cpu/online when a new thread first allocates). These
/// calls fail with EACCES instead of stopping the process: a second filter in front of each
/// thread's answers them (see [`super::apply`]).
pub const REFUSED: &[i64] = &[libc::SYS_open, libc::SYS_openat, libc::SYS_openat2, libc::SYS_creat];

/// Starting threads (what the parent does and what the child does before its first act).
const THREADS: &[i64] = &[libc::SYS_clone, libc::SYS_clone3, libc::SYS_set_robust_list, libc::SYS_rseq];

/// The VMM thread: builds the VM (or receives one), then serves devices, console input and API
/// requests on its event loop; it starts the vCPUs, the disks' I/O threads and migrations.
const VMM: Profile = Profile {
    syscalls: &[
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_pread64,
        libc::SYS_preadv,
        libc::SYS_pwrite64,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fcntl,
        libc::SYS_dup,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        libc::SYS_flock,
        // A failed incoming migration removes the disk files it created; the API socket goes
        // at exit.
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_mincore,
        // The destination of a migration: its one connection.
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_sched_getaffinity,
    ],
    ioctls: &[KVM_SYSTEM, KVM_VM_BUILD, KVM_MEMSLOTS, KVM_VM_STATE, KVM_VCPU_STATE, TAP, TERMINAL, UFFD_REGISTER],
    socket_domains: &[],
};

/// A vCPU: runs guest code and emulates the devices it touches (console output to stdout, a
/// NIC's activation setting its TAP's offloads, MMIO register writes); saves its own state.
const VCPU: Profile = Profile {
    syscalls: &[libc::SYS_read, libc::SYS_fcntl],
    ioctls: &[KVM_VCPU_RUN, KVM_VCPU_STATE, TAP],
    socket_domains: &[],
};

/// A disk's I/O thread (block/src/worker.rs lists its calls).
const BLOCK_IO: Profile = Profile {
    syscalls: &[
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_read,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_lseek,
        libc::SYS_fstat,
    ],
    ioctls: &[],
    socket_domains: &[],
};

/// A migration's source side: connects, copies memory (dirty logs, residency) and disks,
/// pauses and saves the machine. It starts the auto-converge ticker.
const MIGRATION: Profile = Profile {
    syscalls: &[
        libc::SYS_connect,
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_fcntl,
        libc::SYS_mincore,
        libc::SYS_pread64,
        libc::SYS_preadv,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_fdatasync,
    ],
    ioctls: &[KVM_VM_STATE, KVM_MEMSLOTS, TAP, TERMINAL],
    socket_domains: &[libc::AF_INET, libc::AF_INET6],
};

/// The auto-converge ticker of a migration: sleeps and kicks vCPUs.
const MIGRATION_TICKER: Profile = Profile { syscalls: &[], ioctls: &[], socket_domains: &[] };

/// The API server's accept thread; it starts a thread per connection.
const API: Profile = Profile {
    syscalls: &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait, libc::SYS_accept4, libc::SYS_read, libc::SYS_fcntl],
    ioctls: &[TERMINAL],
    socket_domains: &[],
};

/// One API connection: reads a request, hands it to the VMM thread, writes the answer.
const API_CONNECTION: Profile = Profile {
    syscalls: &[
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_poll,
        libc::SYS_fcntl,
    ],
    ioctls: &[TERMINAL],
    socket_domains: &[],
};

/// The loader of a restored snapshot's memory (`crate::uffd`): reads fault events, reads the
/// snapshot's memory file, places pages.
const MEM_LOADER: Profile = Profile {
    syscalls: &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll, libc::SYS_pread64],
    ioctls: &[UFFD_FILL],
    socket_domains: &[],
};

/// The snapshot writer (`crate::snapshot::save`): pauses the vCPUs and devices, saves their
/// state (a NIC's TAP is drained), reads guest memory's residency and the disks, and creates the
/// snapshot's directory and files. It is started before the VMM is sandboxed and is the one
/// thread whose opens are not refused. In a VMM waiting for a snapshot (`vmm run
/// --await-restore`) it also reads and checks the snapshot to run, copies its copied disks into
/// place and opens the disks (`flock`: each image is locked against a second user).
const SNAPSHOT: Profile = Profile {
    syscalls: &[
        libc::SYS_openat,
        libc::SYS_flock,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_getdents64,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rmdir,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_ftruncate,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        libc::SYS_fcntl,
        libc::SYS_mincore,
    ],
    ioctls: &[KVM_VM_STATE, TAP, TERMINAL],
    socket_domains: &[],
};

/// Post-copy's source, answering faults: reads requests and writes pages on its connection.
const POSTCOPY_SERVER: Profile = Profile {
    syscalls: &[
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_poll,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_fcntl,
    ],
    ioctls: &[],
    socket_domains: &[],
};

/// Post-copy's destination page handler: fault events, the fault connection (requests out,
/// pages in), taking a new pair of connections after a break (accept on the kept listener, and a
/// thread per connection for its TLS handshake, which run under this filter), restarting the
/// receiver, and pausing and resuming the vCPUs meanwhile.
const POSTCOPY_FAULTS: Profile = Profile {
    syscalls: &[
        libc::SYS_read,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_accept4,
        libc::SYS_shutdown,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_fcntl,
    ],
    ioctls: &[UFFD_FILL, TERMINAL],
    socket_domains: &[],
};

/// Post-copy's destination receiver: reads pushed pages and places them.
const POSTCOPY_RECEIVER: Profile = Profile {
    syscalls: &[
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_poll,
        libc::SYS_setsockopt,
        libc::SYS_shutdown,
        libc::SYS_fcntl,
    ],
    ioctls: &[UFFD_FILL],
    socket_domains: &[],
};

impl ThreadKind {
    /// Whether this kind creates files, and so has no filter refusing opens in front of its own.
    pub fn creates_files(self) -> bool {
        self == ThreadKind::Snapshot
    }

    /// The rules of this kind alone.
    pub fn profile(self) -> &'static Profile {
        match self {
            ThreadKind::Vmm => &VMM,
            ThreadKind::Vcpu => &VCPU,
            ThreadKind::BlockIo => &BLOCK_IO,
            ThreadKind::Migration => &MIGRATION,
            ThreadKind::MigrationTicker => &MIGRATION_TICKER,
            ThreadKind::Api => &API,
            ThreadKind::ApiConnection => &API_CONNECTION,
            ThreadKind::MemLoader => &MEM_LOADER,
            ThreadKind::Snapshot => &SNAPSHOT,
            ThreadKind::PostcopyServer => &POSTCOPY_SERVER,
            ThreadKind::PostcopyFaults => &POSTCOPY_FAULTS,
            ThreadKind::PostcopyReceiver => &POSTCOPY_RECEIVER,
        }
    }

    /// The kinds of thread this kind starts after its filter is on: they inherit it until they
    /// install theirs.
    pub fn children(self) -> &'static [ThreadKind] {
        match self {
            ThreadKind::Vmm => &[
                ThreadKind::Vcpu,
                ThreadKind::BlockIo,
                ThreadKind::Migration,
                ThreadKind::MemLoader,
                ThreadKind::PostcopyFaults,
                ThreadKind::PostcopyReceiver,
            ],
            ThreadKind::Migration => &[ThreadKind::MigrationTicker, ThreadKind::PostcopyServer],
            // Its accept and handshake threads keep its filter.
            ThreadKind::PostcopyFaults => &[ThreadKind::PostcopyFaults, ThreadKind::PostcopyReceiver],
            ThreadKind::Api => &[ThreadKind::ApiConnection],
            _ => &[],
        }
    }

    /// Whether this kind starts threads.
    pub fn starts_threads(self) -> bool {
        !self.children().is_empty()
    }
}

/// System calls a kind that starts threads needs for that.
pub fn thread_start() -> &'static [i64] {
    THREADS
}
