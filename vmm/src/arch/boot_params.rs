// SPDX-License-Identifier: Apache-2.0
//! The Linux zero page (`boot_params`): command line, initrd and the e820 memory map. Our own
//! guest kernel reads the same page, so both kinds of guest boot the same way.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{EBDA_START, HIMEM_START, ZERO_PAGE_START};
use crate::vstate::memory::GuestMemoryMmap;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_MAX_ENTRIES: usize = 128;

/// Errors while writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("too many e820 entries")]
    E820Overflow,
    #[error("failed to write the zero page: {0}")]
    Write(#[from] linux_loader::configurator::Error),
}

/// Where things are that the zero page points to.
pub struct BootInfo {
    pub cmdline_addr: GuestAddress,
    /// Length of the command line including its NUL.
    pub cmdline_size: u32,
    /// Address and size of the initrd, if any.
    pub initrd: Option<(GuestAddress, u32)>,
    /// The bzImage setup header, which the kernel wants back in the zero page.
    pub setup_header: Option<setup_header>,
}

fn add_e820_entry(params: &mut boot_params, addr: u64, size: u64, type_: u32) -> Result<(), BootParamsError> {
    let n = params.e820_entries as usize;
    if n >= E820_MAX_ENTRIES.min(params.e820_table.len()) {
        return Err(BootParamsError::E820Overflow);
    }
    params.e820_table[n].addr = addr;
    params.e820_table[n].size = size;
    params.e820_table[n].r#type = type_;
    params.e820_entries += 1;
    Ok(())
}

/// Fills in the zero page for `mem` and writes it at [`ZERO_PAGE_START`].
pub fn write_boot_params(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = info.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = info.cmdline_addr.raw_value() as u32;
    params.hdr.cmdline_size = info.cmdline_size;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size;
    }

    // Conventional memory up to the EBDA; the MP table lives in the EBDA, so mark it reserved.
    add_e820_entry(&mut params, 0, EBDA_START, E820_RAM)?;
    add_e820_entry(&mut params, EBDA_START, 0x400, E820_RESERVED)?;
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            add_e820_entry(&mut params, start, end - start, E820_RAM)?;
        }
    }

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn zero_page_describes_memory_and_cmdline() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let info = BootInfo {
            cmdline_addr: GuestAddress(0x20000),
            cmdline_size: 12,
            initrd: Some((GuestAddress(0x300_0000), 0x1234)),
            setup_header: None,
        };
        write_boot_params(&mem, &info).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 12);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!(p.e820_entries, 3);
        let high = p.e820_table[2];
        assert_eq!(({ high.addr }, { high.size }, { high.r#type }), (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
        let ebda = p.e820_table[1];
        assert_eq!({ ebda.r#type }, E820_RESERVED);
    }

    #[test]
    fn memory_above_the_hole_gets_its_own_entry() {
        let mem = create_guest_memory(4 << 30).unwrap();
        write_boot_params(
            &mem,
            &BootInfo { cmdline_addr: GuestAddress(0x20000), cmdline_size: 1, initrd: None, setup_header: None },
        )
        .unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(p.e820_entries, 4);
        let top = p.e820_table[3];
        assert_eq!({ top.addr }, 1 << 32);
        assert_eq!({ top.size }, (4 << 30) - super::super::layout::MMIO_GAP_START);
    }
}
