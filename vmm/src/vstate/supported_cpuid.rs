// SPDX-License-Identifier: Apache-2.0
//! KVM's supported CPUID, asked on a thread of its own as soon as /dev/kvm is open.
//!
//! KVM answers `KVM_GET_SUPPORTED_CPUID` by running the CPUID instruction leaf by leaf, and under
//! nested virtualisation each one exits to the hypervisor below: about 0.25 ms for the list
//! here, a tenth of a restore's time to running. Asked in the background, the answer is there
//! by the time the vCPUs need it, while the VMM thread creates the VM and registers its memory
//! (asked once `--jail`, which needs a single thread, is entered).
//! The thread runs one `ioctl` on its own copy of the descriptor and nothing else (it reads
//! nothing from outside the process, so it needs no seccomp filter), and it is joined before
//! any vCPU exists.

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
        let thread = std::thread::Builder::new()
            .name("kvm-cpuid".into())
            // It only calls into the kernel; the copy of the list is on the heap.
            .stack_size(64 << 10)
            .spawn(move || copy.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES));
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
        assert_eq!(answer.as_slice(), direct.as_slice());
        // Not asked in the background: asked when the answer is wanted.
        let later = SupportedCpuid::default().answer(&kvm).expect("asked at the answer");
        assert_eq!(later.as_slice(), direct.as_slice());
    }
}
