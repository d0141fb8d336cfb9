//! An ADI's DMA seen through the virtual VT-d unit: each access is translated page by page
//! with the ADI function's requester ID, and every page must translate (and then lie in guest
//! RAM) before any byte moves.

use std::sync::Arc;

use devices::iommu::vtd::VtdUnit;
use siovmm_vfio::dma::{DmaFault, DmaSpace, GuestRam};

/// DMA of one requester through the unit.
#[derive(Debug)]
pub struct VtdDma {
    /// The unit.
    pub unit: Arc<VtdUnit>,
    /// Requester ID (bus << 8 | devfn).
    pub sid: u16,
    /// The guest's RAM.
    pub ram: GuestRam,
}

const PAGE: u64 = 4096;

impl VtdDma {
    /// (guest-physical address, length) of each page-bounded piece of `[iova, iova + len)`.
    fn pieces(&self, iova: u64, len: usize, write: bool) -> Result<Vec<(u64, usize)>, DmaFault> {
        let fault = DmaFault { addr: iova, len: len as u64 };
        iova.checked_add(len as u64).ok_or(fault)?;
        let mut out = Vec::with_capacity(len / PAGE as usize + 2);
        let mut at = iova;
        let end = iova + len as u64;
        while at < end {
            let n = (PAGE - at % PAGE).min(end - at);
            let gpa = self.unit.translate(self.sid, at, write).map_err(|f| DmaFault { addr: f.addr, len: n })?;
            out.push((gpa, n as usize));
            at += n;
        }
        Ok(out)
    }
}

impl DmaSpace for VtdDma {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let pieces = self.pieces(addr, buf.len(), false)?;
        let mut off = 0;
        for (gpa, n) in pieces {
            self.ram.read(gpa, &mut buf[off..off + n])?;
            off += n;
        }
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), DmaFault> {
        let pieces = self.pieces(addr, buf.len(), true)?;
        // All pieces must be writable RAM before the first byte is written.
        for &(gpa, n) in &pieces {
            self.ram.check(gpa, n)?;
        }
        let mut off = 0;
        for (gpa, n) in pieces {
            self.ram.write(gpa, &buf[off..off + n])?;
            off += n;
        }
        Ok(())
    }
}
