//! Routing configuration accesses to functions, through 0xCF8/0xCFC and through ECAM.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::bus::{lock, read_lock, write_lock};
use crate::BusDevice;

/// A function's configuration-space behaviour.
pub trait PciFunction: Send {
    /// Reads dword register `reg` (0..1024).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` of dword register `reg`.
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]);
}

/// Bus/device/function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf(pub u16);

impl Bdf {
    /// From parts; `device` < 32 and `function` < 8 are enforced by masking.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Bdf((bus as u16) << 8 | ((device as u16) & 0x1f) << 3 | ((function as u16) & 0x7))
    }
    /// Bus number.
    pub fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// Device number.
    pub fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }
    /// Function number.
    pub fn function(self) -> u8 {
        (self.0 & 7) as u8
    }
}

impl std::fmt::Display for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus(), self.device(), self.function())
    }
}

/// Decodes a CONFIG_ADDRESS value (PCI Local Bus 3.0 §3.2.2.3.2): enable bit 31, bus 23:16,
/// device 15:11, function 10:8, register 7:2. Bits 27:24 carry the extended register number
/// (offsets 0x100..0xFFF), as AMD and QEMU decode them. `None` when the enable bit is clear.
pub fn decode_cf8(address: u32) -> Option<(Bdf, usize)> {
    if address & 0x8000_0000 == 0 {
        return None;
    }
    let bdf = Bdf(((address >> 8) & 0xffff) as u16);
    let reg = ((address >> 2) & 0x3f) as usize | (((address >> 24) & 0xf) as usize) << 6;
    Some((bdf, reg))
}

/// Decodes an ECAM offset (PCIe Base 6.0 §7.2.2): bus 27:20, device 19:15, function 14:12,
/// byte offset 11:0. Returns (function, dword register, byte within the dword).
pub fn decode_ecam(offset: u64) -> (Bdf, usize, u64) {
    let bdf = Bdf(((offset >> 12) & 0xffff) as u16);
    let byte = offset & 0xfff;
    (bdf, (byte >> 2) as usize, byte & 3)
}

type Functions = BTreeMap<Bdf, Arc<Mutex<dyn PciFunction>>>;

/// All functions of the segment. Functions come and go while the guest runs (configuration
/// accesses take a read lock; adding and removing, rare, a write lock).
#[derive(Default)]
pub struct PciRoot {
    functions: RwLock<Functions>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.read_functions().keys()).finish()
    }
}

impl PciRoot {
    /// An empty root.
    pub fn new() -> Self {
        Self::default()
    }

