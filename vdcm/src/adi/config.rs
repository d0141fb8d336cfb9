//! An ADI's PCI config space and where its BAR0 sits on the guest's bus, as plain state.
//!
//! Config space: vendor 0x5356, device 0x0002, class 08/80/00; BAR0 64-bit, [`BAR0_SIZE`]; an
//! MSI-X capability at 0x40 (table and PBA in BAR0), then a PCI Express capability (RCiEP).
//! The MSI-X capability's message control is the vector state's, not config space's: reads
//! take it as an argument and a write to it comes back as [`ConfigWrite::MsixControl`], so
//! this module never touches interrupts.
//!
//! BAR0's placement follows the guest's command register and BAR writes (PCI Local Bus 3.0
//! §6.2.5.1): unmapped while memory decode is off, while the guest sizes the BAR (all ones
//! written) or before it has an address; [`Bar0Window`] moves the window on the bus when that
//! changes.

use std::sync::Weak;

use devices::pci::msix::CAP_ID_MSIX;
use devices::pci::bar::{self, BarSpace};
use devices::pci::{Bdf, ConfigSpace, SIOVMM_VENDOR_ID};

use super::{ADI_CLASS, ADI_DEVICE_ID, BAR0_SIZE, MSIX_PBA, MSIX_TABLE};

/// Where the MSI-X capability starts.
pub const MSIX_CAP_OFFSET: usize = 0x40;
/// The PCI Express capability, chained after MSI-X.
const PCIE_CAP_OFFSET: usize = 0x50;
/// PCI Express capability ID.
const CAP_ID_PCIE: u32 = 0x10;
/// PCIe Capabilities register: version 2, device/port type 1001b = Root Complex Integrated
/// Endpoint (PCIe Base 6.0 §7.5.3.2), which is what SIOV devices such as DSA are.
const PCIE_CAPS_RCIEP: u32 = 0x0092;
/// Command register: memory space decode.
const CMD_MEMORY: u32 = 1 << 1;
/// Command register: bus master (the function may DMA).
const CMD_BUS_MASTER: u32 = 1 << 2;
/// Dword registers by index.
const REG_COMMAND: usize = 1;
const REG_HEADER: usize = 3;
const REG_BAR0: usize = 4;
const REG_BAR0_HIGH: usize = 5;
const REG_SUBSYSTEM: usize = 0x2c / 4;
const REG_CAP_POINTER: usize = 0x34 / 4;

/// What a guest config write changed that the function must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigWrite {
    /// Nothing beyond config space itself.
    Stored,
    /// The command register or BAR0 changed: BAR0's placement may have moved.
    Placement,
    /// The guest wrote MSI-X message control (the new value).
    MsixControl(u16),
}

/// The function's config space.
#[derive(Debug)]
pub struct AdiConfig {
    space: ConfigSpace,
}

impl AdiConfig {
    /// Config space as firmware leaves it: BAR0 at `bar0`, memory decode on; `multifunction`
    /// for function 0 of a slot with more.
    pub fn new(bar0: u64, multifunction: bool) -> Self {
        let mut space = ConfigSpace::new(SIOVMM_VENDOR_ID, ADI_DEVICE_ID, ADI_CLASS, 1);
        // Status: capability list present. Command: memory decode on (firmware assigned BAR0).
        space.set_reg(REG_COMMAND, 1 << 20 | CMD_MEMORY);
        if multifunction {
            space.set_reg(REG_HEADER, 0x80 << 16);
        }
        // BAR0: 64-bit memory, size BAR0_SIZE; BAR1 is its upper half.
        space.set_reg(REG_BAR0, (bar0 as u32 & !0xf) | 0x4);
        space.set_reg(REG_BAR0_HIGH, (bar0 >> 32) as u32);
        space.set_writable(REG_BAR0, bar0_address_mask());
        space.set_writable(REG_BAR0_HIGH, u32::MAX);
        space.set_reg(REG_SUBSYSTEM, u32::from(SIOVMM_VENDOR_ID) | u32::from(ADI_DEVICE_ID) << 16);
        space.set_reg(REG_CAP_POINTER, MSIX_CAP_OFFSET as u32);
        space.set_reg(MSIX_CAP_OFFSET / 4 + 1, MSIX_TABLE as u32); // BIR 0
        space.set_reg(MSIX_CAP_OFFSET / 4 + 2, MSIX_PBA as u32); // BIR 0
        // PCI Express capability (§7.5.3): an RCiEP has no link, slot or root registers.
        let pcie = PCIE_CAP_OFFSET / 4;
        space.set_reg(pcie, CAP_ID_PCIE | PCIE_CAPS_RCIEP << 16);
        space.set_reg(pcie + 1, 1 << 15); // Device Capabilities: role-based error reporting, 128 B payload
        space.set_reg(pcie + 2, 0x2810); // Device Control reset value: MRRS 512 B, relaxed ordering, no snoop
        space.set_writable(pcie + 2, 0x0000_7fff); // Device Control is RW; Device Status stays 0
        Self { space }
    }

