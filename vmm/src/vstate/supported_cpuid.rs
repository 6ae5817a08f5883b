// SPDX-License-Identifier: Apache-2.0
//! KVM's supported CPUID, asked on a thread of its own as soon as /dev/kvm is open.
//!
//! KVM answers `KVM_GET_SUPPORTED_CPUID` by running the CPUID instruction leaf by leaf, and under
//! nested virtualisation each one exits to the hypervisor below: about 0.25 ms for the list
//! here, a tenth of a restore's time to running. Asked in the background, the answer is there
//! by the time the vCPUs need it, while the VMM thread creates the VM and registers its memory.
//! The thread installs the VMM thread's own filter before it asks (it is started with
//! [`crate::seccomp::spawn`], so that nothing reads a peer's byte or runs the guest before that
//! filter is on), runs one `ioctl` on its own copy of the descriptor and ends; it is joined
//! before any vCPU exists.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::thread::JoinHandle;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// The question, asked or not yet.
#[derive(Default)]
pub struct SupportedCpuid(Option<JoinHandle<Result<CpuId, kvm_ioctls::Error>>>);

impl SupportedCpuid {
    /// Starts asking `kvm`. Without a copy of its descriptor or a thread, nothing is asked yet
    /// and [`SupportedCpuid::answer`] asks.
    pub fn ask(kvm: &Kvm) -> Self {
        // SAFETY: `kvm` owns its descriptor, open for as long as the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(kvm.as_raw_fd()) };
        let Ok(fd) = fd.try_clone_to_owned() else { return Self(None) };
        // SAFETY: `fd` is a new descriptor of /dev/kvm that nothing else owns.
        let copy = unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) };
        let thread = crate::seccomp::spawn("kvm-cpuid", crate::seccomp::ThreadKind::Vmm, move || {
            copy.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        });
        Self(thread.ok())
    }

    /// KVM's answer: the thread's, or asked of `kvm` now if no thread asked.
    pub fn answer(self, kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
        match self.0.map(JoinHandle::join) {
            Some(Ok(answer)) => answer,
            // No thread, or one that did not end normally: ask here.
            Some(Err(_)) | None => kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cpuid` without what depends on the CPU that asked: the APIC ID in leaf 1 and the
    /// x2APIC ID in leaves 0xb and 0x1f (the VMM sets both per vCPU).
    fn this_cpu_aside(cpuid: &CpuId) -> Vec<kvm_bindings::kvm_cpuid_entry2> {
        let mut entries = cpuid.as_slice().to_vec();
        for e in &mut entries {
            match e.function {
                0x1 => e.ebx &= 0x00ff_ffff,
                0xb | 0x1f => e.edx = 0,
                _ => {}
            }
        }
        entries
    }

    #[test]
    fn the_thread_answers_as_kvm_does() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("\n*** SKIPPED the_thread_answers_as_kvm_does: /dev/kvm does not exist on this host ***\n");
            return;
        }
        let kvm = Kvm::new().expect("/dev/kvm exists but does not open");
        let direct = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).expect("asked directly");
        let asked = SupportedCpuid::ask(&kvm);
        assert!(asked.0.is_some(), "no thread was started");
        let answer = asked.answer(&kvm).expect("asked on the thread");
        assert_eq!(this_cpu_aside(&answer), this_cpu_aside(&direct));
        // Not asked in the background: asked when the answer is wanted.
        let later = SupportedCpuid::default().answer(&kvm).expect("asked at the answer");
        assert_eq!(this_cpu_aside(&later), this_cpu_aside(&direct));
    }
}
