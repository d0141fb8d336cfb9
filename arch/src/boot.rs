//! Loading a Linux kernel and its initramfs, and writing the boot information it reads:
//! the PVH `hvm_start_info` (ELF vmlinux with a PVH note) or the Linux zero page (bzImage,
//! or ELF without the note). The loaders themselves are linux-loader's.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::e820::memory_map;
use crate::image::MappedImage;
use crate::layout::*;
use crate::regs::EntryMode;

/// PVH start-info magic (xen/include/public/arch-x86/hvm/start_info.h).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// bzImage setup-header magic "HdrS" at offset 0x202 (Documentation/arch/x86/boot.rst).
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
/// `type_of_loader` value for a boot loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags` bit: the kernel may use the heap up to `heap_end_ptr`.
const CAN_USE_HEAP: u8 = 0x80;
/// Offset from the bzImage's 32-bit entry to `startup_64`.
const STARTUP_64_OFFSET: u64 = 0x200;

/// Kernel image formats siovmm loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux.
    Elf,
    /// bzImage (x86 boot protocol).
    BzImage,
}

/// Errors loading the kernel or writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the image failed.
    #[error("cannot read {what}: {source}")]
    Read {
        /// What was read.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a kernel siovmm can boot.
    #[error("not an ELF vmlinux or bzImage kernel")]
    NotAKernel,
    /// linux-loader rejected the image.
    #[error("kernel load failed: {0}")]
    Load(#[from] loader::Error),
    /// The kernel is 32-bit-only or its entry could not be determined.
    #[error("the ELF kernel has no PVH note and no 64-bit entry point")]
    NoEntry,
    /// The initramfs does not fit below the 32-bit hole above the kernel.
    #[error("initramfs of {size} bytes does not fit in guest memory above the kernel")]
    InitramfsTooLarge {
        /// Its size.
        size: u64,
    },
    /// The command line is too long or has characters Linux cannot take.
    #[error("kernel command line rejected: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing boot information failed.
    #[error("writing boot information: {0}")]
    BootInfo(#[from] linux_loader::configurator::Error),
    /// Guest memory could not be written.
    #[error("{0}")]
    Memory(String),
}

/// Identifies the image format from its first bytes, or `None`.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    if head.len() >= BZIMAGE_MAGIC_OFFSET + 4 && &head[BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4] == b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// Reads enough of `file` to identify it.
pub fn sniff_format<R: Read + Seek>(file: &mut R) -> Result<Option<KernelFormat>, std::io::Error> {
    let mut head = [0u8; 1024];
    file.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(detect_format(&head[..n]))
}

/// A kernel in guest memory, ready for boot information.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Which protocol enters it, and where.
    pub protocol: Protocol,
    /// First byte after the loaded image.
    pub end: u64,
}

/// Boot protocol a loaded kernel is entered with.
#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    /// PVH entry at this address.
    Pvh(u64),
    /// Linux 64-bit entry at this address, with the bzImage setup header if there was one.
    Linux64(u64, Option<setup_header>),
}

/// Where a guest restarting "through the BIOS" jumps: real-mode F000:FFF0.
pub const BIOS_RESET_VECTOR: u64 = 0xF_FFF0;

/// What siovmm puts at [`BIOS_RESET_VECTOR`] in place of firmware: ask the i8042 to pulse the
/// reset line (`mov al, 0xfe; out 0x64, al`), then halt for good (`cli; hlt; jmp $-4`).
///
/// Why it is needed: Linux on a hardware-reduced ACPI platform picks the EFI reboot method
/// (arch/x86/kernel/reboot.c, `efi_reboot_required()`); with no EFI that does nothing and the
/// next method is BOOT_BIOS, a jump to F000:FFF0. Without code there, `reboot` hangs.
pub const RESET_STUB: [u8; 8] = [0xb0, 0xfe, 0xe6, I8042_CMD_PORT as u8, 0xfa, 0xf4, 0xeb, 0xfc];

/// Writes [`RESET_STUB`] at [`BIOS_RESET_VECTOR`] (in the reserved legacy BIOS area).
pub fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<(), Error> {
    mem.write_slice(&RESET_STUB, GuestAddress(BIOS_RESET_VECTOR))
        .map_err(|e| Error::Memory(format!("writing the reset stub: {e}")))
}

