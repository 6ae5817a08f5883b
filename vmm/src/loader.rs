// SPDX-License-Identifier: Apache-2.0
//! Loading the kernel (ELF vmlinux or bzImage, via linux-loader), the initrd and the command line
//! into guest memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START};
use crate::vstate::memory::GuestMemoryMmap;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const BZIMAGE_HDR_OFFSET: u64 = 0x202;
const BZIMAGE_HDR_MAGIC: &[u8; 4] = b"HdrS";
/// The 64-bit entry of a bzImage is 0x200 past where its protected-mode part is loaded.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry point.
const XLF_KERNEL_64: u16 = 1 << 0;
const PAGE_SIZE: u64 = 4096;

/// Errors while loading the kernel, initrd or command line.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open {kind} {path}: {source}")]
    Open { kind: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot read kernel {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0} is not a kernel: it is neither an ELF vmlinux nor a bzImage")]
    NotAKernel(PathBuf),
    #[error("{path} is not a kernel: an ELF file, but {why}")]
    WrongElf { path: PathBuf, why: &'static str },
    #[error("{path} is a bzImage without a 64-bit entry point")]
    No64BitEntry { path: PathBuf },
    #[error("failed to load kernel {path}: {source} (is guest memory large enough?)")]
    Load { path: PathBuf, source: linux_loader::loader::Error },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("failed to copy initrd {path} into guest memory")]
    InitrdCopy { path: PathBuf },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("failed to write the kernel command line into guest memory")]
    CmdlineWrite,
}

/// What the vCPUs need to know about a loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// bzImage setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
}

enum KernelFormat {
    Elf,
    BzImage,
}

fn open(kind: &'static str, path: &Path) -> Result<File, LoaderError> {
    let file = File::open(path).map_err(|source| LoaderError::Open { kind, path: path.into(), source })?;
    // Opening a directory succeeds; reading it does not. Say so now, with the path.
    match file.metadata() {
        Ok(m) if m.is_dir() => Err(LoaderError::Open {
            kind,
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "is a directory"),
        }),
        _ => Ok(file),
    }
}

/// Opens the initrd.
pub fn open_initrd(path: &Path) -> Result<File, LoaderError> {
    open("initrd", path)
}

/// Opens the kernel and checks that it is one, before any guest resources exist.
pub fn open_kernel(path: &Path) -> Result<File, LoaderError> {
    let mut file = open("kernel", path)?;
    detect_format(&mut file, path)?;
    Ok(file)
}

fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, LoaderError> {
    let read_err = |source| LoaderError::Read { path: path.into(), source };
    let mut head = [0u8; 64];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let n = read_up_to(file, &mut head).map_err(read_err)?;
    if n >= 20 && &head[0..4] == ELF_MAGIC {
        if head[4] != ELFCLASS64 {
            return Err(LoaderError::WrongElf { path: path.into(), why: "not 64-bit" });
        }
        if u16::from_le_bytes([head[18], head[19]]) != EM_X86_64 {
            return Err(LoaderError::WrongElf { path: path.into(), why: "not built for x86_64" });
        }
        // A kernel image is linked to run where it is loaded; a program or library is not.
        if u16::from_le_bytes([head[16], head[17]]) != ET_EXEC {
            return Err(LoaderError::WrongElf {
                path: path.into(),
                why: "a program or library, not an executable image",
            });
        }
        return Ok(KernelFormat::Elf);
    }
    let mut magic = [0u8; 4];
    if file.seek(SeekFrom::Start(BZIMAGE_HDR_OFFSET)).is_ok()
        && read_up_to(file, &mut magic).map_err(read_err)? == 4
        && &magic == BZIMAGE_HDR_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(LoaderError::NotAKernel(path.into()))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads the kernel into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, file: &mut File, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let load_err = |source| LoaderError::Load { path: path.into(), source };
    match detect_format(file, path)? {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            Ok(LoadedKernel { entry: r.kernel_load.raw_value(), end: r.kernel_end, setup_header: None })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            let hdr = r.setup_header.ok_or_else(|| LoaderError::NotAKernel(path.into()))?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoaderError::No64BitEntry { path: path.into() });
            }
            Ok(LoadedKernel {
                entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: r.kernel_end,
                setup_header: Some(hdr),
            })
        }
    }
}

/// Loads the initrd at the highest page-aligned address of low memory (below the MMIO hole and
/// the kernel's `initrd_addr_max`) and returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(GuestAddress, u32), LoaderError> {
    let size = file.metadata().map_err(|source| LoaderError::Open { kind: "initrd", path: path.into(), source })?.len();
    let too_large = || LoaderError::InitrdTooLarge { path: path.into(), size };
    let size32 = u32::try_from(size).map_err(|_| too_large())?;
    let lowmem_end = mem.iter().next().map(|r| r.start_addr().raw_value() + r.len()).unwrap_or(0).min(MMIO_GAP_START);
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max) + 1)
        .filter(|m| *m > 1)
        .unwrap_or(lowmem_end)
        .min(lowmem_end);
    let start = addr_max.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if start < kernel.end.max(HIMEM_START) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(start), file, size as usize)
        .map_err(|_| LoaderError::InitrdCopy { path: path.into() })?;
    Ok((GuestAddress(start), size32))
}

