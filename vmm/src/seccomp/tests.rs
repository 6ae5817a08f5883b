// SPDX-License-Identifier: Apache-2.0
//! Each filter is tried in a child process of its own, so the test harness stays unfiltered:
//! the child installs the filter, makes one call, and exits 0 if it survived.

use super::*;

/// What ended a child.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exited(i32),
    Signal(i32),
}

/// Forks; the child installs the refusals and `program` (after `before`, if any) and runs
/// `call`, then exits 0 if it survived. Only async-signal-safe work happens in the child: the
/// programs are compiled before the fork.
fn in_child(program: &BpfProgram, before: impl Fn(), call: impl Fn()) -> End {
    let refuse = compile_refusals(SeccompMode::Enforce).unwrap();
    in_child_with(&refuse, program, before, call)
}

fn in_child_with(refuse: &BpfProgram, program: &BpfProgram, before: impl Fn(), call: impl Fn()) -> End {
    // SAFETY: the child only makes system calls and exits; it never returns into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        before();
        if install(ThreadKind::Vmm, refuse, program).is_err() {
            // SAFETY: ending the child without running the parent's destructors.
            unsafe { libc::_exit(100) };
        }
        call();
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    if libc::WIFSIGNALED(status) { End::Signal(libc::WTERMSIG(status)) } else { End::Exited(libc::WEXITSTATUS(status)) }
}

/// Opens "/"; exits 3 unless that failed with EACCES.
fn openat() {
    // SAFETY: a plain open of a path that exists.
    let rc = unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY) };
    if rc >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EACCES) {
        // SAFETY: ending the child.
        unsafe { libc::_exit(3) };
    }
}

/// A call no filter allows.
fn ptrace() {
    // SAFETY: PTRACE_TRACEME on the child itself; the filter stops it first.
    unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
}

fn ioctl(request: u64) {
    // SAFETY: an ioctl on an invalid descriptor: EBADF if the filter lets it through.
    unsafe { libc::syscall(libc::SYS_ioctl, -1, request, 0) };
}

#[test]
fn kinds_index_their_place_in_all() {
    for (i, kind) in ThreadKind::ALL.into_iter().enumerate() {
        assert_eq!(kind.index(), i, "{kind:?}");
    }
}

#[test]
fn every_filter_compiles() {
    for kind in ThreadKind::ALL {
        for mode in [SeccompMode::Enforce, SeccompMode::Log] {
            let p = compile(kind, mode).unwrap();
            assert!(!p.is_empty(), "{kind:?}");
        }
    }
}

#[test]
fn a_call_outside_each_filter_kills_with_sigsys() {
    for kind in ThreadKind::ALL {
        let program = compile(kind, SeccompMode::Enforce).unwrap();
        // Allowed by every filter: the child lives.
        let gettid = || {
            // SAFETY: gettid has no arguments.
            unsafe { libc::syscall(libc::SYS_gettid) };
        };
        assert_eq!(in_child(&program, || {}, gettid), End::Exited(0), "{kind:?}: gettid");
        assert_eq!(in_child(&program, || {}, ptrace), End::Signal(libc::SIGSYS), "{kind:?}: ptrace");
        // Opening files is done before any filter goes on; later attempts (libc's) fail.
        assert_eq!(in_child(&program, || {}, openat), End::Exited(0), "{kind:?}: openat");
        let execve = || {
            // SAFETY: would replace the child; the filter stops it first.
            unsafe { libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), 0, 0) };
        };
        assert_eq!(in_child(&program, || {}, execve), End::Signal(libc::SIGSYS), "{kind:?}: execve");
        let exec_memory = || {
            // SAFETY: an anonymous mapping the child never uses.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        };
        assert_eq!(in_child(&program, || {}, exec_memory), End::Signal(libc::SIGSYS), "{kind:?}: PROT_EXEC");
    }
}

#[test]
fn ioctls_are_allowed_by_request() {
    let vcpu = compile(ThreadKind::Vcpu, SeccompMode::Enforce).unwrap();
    let kvm_run = kvm_io(0x80);
    let kvm_create_vm = kvm_io(0x01);
    assert_eq!(in_child(&vcpu, || {}, || ioctl(kvm_run)), End::Exited(0));
    assert_eq!(in_child(&vcpu, || {}, || ioctl(kvm_create_vm)), End::Signal(libc::SIGSYS));
    // KVM_TRANSLATE, as the kernel numbers it (the request a nested host's SIGSYS line named):
    // the report of an internal error reads the instruction through it.
    assert_eq!(in_child(&vcpu, || {}, || ioctl(0xc018_ae85)), End::Exited(0));
    // The VMM thread builds VMs; the API thread touches no KVM at all.
    let vmm = compile(ThreadKind::Vmm, SeccompMode::Enforce).unwrap();
    assert_eq!(in_child(&vmm, || {}, || ioctl(kvm_create_vm)), End::Exited(0));
    let api = compile(ThreadKind::ApiConnection, SeccompMode::Enforce).unwrap();
    assert_eq!(in_child(&api, || {}, || ioctl(kvm_run)), End::Signal(libc::SIGSYS));
}

