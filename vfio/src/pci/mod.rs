//! A VFIO PCI function as the guest sees it: the device's own config space and BARs, with
//! the parts a VMM must own virtualized. Generic over [`VfioBackend`], the regions and
//! interrupt indexes of a VFIO device, so the same model serves kernel VFIO
//! ([`crate::kernel`]) and, later, a vfio-user client.
//!
//! Virtualized (everything else is the device's, read and written through its config region):
//! - BARs 0-5: guest addresses kept here (the device's are the host's), sized from the
//!   regions, with the sizing protocol of PCI Local Bus 3.0 §6.2.5.1; a move is reported to the
//!   VMM's [`VfioBarMapper`], which maps the BAR's mmap-able pages as guest memory and traps
//!   the rest;
//! - the expansion ROM BAR: hidden (reads 0, writes ignored), so no guest runs option ROM code;
//! - interrupt pin and line: the device's pin, the line a scratch register for the guest;
//!   INTx is wired to the IOAPIC input the `_PRT` names while MSI and MSI-X are off
//!   ([`intx`]);
//! - the MSI-X capability's message control, and its table and PBA (trapped, even where the
//!   rest of their BAR is mapped), through `devices::pci::msix`;
//! - the MSI capability: all of it, since the guest's address and data never reach the device
//!   (the host programs the device's vectors, [`vectors`]);
//! - any part of a BAR the VMM serves itself ([`BarOverlay`]: siovmm's trapped IMS window in a
//!   daemon ADI's BAR0), never passed to the device.

mod caps;
mod intx;
mod vectors;

#[cfg(any(test, feature = "test-util"))]
pub mod fake;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Weak};

use devices::pci::msix::{Msix, VectorChange};
use devices::pci::bar::{self, BarSpace};
use devices::pci::{Bdf, PciFunction};
use devices::GuestFaults;
use siovmm_interrupts::{FunctionId, MsiRouter, VectorSource};
use vfio_bindings::bindings::vfio::{VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX};
use vmm_sys_util::eventfd::EventFd;

use crate::mapping::RegionMapping;
use caps::{Capabilities, MsiCap, MsixCap};
use intx::Intx;
use vectors::Vectors;

/// VFIO region index of PCI config space (`VFIO_PCI_CONFIG_REGION_INDEX`).
pub const CONFIG_REGION: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
/// BARs of a type-0 header.
pub const BARS: usize = 6;
/// Dword index of BAR0.
const REG_BAR0: usize = 4;
/// Dword index of the expansion ROM BAR.
const REG_ROM: usize = 0x30 / 4;
/// Dword index of interrupt line/pin.
const REG_INTERRUPT: usize = 0x3c / 4;
/// Dword index of command/status.
const REG_COMMAND: usize = 1;
const CMD_IO: u32 = 1;
const CMD_MEMORY: u32 = 2;
const CMD_BUS_MASTER: u16 = 4;

/// What a VFIO region offers (from `VFIO_DEVICE_GET_REGION_INFO`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Bytes; 0 for a region the device does not have.
    pub size: u64,
    /// Can be mmapped (`VFIO_REGION_INFO_FLAG_MMAP`).
    pub mmap: bool,
}

/// The device side: what a VFIO device (kernel or vfio-user) offers.
pub trait VfioBackend: Send + Sync {
    /// Region `index`'s size and capabilities.
    fn region(&self, index: u32) -> RegionInfo;
    /// Reads `data.len()` bytes at `offset` of region `index`; failures read as all ones.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` of region `index`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]);
    /// Vectors the device has at interrupt `index`.
    fn irq_count(&self, index: u32) -> u32;
    /// Triggers `fds[i]` for vector `start + i` of interrupt `index` (`VFIO_DEVICE_SET_IRQS`,
    /// DATA_EVENTFD | ACTION_TRIGGER).
    fn set_irqs(&self, index: u32, start: u32, fds: &[&EventFd]) -> std::io::Result<()>;
    /// Disables interrupt `index` (DATA_NONE | ACTION_TRIGGER, count 0).
    fn disable_irqs(&self, index: u32) -> std::io::Result<()>;
    /// Has a signal of `fd` unmask vector 0 of interrupt `index` (DATA_EVENTFD |
    /// ACTION_UNMASK): how a level-triggered INTx, which the device side masks each time it
    /// fires, is re-armed by the guest's EOI without a VMM thread (KVM's resample eventfd).
    fn set_irq_unmask(&self, index: u32, fd: &EventFd) -> std::io::Result<()>;
    /// Region `index`'s mmap-able areas mapped into this process; empty when it has none.
    fn map_region(&self, index: u32) -> std::io::Result<Vec<RegionMapping>>;
}

