// SPDX-License-Identifier: Apache-2.0
//! The driver side of a split virtqueue: descriptor table, available ring and used ring in our
//! memory (identity-mapped, so their addresses are what the device sees).
//!
//! The device is another thread on the host, so ordering matters: ring entries are written
//! before the index that publishes them (x86 keeps stores in order; a compiler fence keeps the
//! compiler from reordering), and a full fence separates publishing from reading the device's
//! "do not notify me" flag, because x86 may reorder a load before an earlier store.

use alloc::alloc::{Layout, alloc_zeroed};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{Ordering, compiler_fence, fence};

/// Descriptor flags.
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// Available ring flag: the driver does not need an interrupt for used buffers.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: the device does not need a notification for new buffers.
const USED_F_NO_NOTIFY: u16 = 1;

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One split virtqueue of `size` entries.
pub struct VirtQueue {
    pub size: u16,
    desc: *mut Desc,
    avail: *mut u16,
    used: *mut u16,
    /// Our copy of avail.idx (the device only reads it).
    avail_idx: u16,
    /// The next used entry we have not looked at.
    last_used: u16,
}

fn alloc_page_aligned(bytes: usize) -> *mut u8 {
    let layout = Layout::from_size_align(bytes.max(1), 4096).expect("valid ring layout");
    // SAFETY: non-zero size; the rings live for the guest's life and are never freed.
    let p = unsafe { alloc_zeroed(layout) };
    assert!(!p.is_null(), "out of memory for a virtqueue");
    p
}

impl VirtQueue {
    pub fn new(size: u16) -> Self {
        let n = usize::from(size);
        Self {
            size,
            desc: alloc_page_aligned(16 * n).cast(),
            avail: alloc_page_aligned(6 + 2 * n).cast(),
            used: alloc_page_aligned(6 + 8 * n).cast(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn desc_addr(&self) -> u64 {
        self.desc as u64
    }
    pub fn avail_addr(&self) -> u64 {
        self.avail as u64
    }
    pub fn used_addr(&self) -> u64 {
        self.used as u64
    }

    /// Sets descriptor `id` to one buffer.
    pub fn set_desc(&mut self, id: u16, addr: u64, len: u32, flags: u16) {
        self.set_desc_next(id, addr, len, flags, 0);
    }

    /// Sets descriptor `id`, chained to `next` when `flags` has [`DESC_F_NEXT`].
    pub fn set_desc_next(&mut self, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(id < self.size && next < self.size);
        // SAFETY: `id` is within the table we allocated.
        unsafe { write_volatile(self.desc.add(usize::from(id)), Desc { addr, len, flags, next }) };
    }

    /// Changes the length of descriptor `id`.
    pub fn set_len(&mut self, id: u16, len: u32) {
        assert!(id < self.size);
        // SAFETY: as above.
        unsafe { write_volatile(&raw mut (*self.desc.add(usize::from(id))).len, len) };
    }

    /// Offers descriptor chain `head` to the device (visible at the next [`Self::publish`]).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: ring[slot] lies within the available ring (header is 2 u16).
        unsafe { write_volatile(self.avail.add(2 + slot), head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes everything pushed so far visible; returns whether the device wants a notification.
    pub fn publish(&mut self) -> bool {
        compiler_fence(Ordering::Release);
        // SAFETY: avail.idx is the second u16 of the available ring.
        unsafe { write_volatile(self.avail.add(1), self.avail_idx) };
        fence(Ordering::SeqCst);
        // SAFETY: used.flags is the first u16 of the used ring.
        let flags = unsafe { read_volatile(self.used) };
        flags & USED_F_NO_NOTIFY == 0
    }

    /// The next used entry (descriptor id, bytes written), if the device returned one.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used.idx is the second u16 of the used ring.
        let idx = unsafe { read_volatile(self.used.add(1)) };
        if idx == self.last_used {
            return None;
        }
        compiler_fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: elements are {u32 id, u32 len} after the 4-byte header.
        let (id, len) = unsafe {
            let e = self.used.cast::<u8>().add(4 + 8 * slot).cast::<u32>();
            (read_volatile(e), read_volatile(e.add(1)))
        };
        self.last_used = self.last_used.wrapping_add(1);
        // A device that returns an id we never gave it is broken; ignore the entry.
        u16::try_from(id).ok().filter(|id| *id < self.size).map(|id| (id, len))
    }

    /// Whether the device returned entries we have not popped.
    pub fn has_used(&self) -> bool {
        // SAFETY: as in pop_used.
        unsafe { read_volatile(self.used.add(1)) != self.last_used }
    }

    /// Asks the device for (or spares it) interrupts on used buffers.
    pub fn set_interrupts(&mut self, on: bool) {
        let flags = if on { 0 } else { AVAIL_F_NO_INTERRUPT };
        // SAFETY: avail.flags is the first u16 of the available ring.
        unsafe { write_volatile(self.avail, flags) };
        fence(Ordering::SeqCst);
    }
}