/// Builds the command line and writes it at [`CMDLINE_START`]; returns its size with the NUL.
pub fn load_cmdline(mem: &GuestMemoryMmap, parts: &[&str]) -> Result<u32, LoaderError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    for part in parts.iter().filter(|p| !p.trim().is_empty()) {
        cmdline.insert_str(part.trim()).map_err(LoaderError::Cmdline)?;
    }
    let cstring = cmdline.as_cstring().map_err(LoaderError::Cmdline)?;
    let bytes = cstring.as_bytes_with_nul();
    mem.write_slice(bytes, GuestAddress(CMDLINE_START)).map_err(|_| LoaderError::CmdlineWrite)?;
    Ok(bytes.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-loader-{}-{name}", std::process::id()));
        let mut f = File::create(&dir).unwrap();
        f.write_all(bytes).unwrap();
        dir
    }

    /// A minimal ELF64 x86_64 executable with one PT_LOAD segment of `code` at `paddr`.
    pub(crate) fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 64 + 56];
        v[0..4].copy_from_slice(ELF_MAGIC);
        v[4] = ELFCLASS64;
        v[5] = 1; // little endian
        v[6] = 1; // version
        v[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        v[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        v[20..24].copy_from_slice(&1u32.to_le_bytes());
        v[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        v[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        v[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        v[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        v[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        v[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        v[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        v[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        v[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        v[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        v[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 0x1000).to_le_bytes());
        v.extend_from_slice(code);
        v
    }

    #[test]
    fn loads_an_elf_at_its_physical_address() {
        let path = temp_file("elf", &tiny_elf(0x20_0000, &[0xf4, 0x90, 0xeb, 0xfe]));
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut f = open_kernel(&path).unwrap();
        let k = load_kernel(&mem, &mut f, &path).unwrap();
        assert_eq!(k.entry, 0x20_0000);
        assert_eq!(k.end, 0x20_0000 + 4 + 0x1000);
        let mut code = [0u8; 4];
        mem.read_slice(&mut code, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(code, [0xf4, 0x90, 0xeb, 0xfe]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let text = temp_file("text", b"#!/bin/sh\necho not a kernel\n");
        assert!(matches!(open_kernel(&text), Err(LoaderError::NotAKernel(_))));
        let empty = temp_file("empty", b"");
        assert!(matches!(open_kernel(&empty), Err(LoaderError::NotAKernel(_))));
        let mut arm = tiny_elf(0x20_0000, &[0]);
        arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        let arm = temp_file("arm", &arm);
        let err = open_kernel(&arm).unwrap_err();
        assert!(err.to_string().contains("not built for x86_64"), "{err}");
        let mut pie = tiny_elf(0x20_0000, &[0]);
        pie[16] = 3; // ET_DYN
        let pie = temp_file("pie", &pie);
        assert!(open_kernel(&pie).unwrap_err().to_string().contains("a program or library"));
        std::fs::remove_file(pie).unwrap();
        for p in [text, empty, arm] {
            std::fs::remove_file(p).unwrap();
        }
        let err = open_kernel(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().starts_with("cannot open kernel /nonexistent/vmlinux"), "{err}");
        assert!(open_kernel(Path::new("/")).unwrap_err().to_string().contains("is a directory"));
    }

    #[test]
    fn elf_outside_guest_memory_is_an_error() {
        let path = temp_file("high", &tiny_elf(0x4000_0000, &[0xf4]));
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut f = open_kernel(&path).unwrap();
        assert!(matches!(load_kernel(&mem, &mut f, &path), Err(LoaderError::Load { .. })));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bzimage_header_is_recognised_and_entry_is_64_bit() {
        // setup_sects = 1, "HdrS", version 0x20c, loadflags LOADED_HIGH, code32_start 1 MiB,
        // xloadflags XLF_KERNEL_64.
        let mut img = vec![0u8; 2 * 512 + 64];
        img[0x1f1] = 1;
        img[0x202..0x206].copy_from_slice(BZIMAGE_HDR_MAGIC);
        img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
        img[0x211] = 1;
        img[0x214..0x218].copy_from_slice(&(HIMEM_START as u32).to_le_bytes());
        img[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        let path = temp_file("bz", &img);
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut f = open_kernel(&path).unwrap();
        let k = load_kernel(&mem, &mut f, &path).unwrap();
        assert_eq!(k.entry, HIMEM_START + 0x200);
        assert!(k.setup_header.is_some());
        img[0x236] = 0;
        std::fs::write(&path, &img).unwrap();
        let mut f = open_kernel(&path).unwrap();
        assert!(matches!(load_kernel(&mem, &mut f, &path), Err(LoaderError::No64BitEntry { .. })));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let path = temp_file("initrd", &[7u8; 10000]);
        let kernel = LoadedKernel { entry: HIMEM_START, end: 2 << 20, setup_header: None };
        let (addr, size) = load_initrd(&mem, &mut open_initrd(&path).unwrap(), &path, &kernel).unwrap();
        assert_eq!(size, 10000);
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert!(addr.raw_value() + 10000 <= 32 << 20);
        assert!(addr.raw_value() + 10000 + PAGE_SIZE > 32 << 20);
        let b: u8 = mem.read_obj(addr.unchecked_add(9999)).unwrap();
        assert_eq!(b, 7);
        let big = LoadedKernel { end: 32 << 20, ..kernel };
        let mut f = open_initrd(&path).unwrap();
        assert!(matches!(load_initrd(&mem, &mut f, &path, &big), Err(LoaderError::InitrdTooLarge { .. })));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn cmdline_is_nul_terminated_and_bounded() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let n = load_cmdline(&mem, &["console=ttyS0", "", "quiet "]).unwrap();
        let mut buf = vec![0u8; n as usize];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(buf, b"console=ttyS0 quiet\0");
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(load_cmdline(&mem, &[&long]), Err(LoaderError::Cmdline(_))));
    }
}