/// A BAR of the device, as its config space and region describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// BAR number (0-5); a 64-bit BAR also takes the next.
    pub index: u8,
    /// Bytes (a power of two).
    pub size: u64,
    /// I/O space rather than memory.
    pub io: bool,
    /// 64-bit memory BAR.
    pub wide: bool,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// The region can be mmapped.
    pub mmap: bool,
}

impl Bar {
    /// The low bits of the BAR register that are flags, not address (§6.2.5.1).
    fn flag_bits(&self) -> u32 {
        if self.io {
            0x3
        } else {
            0xf
        }
    }

    /// Its address space.
    fn space(&self) -> BarSpace {
        match (self.io, self.wide) {
            (true, _) => BarSpace::Io,
            (false, false) => BarSpace::Mem32,
            (false, true) => BarSpace::Mem64,
        }
    }

    /// The flag bits' values: the BAR's type.
    fn type_bits(&self) -> u32 {
        if self.io {
            1
        } else {
            u32::from(self.wide) << 2 | u32::from(self.prefetchable) << 3
        }
    }
}

/// The device's BARs: sizes from its regions, types from its config space. A BAR whose region
/// is empty, or whose size is not a power of two, is left out (the guest sees it unimplemented).
pub fn bars(backend: &dyn VfioBackend) -> Vec<Bar> {
    let mut bars = Vec::new();
    let mut index = 0;
    while index < BARS {
        let raw = read_config_dword(backend, REG_BAR0 + index);
        let io = raw & 1 != 0;
        let wide = !io && (raw >> 1) & 3 == 2;
        let region = backend.region(index as u32);
        if region.size != 0 && region.size.is_power_of_two() && !(io && region.size > 1 << 16) {
            bars.push(Bar { index: index as u8, size: region.size, io, wide, prefetchable: !io && raw & 8 != 0, mmap: region.mmap });
        }
        index += if wide { 2 } else { 1 };
    }
    bars
}

fn read_config_dword(backend: &dyn VfioBackend, reg: usize) -> u32 {
    let mut b = [0u8; 4];
    backend.region_read(CONFIG_REGION, reg as u64 * 4, &mut b);
    u32::from_le_bytes(b)
}

/// Where the VMM puts a BAR: told when one moves, so it maps (or unmaps) the BAR's pages.
pub trait VfioBarMapper: Send + Sync {
    /// BAR `bar` of `bdf` moves from `old` (where this mapper last mapped it, or nowhere) to
    /// `new` (or nowhere). Returns whether it is now mapped at `new`: a guest may place a BAR
    /// over another device or outside the windows, which gets no mapping.
    fn remap(&self, bdf: Bdf, bar: Bar, old: Option<u64>, new: Option<u64>) -> bool;
}

/// A part of a BAR the VMM serves itself instead of the device: guest accesses there go to it
/// and never reach the device (siovmm's trapped IMS window in front of a daemon ADI's BAR0).
pub trait BarOverlay: Send {
    /// A guest read of `data.len()` bytes at `offset` into the overlay.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` into the overlay.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why an overlay was not laid over a BAR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlayError {
    /// The device has no such memory BAR, or the range does not fit in it.
    #[error("BAR {bar} has no bytes {start:#x}..{end:#x}", end = start.saturating_add(*size))]
    OutOfBar {
        /// The BAR.
        bar: u8,
        /// Where the overlay was to start.
        start: u64,
        /// Its size.
        size: u64,
    },
    /// The range meets the MSI-X table or PBA, or another overlay.
    #[error("BAR {bar} bytes {start:#x}.. are virtualized already")]
    Taken {
        /// The BAR.
        bar: u8,
        /// Where the overlay was to start.
        start: u64,
    },
}