#[test]
fn sockets_are_allowed_by_family() {
    let socket = |domain: i32| {
        move || {
            // SAFETY: creating a socket the child never uses.
            unsafe { libc::socket(domain, libc::SOCK_STREAM, 0) };
        }
    };
    let migration = compile(ThreadKind::Migration, SeccompMode::Enforce).unwrap();
    assert_eq!(in_child(&migration, || {}, socket(libc::AF_INET)), End::Exited(0));
    assert_eq!(in_child(&migration, || {}, socket(libc::AF_UNIX)), End::Signal(libc::SIGSYS));
    let vcpu = compile(ThreadKind::Vcpu, SeccompMode::Enforce).unwrap();
    assert_eq!(in_child(&vcpu, || {}, socket(libc::AF_INET)), End::Signal(libc::SIGSYS));
}

#[test]
fn log_mode_lets_the_call_through() {
    let refuse = compile_refusals(SeccompMode::Log).unwrap();
    let opened = || {
        // SAFETY: a plain open of a path that exists.
        if unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY) } < 0 {
            // SAFETY: ending the child.
            unsafe { libc::_exit(3) };
        }
    };
    for kind in ThreadKind::ALL {
        let program = compile(kind, SeccompMode::Log).unwrap();
        assert_eq!(in_child_with(&refuse, &program, || {}, ptrace), End::Exited(0), "{kind:?}");
        assert_eq!(in_child_with(&refuse, &program, || {}, opened), End::Exited(0), "{kind:?}");
    }
}

#[test]
fn the_handler_names_the_call_and_the_thread() {
    let mut fds = [0; 2];
    // SAFETY: a pipe into a two-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let program = compile(ThreadKind::Vcpu, SeccompMode::Enforce).unwrap();
    let before = || {
        // SAFETY: in the child: stderr into the pipe, a thread name, the handler.
        unsafe {
            libc::dup2(fds[1], libc::STDERR_FILENO);
            libc::prctl(libc::PR_SET_NAME, c"vcpu7".as_ptr());
        }
        if install_sigsys_handler().is_err() {
            // SAFETY: ending the child.
            unsafe { libc::_exit(101) };
        }
    };
    assert_eq!(in_child(&program, before, ptrace), End::Signal(libc::SIGSYS));
    // SAFETY: closing our write end, so the read below ends.
    unsafe { libc::close(fds[1]) };
    let mut out = [0u8; 512];
    // SAFETY: reading into a local buffer.
    let n = unsafe { libc::read(fds[0], out.as_mut_ptr().cast(), out.len()) };
    // SAFETY: closing our read end.
    unsafe { libc::close(fds[0]) };
    let text = String::from_utf8_lossy(&out[..n.max(0) as usize]).into_owned();
    assert!(
        text.contains(&format!("thread 'vcpu7' made system call {}", libc::SYS_ptrace))
            && text.contains("--seccomp log"),
        "{text}"
    );
}

#[test]
fn the_handler_names_an_ioctls_request() {
    let mut fds = [0; 2];
    // SAFETY: a pipe into a two-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let program = compile(ThreadKind::Vcpu, SeccompMode::Enforce).unwrap();
    let before = || {
        // SAFETY: in the child: stderr into the pipe.
        unsafe { libc::dup2(fds[1], libc::STDERR_FILENO) };
        if install_sigsys_handler().is_err() {
            // SAFETY: ending the child.
            unsafe { libc::_exit(101) };
        }
    };
    // SAFETY: an ioctl no filter allows, on fd 0; the filter stops it before the kernel looks.
    let odd_ioctl = || unsafe {
        libc::ioctl(0, 0xdead_beef_u64 as _);
    };
    assert_eq!(in_child(&program, before, odd_ioctl), End::Signal(libc::SIGSYS));
    // SAFETY: closing our write end, so the read below ends.
    unsafe { libc::close(fds[1]) };
    let mut out = [0u8; 512];
    // SAFETY: reading into a local buffer.
    let n = unsafe { libc::read(fds[0], out.as_mut_ptr().cast(), out.len()) };
    // SAFETY: closing our read end.
    unsafe { libc::close(fds[0]) };
    let text = String::from_utf8_lossy(&out[..n.max(0) as usize]).into_owned();
    assert!(text.contains(&format!("made system call {} (arguments 0x0, 0xdeadbeef)", libc::SYS_ioctl)), "{text}");
}

#[test]
fn parents_allow_what_their_children_need_before_their_own_filter() {
    for kind in ThreadKind::ALL {
        let parent = rule_map(kind).unwrap();
        for &child in kind.children() {
            for s in rule_map(child).unwrap().keys() {
                assert!(parent.contains_key(s), "{kind:?} starts {child:?}, which needs syscall {s}");
            }
        }
    }
}

fn kvm_io(nr: u64) -> u64 {
    (0xae << 8) | nr
}
