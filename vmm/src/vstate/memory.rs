// SPDX-License-Identifier: Apache-2.0
//! Guest RAM: anonymous mappings with a dirty bitmap that records every write the VMM itself
//! makes (KVM's dirty log only sees the guest's writes; migration needs both).

use vm_memory::GuestAddress;
use vm_memory::bitmap::AtomicBitmap;

use crate::arch::layout;

/// Guest memory as every part of the VMM sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of guest memory.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Smallest guest we accept: room for the boot structures below 1 MiB and a small kernel.
pub const MIN_MEM_MIB: u64 = 16;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small: at least {MIN_MEM_MIB} MiB is needed")]
    TooSmall(u64),
    #[error("guest memory of {requested} MiB is more than this host's {host} MiB of RAM")]
    TooLarge { requested: u64, host: u64 },
    #[error("failed to allocate guest memory: {0}")]
    Allocate(#[from] vm_memory::mmap::FromRangesError),
}

/// Allocates `size` bytes of guest RAM laid out by [`layout::ram_regions`].
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> =
        layout::ram_regions(size).into_iter().map(|(start, len)| (GuestAddress(start), len as usize)).collect();
    Ok(GuestMemoryMmap::from_ranges(&ranges)?)
}

/// Checks a user's memory request against the minimum and the host's RAM. The mapping itself is
/// lazily backed (MAP_NORESERVE), so without this a too-large guest would start and be killed
/// later by the OOM killer.
pub fn check_mem_size(mib: u64) -> Result<(), MemoryError> {
    if mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mib));
    }
    if let Some(host) = host_mem_mib()
        && mib > host
    {
        return Err(MemoryError::TooLarge { requested: mib, host });
    }
    Ok(())
}

/// The host's total RAM in MiB, from /proc/meminfo (read once: a sandboxed VMM cannot later).
pub fn host_mem_mib() -> Option<u64> {
    static MIB: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *MIB.get_or_init(read_host_mem_mib)
}

fn read_host_mem_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn creates_requested_size() {
        let mem = create_guest_memory(32 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((32 << 20) - 1));
    }

    #[test]
    fn size_limits() {
        assert!(matches!(check_mem_size(1), Err(MemoryError::TooSmall(1))));
        assert!(check_mem_size(64).is_ok());
        let err = check_mem_size(1 << 40).unwrap_err();
        assert!(err.to_string().contains("more than this host"), "{err}");
    }
}