    // A panic while holding the lock cannot leave the map half-updated (every update is one
    // insert or remove), so a poisoned lock is used as is.
    fn read_functions(&self) -> RwLockReadGuard<'_, Functions> {
        read_lock(&self.functions)
    }

    fn write_functions(&self) -> RwLockWriteGuard<'_, Functions> {
        write_lock(&self.functions)
    }

    /// Places `function` at `bdf`; false if taken.
    pub fn add(&self, bdf: Bdf, function: Arc<Mutex<dyn PciFunction>>) -> bool {
        let mut functions = self.write_functions();
        if functions.contains_key(&bdf) {
            return false;
        }
        functions.insert(bdf, function);
        true
    }

    /// Takes the function at `bdf` away; from now on the guest reads all-ones there.
    pub fn remove(&self, bdf: Bdf) -> Option<Arc<Mutex<dyn PciFunction>>> {
        self.write_functions().remove(&bdf)
    }

    /// Functions present.
    pub fn len(&self) -> usize {
        self.read_functions().len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.read_functions().is_empty()
    }

    /// Reads `data.len()` bytes at byte `offset` of register `reg` of `bdf`; absent functions
    /// read all-ones, which is how the guest learns they are absent.
    pub fn read(&self, bdf: Bdf, reg: usize, offset: u64, data: &mut [u8]) {
        let function = self.read_functions().get(&bdf).cloned();
        let value = match function {
            Some(f) if reg < 1024 => lock(&f).config_read(reg),
            _ => u32::MAX,
        };
        let bytes = value.to_le_bytes();
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(start + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes to `bdf`; ignored for absent functions.
    pub fn write(&self, bdf: Bdf, reg: usize, offset: u64, data: &[u8]) {
        // The map lock is not held while the function runs: a write may move its BAR, which
        // takes other locks.
        let function = self.read_functions().get(&bdf).cloned();
        if let Some(f) = function {
            if reg < 1024 && offset as usize + data.len() <= 4 {
                lock(&f).config_write(reg, offset, data);
            }
        }
    }
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8 (offset 0), CONFIG_DATA at 0xCFC..0xCFF
/// (offsets 4..7).
#[derive(Debug)]
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    /// Mechanism #1 for `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root, address: 0 }
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match decode_cf8(self.address) {
                Some((bdf, reg)) => self.root.read(bdf, reg, offset - 4, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Only dword writes latch CONFIG_ADDRESS; byte writes to 0xCF8/0xCF9 are other
            // chipset registers on real hardware.
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & 0x8fff_fffc
            }
            4..=7 => {
                if let Some((bdf, reg)) = decode_cf8(self.address) {
                    self.root.write(bdf, reg, offset - 4, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM window for `root`.
#[derive(Debug)]
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
    /// Buses the window decodes (the MCFG's end bus + 1).
    buses: u16,
}

impl PciConfigMmio {
    /// ECAM decoding `buses` buses.
    pub fn new(root: Arc<PciRoot>, buses: u16) -> Self {
        Self { root, buses }
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bdf, reg, byte) = decode_ecam(offset);
        if u16::from(bdf.bus()) >= self.buses || byte as usize + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        self.root.read(bdf, reg, byte, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bdf, reg, byte) = decode_ecam(offset);
        if u16::from(bdf.bus()) < self.buses && byte as usize + data.len() <= 4 {
            self.root.write(bdf, reg, byte, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::HostBridge;
    use super::*;

    fn root() -> Arc<PciRoot> {
        let r = PciRoot::new();
        assert!(r.add(Bdf::new(0, 0, 0), Arc::new(Mutex::new(HostBridge::new()))));
        assert!(!r.add(Bdf::new(0, 0, 0), Arc::new(Mutex::new(HostBridge::new()))));
        Arc::new(r)
    }

    #[test]
    fn cf8_decoding() {
        assert_eq!(decode_cf8(0x0000_0000), None);
        assert_eq!(decode_cf8(0x8000_0000), Some((Bdf::new(0, 0, 0), 0)));
        let (bdf, reg) = decode_cf8(0x8012_3a3c).unwrap();
        assert_eq!((bdf.bus(), bdf.device(), bdf.function(), reg), (0x12, 7, 2, 0x0f));
        // Extended register bits 27:24.
        assert_eq!(decode_cf8(0x8100_0000 | 4).unwrap().1, 0x41);
        assert_eq!(Bdf::new(1, 2, 3).to_string(), "01:02.3");
    }

    #[test]
    fn ecam_decoding() {
        let (bdf, reg, byte) = decode_ecam(0x0123_4567);
        assert_eq!((bdf.bus(), bdf.device(), bdf.function()), (0x12, 6, 4));
        assert_eq!((reg, byte), (0x567 >> 2, 3));
    }

    #[test]
    fn host_bridge_via_cf8() {
        let mut io = PciConfigIo::new(root());
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut id = [0u8; 4];
        io.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), u32::from(super::super::SIOVMM_VENDOR_ID) | 1 << 16);
        // Upper half only.
        let mut dev = [0u8; 2];
        io.read(6, &mut dev);
        assert_eq!(u16::from_le_bytes(dev), super::super::HOST_BRIDGE_DEVICE_ID);
        // Class code.
        io.write(0, &0x8000_0008u32.to_le_bytes());
        io.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id) >> 8, 0x06_0000);
        // Absent device reads all-ones.
        io.write(0, &0x8000_0800u32.to_le_bytes());
        io.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
        // Disabled address reads all-ones.
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
    }

    #[test]
    fn host_bridge_via_ecam_and_bus_limit() {
        let mut m = PciConfigMmio::new(root(), 1);
        let mut id = [0u8; 4];
        m.read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id) & 0xffff, u32::from(super::super::SIOVMM_VENDOR_ID));
        m.read(1 << 20, &mut id);
        assert_eq!(id, [0xff; 4], "bus 1 is outside the window");
        m.read(3, &mut id);
        assert_eq!(id, [0xff; 4], "straddles a dword");
        // Command register write through ECAM sticks (memory enable).
        m.write(4, &[0x02, 0x00]);
        let mut cmd = [0u8; 2];
        m.read(4, &mut cmd);
        assert_eq!(cmd, [0x02, 0]);
    }
}