/// An overlay and where it lies.
struct Overlay {
    bar: u8,
    start: u64,
    size: u64,
    handler: Box<dyn BarOverlay>,
}

impl Overlay {
    fn hit(&self, bar: u8, offset: u64) -> Option<u64> {
        (bar == self.bar).then(|| offset.checked_sub(self.start)).flatten().filter(|&o| o < self.size)
    }
}

/// Where the MSI-X table or the PBA sits: BAR, byte offset, size.
#[derive(Debug, Clone, Copy)]
struct MsixWindow {
    bar: u8,
    start: u64,
    size: u64,
}

impl MsixWindow {
    /// The offset into the window of an access at `offset` of BAR `bar`, if it falls inside.
    fn hit(&self, bar: u8, offset: u64) -> Option<u64> {
        (bar == self.bar && (self.start..self.start + self.size).contains(&offset)).then(|| offset - self.start)
    }
}

/// A guest-visible BAR: the device's BAR and the guest address the guest gave it.
#[derive(Debug, Clone, Copy)]
struct GuestBar {
    bar: Bar,
    /// The register value(s) as the guest wrote them (low dword, and the high one if wide).
    address: u64,
    /// Where the guest asked for it last (`None`: decode off, being sized, or out of range).
    placed: Option<u64>,
    /// Where the mapper actually mapped it: only this is ever taken off the bus again.
    mapped: Option<u64>,
}

/// The function.
pub struct VfioPciFunction {
    bdf: Bdf,
    backend: Arc<dyn VfioBackend>,
    bars: Vec<GuestBar>,
    msix: Option<(MsixCap, Msix, Vectors)>,
    msi: Option<(MsiCap, Vectors)>,
    /// The INTx line, when the device has one and it could be wired.
    intx: Option<Intx>,
    router: Arc<MsiRouter>,
    mapper: Weak<dyn VfioBarMapper>,
    /// The command register's decode bits as the guest last wrote them.
    command: u32,
    /// Interrupt line (scratch for the guest: the `_PRT` says where INTx goes).
    interrupt_line: u8,
    /// Failed operations a guest access triggered (counted, the first few logged).
    faults: GuestFaults,
    /// BAR accesses that reached siovmm.
    trapped: TrappedAccesses,
    /// Parts of BARs the VMM serves itself.
    overlays: Vec<Overlay>,
}

/// BAR accesses that reached siovmm instead of going to the device's pages directly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrappedAccesses {
    /// To the MSI-X table or PBA (always trapped).
    pub msix: u64,
    /// Anywhere else: BAR pages that are not mapped into the guest.
    pub other: u64,
}

impl std::fmt::Debug for VfioPciFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciFunction").field("bdf", &self.bdf.to_string()).field("bars", &self.bars).finish_non_exhaustive()
    }
}