    /// Dword `reg`; the MSI-X capability's first dword carries `msix_control`.
    pub fn read(&self, reg: usize, msix_control: u16) -> u32 {
        if reg == MSIX_CAP_OFFSET / 4 {
            return u32::from(CAP_ID_MSIX) | (PCIE_CAP_OFFSET as u32) << 8 | u32::from(msix_control) << 16;
        }
        self.space.read_reg(reg)
    }

    /// A guest write of `data` at byte `offset` of dword `reg`. In the MSI-X capability's
    /// first dword only message control (bytes 2-3) is writable; a write that touches it
    /// yields the merged new value.
    pub fn write(&mut self, reg: usize, offset: u64, data: &[u8], msix_control: u16) -> ConfigWrite {
        if reg == MSIX_CAP_OFFSET / 4 {
            let start = offset as usize;
            let end = start.saturating_add(data.len());
            if end > 4 || end <= 2 {
                return ConfigWrite::Stored;
            }
            let mut dword = (u32::from(msix_control) << 16).to_le_bytes();
            dword[start..end].copy_from_slice(data);
            return ConfigWrite::MsixControl(u16::from_le_bytes([dword[2], dword[3]]));
        }
        self.space.write_reg(reg, offset, data);
        if matches!(reg, REG_COMMAND | REG_BAR0 | REG_BAR0_HIGH) {
            ConfigWrite::Placement
        } else {
            ConfigWrite::Stored
        }
    }

    /// Whether the guest let the function master the bus: a driver enabled it for DMA, and
    /// clears it again when it lets go (`pci_disable_device`).
    pub fn bus_master(&self) -> bool {
        self.space.read_reg(REG_COMMAND) & CMD_BUS_MASTER != 0
    }

    /// Where BAR0 should be mapped now, or `None` while it must not be (decode off, being
    /// sized, unplaced, or running past the top of the address space).
    pub fn bar0(&self) -> Option<u64> {
        let lo = self.space.read_reg(REG_BAR0);
        let hi = self.space.read_reg(REG_BAR0_HIGH);
        let addr = u64::from(hi) << 32 | u64::from(lo & !0xf);
        let decode = self.space.read_reg(REG_COMMAND) & CMD_MEMORY != 0;
        bar::placement(addr, BAR0_SIZE, BarSpace::Mem64, decode)
    }
}

/// The writable address bits of BAR0's low dword (its size is a power of two).
fn bar0_address_mask() -> u32 {
    !(BAR0_SIZE as u32 - 1) & !0xf
}

/// Moves BAR windows on the guest's MMIO bus (and the doorbell ioeventfd with them).
pub trait BarMapper: Send + Sync {
    /// BAR0 of `bdf` moves from `old` (where this mapper last mapped it, or nowhere) to `new`
    /// (or nowhere). Returns whether it is now mapped at `new`: a guest may place a BAR over
    /// another device, which must get no mapping rather than displace what is there.
    fn remap(&self, bdf: Bdf, old: Option<u64>, new: Option<u64>) -> bool;
}

/// BAR0's window on the guest's bus: where it is mapped now, moved through the VDCM's mapper.
pub(crate) struct Bar0Window {
    bdf: Bdf,
    /// Weak: the mapper's bus holds the function while its BAR is mapped, so a strong
    /// reference would be a cycle that keeps the VM alive after release.
    mapper: Weak<dyn BarMapper>,
    /// Where the guest asked for the window last (`None`: off the bus).
    placed: Option<u64>,
    /// Where the mapper actually mapped it: only this is ever taken off the bus again.
    mapped: Option<u64>,
}

impl Bar0Window {
    /// Not mapped yet.
    pub(crate) fn new(bdf: Bdf, mapper: Weak<dyn BarMapper>) -> Self {
        Self { bdf, mapper, placed: None, mapped: None }
    }

