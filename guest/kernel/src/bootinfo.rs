// SPDX-License-Identifier: Apache-2.0
//! What the VMM tells us in the Linux zero page (`boot_params`): the command line and the e820
//! memory map. Copied out at boot; the zero page lives in memory we may later reuse.

const CMD_LINE_PTR: usize = 0x228;
const E820_ENTRIES: usize = 0x1e8;
const E820_TABLE: usize = 0x2d0;
const E820_ENTRY_SIZE: usize = 20;
const E820_RAM: u32 = 1;
const MAX_CMDLINE: usize = 2048;
const MAX_RANGES: usize = 16;

/// The boot information we keep.
pub struct BootInfo {
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// RAM ranges (start, end) from e820.
    pub ram: [(u64, u64); MAX_RANGES],
    pub ram_count: usize,
}

impl BootInfo {
    fn empty() -> Self {
        BootInfo { cmdline: [0; MAX_CMDLINE], cmdline_len: 0, ram: [(0, 0); MAX_RANGES], ram_count: 0 }
    }

    /// Copies the NUL-terminated command line at `ptr` (none if null), cut at `MAX_CMDLINE - 1`.
    ///
    /// # Safety
    /// `ptr` is null or points at a NUL-terminated string.
    unsafe fn copy_cmdline(&mut self, ptr: *const u8) {
        if ptr.is_null() {
            return;
        }
        // SAFETY: per this function's contract, up to and excluding the NUL.
        unsafe {
            while self.cmdline_len < MAX_CMDLINE - 1 && *ptr.add(self.cmdline_len) != 0 {
                self.cmdline[self.cmdline_len] = *ptr.add(self.cmdline_len);
                self.cmdline_len += 1;
            }
        }
    }

    /// Keeps the RAM ranges of `n` memory map entries at `table`, `stride` bytes apart, each
    /// laid out as e820's and PVH's are: address (u64), size (u64), type (u32).
    ///
    /// # Safety
    /// `table` points at `n` such entries.
    unsafe fn copy_ram(&mut self, table: *const u8, n: usize, stride: usize) {
        for i in 0..n.min(128) {
            // SAFETY: per this function's contract; every field is read unaligned.
            let (addr, size, kind) = unsafe {
                let e = table.add(i * stride);
                (
                    e.cast::<u64>().read_unaligned(),
                    e.add(8).cast::<u64>().read_unaligned(),
                    e.add(16).cast::<u32>().read_unaligned(),
                )
            };
            if kind == E820_RAM && self.ram_count < MAX_RANGES {
                self.ram[self.ram_count] = (addr, addr.saturating_add(size));
                self.ram_count += 1;
            }
        }
    }

    /// Reads the zero page at physical (= virtual) address `zero_page`.
    ///
    /// # Safety
    /// `zero_page` must point at a zero page the VMM filled in, and its command line pointer
    /// at a NUL-terminated string, as the boot protocol promises.
    pub unsafe fn read(zero_page: u64) -> Self {
        let zp = zero_page as *const u8;
        let mut info = Self::empty();
        // SAFETY: per this function's contract.
        unsafe {
            info.copy_cmdline(u64::from(zp.add(CMD_LINE_PTR).cast::<u32>().read_unaligned()) as *const u8);
            info.copy_ram(zp.add(E820_TABLE), usize::from(*zp.add(E820_ENTRIES)), E820_ENTRY_SIZE);
        }
        info
    }

    /// Reads a PVH `hvm_start_info` (version 1, with a memory map) at `start_info`.
    ///
    /// # Safety
    /// `start_info` must point at the structure the loader filled in, with its command line and
    /// memory map where it says.
    pub unsafe fn read_pvh(start_info: u64) -> Self {
        const MAGIC: u32 = 0x336e_c578;
        const MEMMAP_ENTRY_SIZE: usize = 24;
        let si = start_info as *const u8;
        let mut info = Self::empty();
        // SAFETY: per this function's contract; every field is read unaligned.
        unsafe {
            if si.cast::<u32>().read_unaligned() != MAGIC {
                return info;
            }
            let version = si.add(4).cast::<u32>().read_unaligned();
            info.copy_cmdline(si.add(24).cast::<u64>().read_unaligned() as *const u8);
            if version >= 1 {
                let map = si.add(40).cast::<u64>().read_unaligned() as *const u8;
                let n = si.add(48).cast::<u32>().read_unaligned() as usize;
                if !map.is_null() {
                    info.copy_ram(map, n, MEMMAP_ENTRY_SIZE);
                }
            }
        }
        info
    }

    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    pub fn ram(&self) -> &[(u64, u64)] {
        &self.ram[..self.ram_count]
    }
}