impl VfioPciFunction {
    /// The function at `bdf` with its BARs at `placement` (one address per entry of [`bars`],
    /// as firmware assigned them; memory decode stays off until the guest turns it on, so
    /// nothing is mapped yet).
    pub fn new(
        bdf: Bdf,
        backend: Arc<dyn VfioBackend>,
        placement: &[(Bar, u64)],
        router: Arc<MsiRouter>,
        mapper: Weak<dyn VfioBarMapper>,
    ) -> Self {
        let caps = Capabilities::discover(|reg| read_config_dword(backend.as_ref(), reg));
        let function = FunctionId::Vfio(bdf.0);
        let msix = caps.msix.map(|cap| {
            let count = cap.vectors.min(backend.irq_count(VFIO_PCI_MSIX_IRQ_INDEX) as u16);
            (cap, Msix::new(count), Vectors::new(function, VectorSource::MsiX, VFIO_PCI_MSIX_IRQ_INDEX))
        });
        let msi = caps.msi.filter(|_| backend.irq_count(VFIO_PCI_MSI_IRQ_INDEX) > 0).map(|cap| {
            (cap, Vectors::new(function, VectorSource::Msi, VFIO_PCI_MSI_IRQ_INDEX))
        });
        let bars = placement.iter().map(|&(bar, address)| GuestBar { bar, address, placed: None, mapped: None }).collect();
        let mut faults = GuestFaults::new(format!("VFIO device {bdf}"));
        let pin = (read_config_dword(backend.as_ref(), REG_INTERRUPT) >> 8) as u8;
        // Wired from the start (MSI and MSI-X start off), as firmware leaves a function.
        let intx = arch::pci::intx_gsi(bdf.bus(), bdf.device(), pin)
            .filter(|_| backend.irq_count(VFIO_PCI_INTX_IRQ_INDEX) > 0)
            .and_then(|gsi| {
                let mut line = Intx::new(function, pin, gsi).ok()?;
                let wired = line.set_enabled(backend.as_ref(), &router, true);
                faults.record("wiring INTx", wired).map(|()| line)
            });
        Self { bdf, backend, bars, msix, msi, intx, router, mapper, command: 0, interrupt_line: 0, faults, trapped: TrappedAccesses::default(), overlays: Vec::new() }
    }

    /// The IOAPIC input its INTx is wired to now, if it is.
    pub fn intx_gsi(&self) -> Option<u32> {
        self.intx.as_ref().filter(|l| l.enabled()).map(Intx::gsi)
    }

    /// Brings INTx in line with the guest's MSI and MSI-X enables: wired while both are off,
    /// unwired otherwise. vfio-pci takes one interrupt type at a time, so around a change of
    /// the device's MSI or MSI-X this runs twice: before it, only unwiring (`may_wire` false:
    /// MSI or MSI-X is still on on the device), and after it, only then wiring.
    fn sync_intx(&mut self, may_wire: bool) {
        let message_vectors = self.msix.as_ref().is_some_and(|(_, m, _)| m.enabled()) || self.msi.as_ref().is_some_and(|(c, _)| c.enabled());
        let Self { intx: Some(line), backend, router, faults, .. } = self else { return };
        let on = !message_vectors;
        if on && !may_wire {
            return;
        }
        faults.record(if on { "wiring INTx" } else { "unwiring INTx" }, line.set_enabled(backend.as_ref(), router, on));
    }

    /// Failed operations so far (routes refused, eventfds not made, SET_IRQS refused).
    pub fn failures(&self) -> u64 {
        self.faults.count()
    }

    /// BAR accesses that reached siovmm so far.
    pub fn trapped_accesses(&self) -> TrappedAccesses {
        self.trapped
    }

    /// The guest BDF.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// Serves bytes `start..start + size` of memory BAR `bar` with `handler` from now on,
    /// instead of the device. The VMM must not map those pages into the guest
    /// ([`VfioPciFunction::trapped_pages`] lists them from now on).
    pub fn overlay(&mut self, bar: u8, start: u64, size: u64, handler: Box<dyn BarOverlay>) -> Result<(), OverlayError> {
        let fits = self.bars.iter().any(|b| b.bar.index == bar && !b.bar.io && start.checked_add(size).is_some_and(|end| size > 0 && end <= b.bar.size));
        if !fits {
            return Err(OverlayError::OutOfBar { bar, start, size });
        }
        if self.virtualized(bar).any(|(s, len)| s < start + size && start < s + len) {
            return Err(OverlayError::Taken { bar, start });
        }
        self.overlays.push(Overlay { bar, start, size, handler });
        Ok(())
    }

    /// Drops every overlay (the function is leaving the guest: what they hold goes first).
    pub fn remove_overlays(&mut self) {
        self.overlays.clear();
    }

