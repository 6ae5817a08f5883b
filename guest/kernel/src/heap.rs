// SPDX-License-Identifier: Apache-2.0
//! The heap: all RAM after the kernel image, up to the end of its e820 range (below 4 GiB, the
//! part our page tables map), managed by linked_list_allocator.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

unsafe extern "C" {
    static _end: u8;
}

/// Hands the RAM after the image to the allocator; returns its size in bytes.
pub fn init(ram: &[(u64, u64)]) -> u64 {
    let start = (&raw const _end as u64 + 0xfff) & !0xfff;
    let Some(&(_, end)) = ram.iter().find(|(s, e)| *s <= start && start < *e) else {
        return 0;
    };
    let end = end.min(1 << 32);
    let size = end - start;
    // SAFETY: [start, end) is RAM the e820 map gives us, after everything the image uses, and
    // this is called once, before any allocation.
    unsafe { ALLOCATOR.lock().init(start as *mut u8, size as usize) };
    size
}