    /// Puts the window at `new` (or takes it off the bus), if that is a move.
    pub(crate) fn place(&mut self, new: Option<u64>) {
        if new == self.placed {
            return;
        }
        self.placed = new;
        // Once the VDCM is gone (the VM is being released) nothing moves any more.
        if let Some(mapper) = self.mapper.upgrade() {
            let mapped = mapper.remap(self.bdf, self.mapped, new);
            self.mapped = if mapped { new } else { None };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const BAR0: u64 = 0xc000_0000;
    const TAKEN: u64 = 0xd000_0000;

    #[test]
    fn bar0_follows_decode_sizing_and_placement() {
        let mut c = AdiConfig::new(BAR0, false);
        assert_eq!(c.bar0(), Some(BAR0));
        // Decode off: unmapped; on again: back.
        assert_eq!(c.write(REG_COMMAND, 0, &[0, 0], 0), ConfigWrite::Placement);
        assert_eq!(c.bar0(), None);
        c.write(REG_COMMAND, 0, &[CMD_MEMORY as u8, 0], 0);
        assert_eq!(c.bar0(), Some(BAR0));
        // Sizing: all ones reads back the size mask, and the BAR is not mapped meanwhile.
        c.write(REG_BAR0, 0, &u32::MAX.to_le_bytes(), 0);
        c.write(REG_BAR0_HIGH, 0, &u32::MAX.to_le_bytes(), 0);
        assert_eq!(c.read(REG_BAR0, 0), bar0_address_mask() | 0x4, "size and 64-bit type");
        assert_eq!(c.bar0(), None);
        // Placed above 4 GiB.
        c.write(REG_BAR0, 0, &0x8000_0000u32.to_le_bytes(), 0);
        c.write(REG_BAR0_HIGH, 0, &1u32.to_le_bytes(), 0);
        assert_eq!(c.bar0(), Some(0x1_8000_0000));
        // The highest window below the sizing pattern is a placement like any other.
        c.write(REG_BAR0_HIGH, 0, &u32::MAX.to_le_bytes(), 0);
        c.write(REG_BAR0, 0, &(bar0_address_mask() - BAR0_SIZE as u32).to_le_bytes(), 0);
        assert_eq!(c.bar0(), Some(u64::MAX - 2 * BAR0_SIZE + 1));
        // A 32-bit write of the low dword alone keeps the type bits read-only.
        assert_eq!(c.read(REG_BAR0, 0) & 0xf, 0x4);
    }

    #[test]
    fn msix_message_control_is_handed_back_not_stored() {
        let mut c = AdiConfig::new(BAR0, false);
        let first = MSIX_CAP_OFFSET / 4;
        assert_eq!(c.read(first, 0x0003) & 0xffff, u32::from(CAP_ID_MSIX) | (PCIE_CAP_OFFSET as u32) << 8);
        assert_eq!(c.read(first, 0x0003) >> 16, 0x0003);
        // A byte write of the high half merges with the current control.
        assert_eq!(c.write(first, 3, &[0x80], 0x0003), ConfigWrite::MsixControl(0x8003));
        assert_eq!(c.write(first, 2, &0xc001u16.to_le_bytes(), 0x0003), ConfigWrite::MsixControl(0xc001));
        // The capability ID and next pointer are read-only; a write past the dword is dropped.
        assert_eq!(c.write(first, 0, &[0xff, 0xff], 0x0003), ConfigWrite::Stored);
        assert_eq!(c.write(first, 3, &[0xff, 0xff], 0x0003), ConfigWrite::Stored);
        assert_eq!(c.read(first, 0x0003) & 0xffff, u32::from(CAP_ID_MSIX) | (PCIE_CAP_OFFSET as u32) << 8);
        // The table and PBA offsets are read-only too.
        c.write(first + 1, 0, &0u32.to_le_bytes(), 0);
        assert_eq!(c.read(first + 1, 0), MSIX_TABLE as u32);
    }

    #[test]
    fn multifunction_and_identity() {
        let c = AdiConfig::new(BAR0, true);
        assert_eq!(c.read(0, 0), u32::from(SIOVMM_VENDOR_ID) | u32::from(ADI_DEVICE_ID) << 16);
        assert_eq!(c.read(REG_HEADER, 0) >> 16 & 0x80, 0x80);
        assert_eq!(AdiConfig::new(BAR0, false).read(REG_HEADER, 0) >> 16 & 0x80, 0);
        assert_eq!(c.read(2, 0) >> 8, ADI_CLASS);
    }

    type Log = Arc<Mutex<Vec<(Option<u64>, Option<u64>)>>>;
    struct Moves(Log);
    impl BarMapper for Moves {
        fn remap(&self, _: Bdf, old: Option<u64>, new: Option<u64>) -> bool {
            self.0.lock().unwrap().push((old, new));
            // This bus refuses one address, as a bus does a window over another device.
            new != Some(TAKEN)
        }
    }

    #[test]
    fn the_window_moves_only_on_a_change_and_not_after_the_mapper_is_gone() {
        let log = Log::default();
        let mapper: Arc<dyn BarMapper> = Arc::new(Moves(log.clone()));
        let mut w = Bar0Window::new(Bdf::new(0, 1, 0), Arc::downgrade(&mapper));
        w.place(Some(BAR0));
        w.place(Some(BAR0));
        w.place(None);
        w.place(None);
        assert_eq!(*log.lock().unwrap(), vec![(None, Some(BAR0)), (Some(BAR0), None)]);
        // Refused: not mapped, so the next move takes nothing off the bus.
        w.place(Some(TAKEN));
        w.place(Some(BAR0));
        assert_eq!(log.lock().unwrap()[2..], [(None, Some(TAKEN)), (None, Some(BAR0))]);
        drop(mapper);
        w.place(Some(TAKEN + BAR0)); // the VDCM is gone: recorded, not sent
        assert_eq!(log.lock().unwrap().len(), 4);
        assert_eq!(w.placed, Some(TAKEN + BAR0));
    }
}
