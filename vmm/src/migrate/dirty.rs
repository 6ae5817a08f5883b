// SPDX-License-Identifier: Apache-2.0
//! Which guest pages changed: KVM's dirty log (pages the guest wrote) ORed with vm-memory's
//! bitmap (pages the VMM wrote: virtio RX frames, used rings), per memory region; and which
//! pages were ever touched at all (mincore), so that untouched memory is never read.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::MigrateError;
use crate::vstate::vm::Vm;

/// A region's pages as a bitmap, bit i of word i/64 for page i.
pub type Bitmap = Vec<u64>;

const PAGE: usize = 4096;

fn words(pages: usize) -> usize {
    pages.div_ceil(64)
}

/// Turns on dirty logging and forgets what the VMM wrote so far: from here on, every change is
/// in the next [`collect`].
pub fn start(vm: &Vm) -> Result<(), MigrateError> {
    vm.set_memslots(true)?;
    for region in vm.memory().iter() {
        (**region).bitmap().reset();
    }
    Ok(())
}

/// Turns dirty logging off again (a failed migration: the guest runs on here at full speed).
pub fn stop(vm: &Vm) -> Result<(), MigrateError> {
    vm.set_memslots(false)?;
    Ok(())
}

/// The pages changed since the last call (or [`start`]), per region; both logs are cleared.
pub fn collect(vm: &Vm) -> Result<Vec<Bitmap>, MigrateError> {
    let mut out = Vec::new();
    for (slot, region) in vm.memory().iter().enumerate() {
        let mut bits = vm
            .fd()
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|source| MigrateError::Kvm { what: "get dirty log", source })?;
        let vmm = (**region).bitmap().get_and_reset();
        bits.resize(words(region.len() as usize / PAGE), 0);
        migration::memory::or_into(&mut bits, &vmm);
        out.push(bits);
    }
    Ok(out)
}

/// Whether swap is on: then a page mincore calls absent may hold data on disk, and residency
/// says nothing about which pages are in use. Read once, when the VMM starts (a sandboxed VMM
/// cannot read /proc later).
pub fn swap_active() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::fs::read_to_string("/proc/swaps").map(|s| s.lines().count() > 1).unwrap_or(true))
}

/// The pages of each region that were ever touched: anonymous memory that was never touched is
/// not resident and reads as zero, so it needs neither reading nor sending. Without that
/// knowledge (swap on, or mincore failing) every page counts as touched.
pub fn touched(vm: &Vm) -> Vec<Bitmap> {
    let trust = !swap_active();
    vm.memory()
        .iter()
        .map(|region| {
            let pages = region.len() as usize / PAGE;
            let all = || {
                let mut b = vec![u64::MAX; words(pages)];
                if pages % 64 != 0
                    && let Some(last) = b.last_mut()
                {
                    *last = (1u64 << (pages % 64)) - 1;
                }
                b
            };
            if !trust {
                return all();
            }
            let Ok(host) = vm.memory().get_host_address(region.start_addr()) else { return all() };
            let mut vec = vec![0u8; pages];
            // SAFETY: `host` is the start of this region's live mapping of `pages` pages; `vec`
            // has one byte per page as mincore requires.
            let rc = unsafe { libc::mincore(host.cast(), pages * PAGE, vec.as_mut_ptr()) };
            if rc != 0 {
                return all();
            }
            let mut b = vec![0u64; words(pages)];
            for (i, v) in vec.iter().enumerate() {
                if v & 1 != 0 {
                    b[i / 64] |= 1 << (i % 64);
                }
            }
            b
        })
        .collect()
}

/// The dirty log read during a round, before the round ends (a "peek", as Xen's pre-copy
/// does): a page the guest dirtied again before its turn in the round is skipped, because the
/// next round (or post-copy) sends it anyway. What was peeked is carried into the next
/// [`Peeked::collect`], so nothing is lost; all it costs the guest is its pages write-protected
/// again sooner.
#[derive(Default)]
pub struct Peeked {
    /// Everything read since the last [`Peeked::collect`], per region (empty: nothing yet).
    maps: Vec<Bitmap>,
}

impl Peeked {
    /// Reads the log now and remembers what it held.
    pub fn peek(&mut self, vm: &Vm) -> Result<(), MigrateError> {
        let fresh = collect(vm)?;
        if self.maps.is_empty() {
            self.maps = fresh;
        } else {
            or_all(&mut self.maps, &fresh);
        }
        Ok(())
    }

    /// Whether page `page` of region `region` was dirtied since the round began.
    pub fn contains(&self, region: usize, page: usize) -> bool {
        self.maps.get(region).and_then(|bits| bits.get(page / 64)).is_some_and(|w| w & (1u64 << (page % 64)) != 0)
    }

    /// [`collect`], with everything peeked since the last call.
    pub fn collect(&mut self, vm: &Vm) -> Result<Vec<Bitmap>, MigrateError> {
        let mut out = collect(vm)?;
        or_all(&mut out, &std::mem::take(&mut self.maps));
        Ok(out)
    }
}

/// ORs each region's bitmap of `from` into `into`'s.
fn or_all(into: &mut [Bitmap], from: &[Bitmap]) {
    for (a, b) in into.iter_mut().zip(from) {
        migration::memory::or_into(a, b);
    }
}