/// Loads the kernel in `file` into `mem` (through a mapping of the file: crate::image).
pub fn load_kernel(mem: &GuestMemoryMmap, file: &File) -> Result<LoadedKernel, Error> {
    let mut image = MappedImage::new(file).map_err(|source| Error::Read { what: "kernel", source })?;
    let file = &mut image;
    let format = sniff_format(file)
        .map_err(|source| Error::Read { what: "kernel", source })?
        .ok_or(Error::NotAKernel)?;
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, file, himem)?;
            let end = r.kernel_end;
            let protocol = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => Protocol::Pvh(entry.0),
                _ if r.kernel_load.0 >= HIMEM_START => Protocol::Linux64(r.kernel_load.0, None),
                _ => return Err(Error::NoEntry),
            };
            Ok(LoadedKernel { protocol, end })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, file, himem)?;
            let entry = r.kernel_load.0 + STARTUP_64_OFFSET;
            Ok(LoadedKernel { protocol: Protocol::Linux64(entry, r.setup_header), end: r.kernel_end })
        }
    }
}

/// Places the initramfs at the top of RAM below the 32-bit hole (and below the kernel's
/// `initrd_addr_max`), page-aligned, above the kernel. Returns (address, size).
pub fn load_initramfs<F: ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    file: &mut F,
) -> Result<(u64, u64), Error> {
    let size = file.seek(SeekFrom::End(0)).map_err(|source| Error::Read { what: "initramfs", source })?;
    file.seek(SeekFrom::Start(0)).map_err(|source| Error::Read { what: "initramfs", source })?;
    let mut top = low_ram_end(mem_size);
    if let Protocol::Linux64(_, Some(hdr)) = kernel.protocol {
        if hdr.initrd_addr_max != 0 {
            top = top.min(u64::from(hdr.initrd_addr_max) + 1);
        }
    }
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel.end.max(HIMEM_START))
        .ok_or(Error::InitramfsTooLarge { size })?;
    let len = usize::try_from(size).map_err(|_| Error::InitramfsTooLarge { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(|e| Error::Read { what: "initramfs", source: std::io::Error::other(e) })?;
    Ok((addr, size))
}

/// Validates and writes the command line; returns its length including the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, Error> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline).map_err(Error::Cmdline)?;
    }
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(Error::Load)?;
    Ok(cmdline.len() + 1)
}

/// What the boot information describes besides the memory map.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// RAM size.
    pub mem_size: u64,
    /// Initramfs (address, size), if any.
    pub initramfs: Option<(u64, u64)>,
    /// Command line length including NUL.
    pub cmdline_len: usize,
    /// Guest-physical address of the RSDP.
    pub rsdp: u64,
}

/// Writes the boot information for `kernel` and returns how to enter it.
pub fn write_boot_info(mem: &GuestMemoryMmap, kernel: &LoadedKernel, info: &BootInfo) -> Result<EntryMode, Error> {
    match kernel.protocol {
        Protocol::Pvh(entry) => {
            write_pvh_start_info(mem, info)?;
            Ok(EntryMode::Pvh { entry, start_info: PVH_INFO_START })
        }
        Protocol::Linux64(entry, hdr) => {
            write_zero_page(mem, hdr, info)?;
            Ok(EntryMode::Linux64 { entry, zero_page: ZERO_PAGE_START })
        }
    }
}

fn write_pvh_start_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), Error> {
    let memmap: Vec<hvm_memmap_table_entry> = memory_map(info.mem_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 })
        .collect();
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: info.rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some((addr, size)) = info.initramfs {
        start.nr_modules = 1;
        start.modlist_paddr = PVH_MODLIST_START;
        modules.push(hvm_modlist_entry { paddr: addr, size, ..Default::default() });
    }
    let mut params = BootParams::new(&start, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)?;
    Ok(())
}

/// Builds the zero page; pure so the field layout can be tested.
pub fn zero_page(hdr: Option<setup_header>, info: &BootInfo) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = hdr {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = 0x100_0000;
    }
    if let Some((addr, size)) = info.initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp;
    let map = memory_map(info.mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    params
}

