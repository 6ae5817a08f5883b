// SPDX-License-Identifier: Apache-2.0
//! Unit tests of `vmm/src/migrate/send/mod.rs`.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::*;

#[test]
fn zero_pages_are_found_in_place() {
    let mem = crate::vstate::memory::create_guest_memory(1 << 20).unwrap();
    let region = mem.iter().next().unwrap();
    let page = |n: u64| region.get_slice(MemoryRegionAddress(n * PAGE_SIZE as u64), PAGE_SIZE).unwrap();
    assert!(page_is_zero(&page(3)));
    // One byte anywhere, the last one included, makes a page non-zero.
    for at in [0u64, 63, 64, 2048, PAGE_SIZE as u64 - 1] {
        mem.write_slice(&[1], GuestAddress(3 * PAGE_SIZE as u64 + at)).unwrap();
        assert!(!page_is_zero(&page(3)), "byte {at}");
        mem.write_slice(&[0], GuestAddress(3 * PAGE_SIZE as u64 + at)).unwrap();
    }
    assert!(page_is_zero(&page(3)));
    // A slice that is not a whole page is never called zero.
    assert!(!page_is_zero(&region.get_slice(MemoryRegionAddress(0), 64).unwrap()));
}