    /// Byte ranges of BAR `bar` that must trap (the MSI-X table and PBA, and overlays,
    /// widened to whole pages of `page` bytes), so the VMM maps only the rest.
    pub fn trapped_pages(&self, bar: u8, page: u64) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = self
            .virtualized(bar)
            .map(|(offset, size)| {
                let start = offset / page * page;
                (start, (offset + size).div_ceil(page) * page - start)
            })
            .collect();
        ranges.sort_unstable();
        ranges.dedup();
        ranges
    }

    /// The byte ranges (offset, size) of BAR `bar` siovmm serves itself: the MSI-X table and
    /// PBA, and overlays.
    fn virtualized(&self, bar: u8) -> impl Iterator<Item = (u64, u64)> + '_ {
        let msix = self.msix_windows().into_iter().flatten().filter(move |w| w.bar == bar).map(|w| (w.start, w.size));
        msix.chain(self.overlays.iter().filter(move |o| o.bar == bar).map(|o| (o.start, o.size)))
    }

    /// The overlay an access at `offset` of BAR `bar` falls in, and the offset into it.
    fn overlay_at(&mut self, bar: u8, offset: u64) -> Option<(u64, &mut Overlay)> {
        self.overlays.iter_mut().find_map(|v| Some((v.hit(bar, offset)?, v)))
    }

    /// The MSI-X table's and the PBA's places in the BARs, in that order.
    fn msix_windows(&self) -> Option<[MsixWindow; 2]> {
        let (cap, msix, _) = self.msix.as_ref()?;
        Some([
            MsixWindow { bar: cap.table_bir, start: cap.table_offset, size: msix.table_size() },
            MsixWindow { bar: cap.pba_bir, start: cap.pba_offset, size: msix.pba_size() },
        ])
    }

    fn guest_bar_at_reg(&self, reg: usize) -> Option<(usize, bool)> {
        let index = reg.checked_sub(REG_BAR0)?;
        self.bars.iter().enumerate().find_map(|(i, b)| {
            let first = usize::from(b.bar.index);
            if index == first {
                Some((i, false))
            } else if b.bar.wide && index == first + 1 {
                Some((i, true))
            } else {
                None
            }
        })
    }

    fn read_bar_reg(&self, reg: usize) -> u32 {
        match self.guest_bar_at_reg(reg) {
            None => 0, // unimplemented BAR (or the device's, hidden)
            Some((i, high)) => {
                let b = &self.bars[i];
                if high {
                    (b.address >> 32) as u32
                } else {
                    (b.address as u32 & !b.bar.flag_bits()) | b.bar.type_bits()
                }
            }
        }
    }

    fn write_bar_reg(&mut self, reg: usize, value: u32) {
        let Some((i, high)) = self.guest_bar_at_reg(reg) else { return };
        let b = &mut self.bars[i];
        let mask = !(b.bar.size - 1);
        let mut address = b.address;
        if high {
            address = (address & 0xffff_ffff) | (u64::from(value) << 32 & mask);
        } else {
            let low_mask = mask as u32 & !b.bar.flag_bits();
            address = (address & !0xffff_ffff) | u64::from(value & low_mask);
        }
        b.address = address;
        self.place_bars();
    }

    /// Where BAR `i` should be mapped now: decode on, placed, not being sized, in range.
    fn placement(&self, i: usize) -> Option<u64> {
        let b = &self.bars[i];
        let decode = if b.bar.io { self.command & CMD_IO != 0 } else { self.command & CMD_MEMORY != 0 };
        bar::placement(b.address, b.bar.size, b.bar.space(), decode)
    }

    /// Moves every BAR whose placement changed.
    fn place_bars(&mut self) {
        let mapper = self.mapper.upgrade();
        for i in 0..self.bars.len() {
            let new = self.placement(i);
            let b = &mut self.bars[i];
            if new != b.placed {
                b.placed = new;
                if let Some(m) = &mapper {
                    let mapped = m.remap(self.bdf, b.bar, b.mapped, new);
                    b.mapped = if mapped { new } else { None };
                }
            }
        }
    }

    /// Whether the guest is using the device: bus mastering on (read from the device, where
    /// the guest's command writes go), or MSI-X or MSI enabled. A Linux driver turns them on
    /// when it binds and off when it unbinds; removing a device in use pulls it from under the
    /// driver. (INTx is left out: siovmm wires it whenever the guest has not disabled it.)
    pub fn in_use(&self) -> bool {
        let mut command = [0u8; 2];
        self.backend.region_read(CONFIG_REGION, REG_COMMAND as u64 * 4, &mut command);
        // A device that is gone reads all ones: in use, as far as anyone can tell.
        u16::from_le_bytes(command) & CMD_BUS_MASTER != 0
            || self.msix.as_ref().is_some_and(|(_, m, _)| m.enabled())
            || self.msi.as_ref().is_some_and(|(c, _)| c.enabled())
    }

    /// Disables MSI-X and MSI on the device and detaches their routes (the device is being
    /// removed; the guest no longer drives it).
    pub fn disable_interrupts(&mut self) {
        let Self { msix, msi, intx, backend, router, faults, .. } = self;
        if let Some(line) = intx {
            faults.record("unwiring INTx", line.set_enabled(backend.as_ref(), router, false));
        }
        if let Some((_, _, vectors)) = msix {
            faults.record("disabling MSI-X on the device", vectors.set_enabled(backend.as_ref(), router, None));
        }
        if let Some((_, vectors)) = msi {
            faults.record("disabling MSI on the device", vectors.set_enabled(backend.as_ref(), router, None));
        }
    }

    /// Takes every BAR off the guest's buses (the device is being removed).
    pub fn unmap_bars(&mut self) {
        let mapper = self.mapper.upgrade();
        for b in &mut self.bars {
            b.placed = None;
            if let (Some(old), Some(m)) = (b.mapped.take(), &mapper) {
                m.remap(self.bdf, b.bar, Some(old), None);
            }
        }
    }

    /// Applies MSI-X vector changes: enable/disable of the index, route and mask.
    fn apply_msix(&mut self, changes: Vec<VectorChange>) {
        self.sync_intx(false);
        let Self { msix: Some((_, msix, vectors)), backend, router, faults, .. } = self else { return };
        let count = msix.enabled().then(|| u32::from(msix.vectors()));
        let what = if count.is_some() { "enabling MSI-X on the device" } else { "disabling MSI-X on the device" };
        faults.record(what, vectors.set_enabled(backend.as_ref(), router, count));
        let changes: Vec<_> = changes.iter().map(|c| (usize::from(c.vector), c.message, c.masked)).collect();
        faults.record("routing MSI-X vectors", vectors.update_all(router, &changes));
        self.sync_intx(true);
    }

    /// Applies the MSI capability's state to the device and routes.
    fn apply_msi(&mut self) {
        self.sync_intx(false);
        let Self { msi: Some((cap, vectors)), backend, router, faults, .. } = self else { return };
        let count = cap.enabled().then(|| cap.vectors_enabled());
        let what = if count.is_some() { "enabling MSI on the device" } else { "disabling MSI on the device" };
        faults.record(what, vectors.set_enabled(backend.as_ref(), router, count));
        let changes: Vec<_> = (0..count.unwrap_or(0))
            .map(|v| {
                let (message, masked) = cap.vector(v);
                (v as usize, message, masked)
            })
            .collect();
        faults.record("routing MSI vectors", vectors.update_all(router, &changes));
        self.sync_intx(true);
    }

    /// Where a trapped access at `offset` of BAR `bar` falls (offset into the MSI-X table,
    /// offset into the PBA, when the function has MSI-X), counted as MSI-X or other.
    fn trapped_access(&mut self, bar: u8, offset: u64) -> Option<(Option<u64>, Option<u64>)> {
        let hit = self.msix_windows().map(|[table, pba]| (table.hit(bar, offset), pba.hit(bar, offset)));
        match hit {
            Some((Some(_), _) | (_, Some(_))) => self.trapped.msix += 1,
            _ => self.trapped.other += 1,
        }
        hit
    }

    /// A guest read of `data.len()` bytes at `offset` of BAR `bar` (trapped accesses only).
    pub fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let hit = self.trapped_access(bar, offset);
        if let Some((o, overlay)) = self.overlay_at(bar, offset) {
            return overlay.handler.read(o, data);
        }
        match (hit, &mut self.msix) {
            (Some((Some(o), _)), Some((_, msix, _))) => msix.read_table(o, data),
            (Some((_, Some(o))), Some((_, msix, vectors))) => {
                let pending: Vec<bool> = (0..usize::from(msix.vectors())).map(|v| vectors.pending(v)).collect();
                msix.read_pba(o, data, |v| pending[usize::from(v)]);
            }
            _ => self.backend.region_read(u32::from(bar), offset, data),
        }
    }

    /// A guest write of `data` at `offset` of BAR `bar` (trapped accesses only).
    pub fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let hit = self.trapped_access(bar, offset);
        if let Some((o, overlay)) = self.overlay_at(bar, offset) {
            return overlay.handler.write(o, data);
        }
        match (hit, &mut self.msix) {
            (Some((Some(o), _)), Some((_, msix, _))) => {
                let change = msix.write_table(o, data);
                self.apply_msix(change.into_iter().collect());
            }
            (Some((_, Some(_))), _) => {} // the PBA is read-only
            _ => self.backend.region_write(u32::from(bar), offset, data),
        }
    }
}

