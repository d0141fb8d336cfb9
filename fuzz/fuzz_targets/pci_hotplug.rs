//! The ACPI PCI hotplug registers (`devices::pci::hotplug`) as a guest drives them, between
//! the device manager's announcements, eject requests and waits, checked against a model: a
//! read of PCIU or PCID returns exactly the slots announced or asked for since the last read,
//! and a wait ends "ejected" exactly when the guest wrote the slot to PCEJ after it was asked.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use devices::pci::hotplug::{HotplugRegisters, HotplugSlots, BUS_STRIDE, PCEJ, PCID, PCIU};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::Input;
use vmm_sys_util::eventfd::EventFd;

const BUSES: u8 = 3;

#[derive(Default, Clone, Copy)]
struct Model {
    rescan: u32,
    eject: u32,
    awaited: u32,
    ejected: u32,
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else { return };
    let slots = Arc::new(HotplugSlots::new(BUSES, irq));
    let mut regs = HotplugRegisters(slots.clone());
    let mut model = [Model::default(); BUSES as usize];
    let span = HotplugRegisters::size(BUSES) + 16;
    while let Some(op) = input.u8() {
        let Some(arg) = input.u32() else { break };
        // Slots beyond the buses are asked for too: nothing must come of them.
        let (bus, device) = ((arg >> 8) as u8 % (BUSES + 1), (arg & 31) as u8);
        let bit = 1u32 << device;
        let m = model.get_mut(usize::from(bus));
        match op % 5 {
            0 => {
                slots.announce(bus, device);
                if let Some(m) = m {
                    m.rescan |= bit;
                }
            }
            1 => {
                slots.request_eject(bus, device);
                if let Some(m) = m {
                    m.eject |= bit;
                    m.awaited |= bit;
                    m.ejected &= !bit;
                }
            }
            2 => {
                let done = slots.wait_ejected(bus, device, Duration::ZERO);
                let expected = m.as_ref().is_some_and(|m| m.ejected & bit != 0);
                assert_eq!(done, expected, "wait on bus {bus} slot {device}");
                if let Some(m) = m {
                    m.ejected &= !bit;
                    m.awaited &= !bit;
                    m.eject &= !bit;
                }
            }
            3 => {
                // A guest write anywhere; 4 bytes to a PCEJ register is an eject.
                let offset = u64::from(arg >> 16) % span;
                let value = input.u32().unwrap_or(0);
                let len = usize::from(input.u8().unwrap_or(4) % 9);
                regs.write(offset, &value.to_le_bytes().repeat(2)[..len]);
                if len == 4 && offset % BUS_STRIDE == PCEJ {
                    if let Some(m) = model.get_mut((offset / BUS_STRIDE) as usize) {
                        m.ejected |= value & m.awaited;
                    }
                }
            }
            _ => {
                let offset = u64::from(arg >> 16) % span;
                let len = usize::from(input.u8().unwrap_or(4) % 9);
                let mut data = vec![0xa5u8; len];
                regs.read(offset, &mut data);
                let mut expected = vec![0u8; len];
                if len == 4 && offset % 4 == 0 {
                    if let Some(m) = model.get_mut((offset / BUS_STRIDE) as usize) {
                        let v = match offset % BUS_STRIDE {
                            PCIU => std::mem::take(&mut m.rescan),
                            PCID => std::mem::take(&mut m.eject),
                            _ => 0,
                        };
                        expected.copy_from_slice(&v.to_le_bytes());
                    }
                }
                assert_eq!(data, expected, "read of {len} bytes at {offset:#x}");
            }
        }
    }
});