fn write_zero_page(mem: &GuestMemoryMmap, hdr: Option<setup_header>, info: &BootInfo) -> Result<(), Error> {
    let params = zero_page(hdr, info);
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE_START)), mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    #[test]
    fn formats_are_recognised() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"#!/bin/sh\n"), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let m = mem(32 << 20);
        let mut f = tempfile();
        f.write_all(&[0x55; 4096]).unwrap();
        assert!(matches!(load_kernel(&m, &f), Err(Error::NotAKernel)));
        // Right magic, broken body: linux-loader's error, not a panic.
        let mut f = tempfile();
        let mut bz = vec![0u8; 0x1000];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        f.write_all(&bz).unwrap();
        assert!(load_kernel(&m, &f).is_err());
    }

    #[test]
    fn zero_page_fields() {
        let info = BootInfo { mem_size: 512 << 20, initramfs: Some((0x1f00_0000, 0x12345)), cmdline_len: 20, rsdp: ACPI_START };
        let p = zero_page(None, &info);
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.ramdisk_image }, 0x1f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12345);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(p.e820_entries as usize, memory_map(512 << 20).len());
        let last = p.e820_table[p.e820_entries as usize - 1];
        assert_eq!({ last.addr }, PCI_ECAM_START);
    }

    #[test]
    fn initramfs_goes_high_and_page_aligned() {
        let m = mem(64 << 20);
        let kernel = LoadedKernel { protocol: Protocol::Pvh(0x100_0000), end: 0x200_0000 };
        let mut f = tempfile();
        f.write_all(&[7u8; 10_000]).unwrap();
        let (addr, size) = load_initramfs(&m, 64 << 20, &kernel, &mut f).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr & 0xfff, 0);
        assert!(addr + size <= 64 << 20);
        assert_eq!(m.read_obj::<u8>(GuestAddress(addr + 9_999)).unwrap(), 7);
        // Does not fit above the kernel.
        let big = LoadedKernel { protocol: Protocol::Pvh(0x100_0000), end: (64 << 20) - 4096 };
        assert!(matches!(load_initramfs(&m, 64 << 20, &big, &mut f), Err(Error::InitramfsTooLarge { .. })));
    }

    #[test]
    fn reset_stub_sits_at_the_reset_vector_inside_the_reserved_bios_area() {
        let m = mem(64 << 20);
        write_reset_stub(&m).unwrap();
        let mut b = [0u8; 8];
        m.read_slice(&mut b, GuestAddress(BIOS_RESET_VECTOR)).unwrap();
        assert_eq!(b, RESET_STUB);
        // 0xFFFF0..0xFFFF8 is reserved in the e820 map: the guest never uses it as RAM.
        let reserved = memory_map(64 << 20).into_iter().any(|e| {
            e.kind == crate::e820::E820_RESERVED && e.addr <= BIOS_RESET_VECTOR && BIOS_RESET_VECTOR + 8 <= e.addr + e.size
        });
        assert!(reserved);
    }

    #[test]
    fn pvh_start_info_written() {
        let m = mem(64 << 20);
        let kernel = LoadedKernel { protocol: Protocol::Pvh(0x100_0000), end: 0x200_0000 };
        let info = BootInfo { mem_size: 64 << 20, initramfs: Some((0x300_0000, 100)), cmdline_len: 5, rsdp: ACPI_START };
        let mode = write_boot_info(&m, &kernel, &info).unwrap();
        assert_eq!(mode, EntryMode::Pvh { entry: 0x100_0000, start_info: PVH_INFO_START });
        let si: [u32; 4] = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(si[0], XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si[3], 1, "one module");
        let modaddr: u64 = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(modaddr, 0x300_0000);
    }

    #[test]
    fn cmdline_limits() {
        let m = mem(1 << 20);
        assert_eq!(write_cmdline(&m, "console=ttyS0").unwrap(), 14);
        assert!(write_cmdline(&m, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
        assert!(write_cmdline(&m, "bad\u{1}char").is_err());
        assert!(write_cmdline(&m, "caf\u{e9}").is_err());
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!("siovmm-arch-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
