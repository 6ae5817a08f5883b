// SPDX-License-Identifier: Apache-2.0
//! The kick: a signal whose handler sets `immediate_exit` in the receiving vCPU thread's
//! `kvm_run`, so that its `KVM_RUN` returns at once (see [`super`]).

use std::cell::Cell;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::register_signal_handler;

use super::VcpuError;

thread_local! {
    /// This thread's vCPU `kvm_run`, for the kick signal handler. `const`-initialised, so that
    /// reading it from a signal handler never allocates.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Makes the kick signal interrupt `KVM_RUN` of `fd` when it arrives on this thread.
pub(crate) fn set_kick_target(fd: &mut VcpuFd) {
    KVM_RUN_PTR.with(|p| p.set(fd.get_kvm_run() as *mut kvm_run));
}

/// Must be called on the same thread before the `VcpuFd` given to [`set_kick_target`] is dropped.
pub(crate) fn clear_kick_target() {
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
}

pub(crate) fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own mapped kvm_run, set by the vCPU thread
            // before it first runs and cleared before the VcpuFd is dropped.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

pub(crate) fn init_kick_signal() -> Result<(), VcpuError> {
    static INIT: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> = std::sync::OnceLock::new();
    (*INIT.get_or_init(|| register_signal_handler(kick_signal(), handle_kick))).map_err(VcpuError::Signal)
}