impl PciFunction for VfioPciFunction {
    fn config_read(&mut self, reg: usize) -> u32 {
        match reg {
            r if (REG_BAR0..REG_BAR0 + BARS).contains(&r) => self.read_bar_reg(r),
            REG_ROM => 0,
            REG_INTERRUPT => u32::from(self.interrupt_line) | u32::from(self.intx.as_ref().map_or(0, Intx::pin)) << 8,
            r => {
                let device = read_config_dword(self.backend.as_ref(), r);
                if let Some((cap, msix, _)) = &self.msix {
                    if r == cap.offset / 4 {
                        return device & 0xffff | u32::from(msix.message_control()) << 16;
                    }
                }
                if let Some((cap, vectors)) = &mut self.msi {
                    if cap.is_pending_reg(r) {
                        return (0..cap.vectors_enabled()).filter(|&v| vectors.pending(v as usize)).fold(0, |p, v| p | 1 << v);
                    }
                    if let Some(v) = cap.read(r) {
                        return v;
                    }
                }
                device
            }
        }
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let (start, end) = (offset as usize, offset as usize + data.len());
        if end > 4 {
            return;
        }
        // The dword as it would be after the write (for registers kept here).
        let merge = |current: u32| {
            let mut bytes = current.to_le_bytes();
            bytes[start..end].copy_from_slice(data);
            u32::from_le_bytes(bytes)
        };
        match reg {
            r if (REG_BAR0..REG_BAR0 + BARS).contains(&r) => {
                let value = merge(self.read_bar_reg(r));
                self.write_bar_reg(r, value);
            }
            REG_ROM => {}
            REG_INTERRUPT => {
                if start == 0 {
                    self.interrupt_line = data[0];
                }
            }
            r => {
                if let Some((cap, msix, _)) = &mut self.msix {
                    if r == cap.offset / 4 {
                        if end > 2 {
                            let control = (merge(u32::from(msix.message_control()) << 16) >> 16) as u16;
                            let changes = msix.write_message_control(control);
                            self.apply_msix(changes);
                        }
                        return;
                    }
                }
                if let Some((cap, _)) = &mut self.msi {
                    if cap.contains(r) {
                        let current = cap.read(r).unwrap_or(0);
                        if cap.write(r, merge(current)) {
                            self.apply_msi();
                        }
                        return;
                    }
                }
                self.backend.region_write(CONFIG_REGION, r as u64 * 4 + offset, data);
                if r == REG_COMMAND && start < 2 {
                    self.command = merge(self.command) & (CMD_IO | CMD_MEMORY);
                    self.place_bars();
                }
            }
        }
    }
}
