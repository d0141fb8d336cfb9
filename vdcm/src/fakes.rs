//! Test doubles for the VDCM's unit tests: a host device that only keeps IMS books (no worker
//! threads), and KVM's routing table (the interrupt crate's fake).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

pub(crate) use siovmm_interrupts::fake::FakeRoutes;
use siovmm_interrupts::MsiMessage;
use siovmm_vfio::dma::DmaSpace;
use siovmm_vfio::siov::{
    AdiId, DeviceInfo, DmaHandle, Error, Fired, HandleTarget, ImsGroup, ImsIndex, ImsStorage, Portal, QueueConfig,
    SiovDevice,
};
use vmm_sys_util::eventfd::EventFd;

/// A device of one ADI (0) whose IMS entries are plain books: masks, bound eventfds and
/// pending bits the test sets. Entries of other ADIs are refused as the trait requires.
#[derive(Default)]
pub(crate) struct FakeIms {
    pub(crate) masked: Mutex<BTreeMap<ImsIndex, bool>>,
    pub(crate) bound: Mutex<BTreeMap<ImsIndex, Arc<EventFd>>>,
    pub(crate) pending: Mutex<BTreeSet<ImsIndex>>,
    pub(crate) handles: Mutex<Vec<Option<HandleTarget>>>,
}

impl FakeIms {
    fn check(adi: AdiId) -> Result<(), Error> {
        if adi.0 == 0 {
            Ok(())
        } else {
            Err(Error::NoSuchAdi(adi.0))
        }
    }
}

impl SiovDevice for FakeIms {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { adis: 1, ims_entries: 1024, ims_storage: ImsStorage::OnDevice, max_queue_size: 256, portal: Default::default() }
    }
    fn ims_free_entries(&self) -> u32 {
        // Allocation always fails: every entry stays free.
        self.info().ims_entries
    }
    fn dma_bind(&self, _: Arc<dyn DmaSpace>) -> Result<DmaHandle, Error> {
        Err(Error::Resources("DMA bindings"))
    }
    fn dma_unbind(&self, handle: DmaHandle) -> Result<(), Error> {
        Err(Error::NoSuchDma(handle.0))
    }
    fn open_adi(&self, adi: AdiId, _: DmaHandle) -> Result<Portal, Error> {
        Err(Error::AdiBusy(adi.0))
    }
    fn close_adi(&self, adi: AdiId) -> Result<(), Error> {
        Self::check(adi)
    }
    fn reset_adi(&self, adi: AdiId) -> Result<(), Error> {
        Self::check(adi)
    }
    fn configure_queue(&self, adi: AdiId, _: Option<QueueConfig>) -> Result<(), Error> {
        Self::check(adi)
    }
    fn set_interrupt_handles(&self, adi: AdiId, handles: &[Option<HandleTarget>]) -> Result<(), Error> {
        Self::check(adi)?;
        *self.handles.lock().unwrap() = handles.to_vec();
        Ok(())
    }
    fn ims_alloc(&self, adi: AdiId, count: u32) -> Result<ImsGroup, Error> {
        Self::check(adi)?;
        Err(Error::ImsExhausted { requested: count, free: 0 })
    }
    fn ims_free(&self, adi: AdiId, group: ImsGroup) -> Result<(), Error> {
        Self::check(adi)?;
        Err(Error::ImsNotAllocated(group.first))
    }
    fn ims_message(&self, adi: AdiId, index: ImsIndex) -> Result<MsiMessage, Error> {
        Self::check(adi)?;
        Ok(MsiMessage { address: 0xfee0_0000, data: index })
    }
    fn ims_set_mask(&self, adi: AdiId, index: ImsIndex, masked: bool) -> Result<(), Error> {
        Self::check(adi)?;
        self.masked.lock().unwrap().insert(index, masked);
        Ok(())
    }
    fn ims_pending(&self, adi: AdiId, index: ImsIndex) -> Result<bool, Error> {
        Self::check(adi)?;
        Ok(self.pending.lock().unwrap().contains(&index))
    }
    fn queue_ims_set_mask(&self, adi: AdiId, n: u32, _: bool) -> Result<Option<Fired>, Error> {
        Self::check(adi)?;
        Err(Error::NoQueueEntry(n))
    }
    fn ims_bind(&self, adi: AdiId, index: ImsIndex, target: Option<Arc<EventFd>>) -> Result<(), Error> {
        Self::check(adi)?;
        match target {
            Some(fd) => self.bound.lock().unwrap().insert(index, fd),
            None => self.bound.lock().unwrap().remove(&index),
        };
        Ok(())
    }
}
