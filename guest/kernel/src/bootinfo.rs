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
    /// Reads the zero page at physical (= virtual) address `zero_page`.
    ///
    /// # Safety
    /// `zero_page` must point at a zero page the VMM filled in, and its command line pointer
    /// at a NUL-terminated string, as the boot protocol promises.
    pub unsafe fn read(zero_page: u64) -> Self {
        let zp = zero_page as *const u8;
        let mut info = BootInfo { cmdline: [0; MAX_CMDLINE], cmdline_len: 0, ram: [(0, 0); MAX_RANGES], ram_count: 0 };
        // SAFETY: per this function's contract.
        unsafe {
            let ptr = u64::from(zp.add(CMD_LINE_PTR).cast::<u32>().read_unaligned()) as *const u8;
            if !ptr.is_null() {
                while info.cmdline_len < MAX_CMDLINE - 1 && *ptr.add(info.cmdline_len) != 0 {
                    info.cmdline[info.cmdline_len] = *ptr.add(info.cmdline_len);
                    info.cmdline_len += 1;
                }
            }
            let n = usize::from(*zp.add(E820_ENTRIES)).min(128);
            for i in 0..n {
                let e = zp.add(E820_TABLE + i * E820_ENTRY_SIZE);
                let addr = e.cast::<u64>().read_unaligned();
                let size = e.add(8).cast::<u64>().read_unaligned();
                let kind = e.add(16).cast::<u32>().read_unaligned();
                if kind == E820_RAM && info.ram_count < MAX_RANGES {
                    info.ram[info.ram_count] = (addr, addr.saturating_add(size));
                    info.ram_count += 1;
                }
            }
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
        let si = start_info as *const u8;
        let mut info = BootInfo { cmdline: [0; MAX_CMDLINE], cmdline_len: 0, ram: [(0, 0); MAX_RANGES], ram_count: 0 };
        // SAFETY: per this function's contract; every field is read unaligned.
        unsafe {
            if si.cast::<u32>().read_unaligned() != MAGIC {
                return info;
            }
            let version = si.add(4).cast::<u32>().read_unaligned();
            let ptr = si.add(24).cast::<u64>().read_unaligned() as *const u8;
            if !ptr.is_null() {
                while info.cmdline_len < MAX_CMDLINE - 1 && *ptr.add(info.cmdline_len) != 0 {
                    info.cmdline[info.cmdline_len] = *ptr.add(info.cmdline_len);
                    info.cmdline_len += 1;
                }
            }
            if version >= 1 {
                let map = si.add(40).cast::<u64>().read_unaligned() as *const u8;
                let n = si.add(48).cast::<u32>().read_unaligned().min(128) as usize;
                for i in 0..n {
                    let e = map.add(i * 24);
                    let addr = e.cast::<u64>().read_unaligned();
                    let size = e.add(8).cast::<u64>().read_unaligned();
                    let kind = e.add(16).cast::<u32>().read_unaligned();
                    if kind == E820_RAM && info.ram_count < MAX_RANGES {
                        info.ram[info.ram_count] = (addr, addr.saturating_add(size));
                        info.ram_count += 1;
                    }
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
