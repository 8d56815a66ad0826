//! The engine's workers, one per device, and how work is spread over them (data parallelism).
//!
//! Every worker has its own backend (context, weights, allocator). The handle sends each window of
//! a caller's requests to the least-loaded worker still in rotation: the one with the fewest
//! tokens sent to it and not yet answered; among equals, the next one after the worker chosen last
//! (round robin), so idle workers take turns. Each worker packs what it is sent into forwards as a
//! one-device engine does. A request's vectors do not depend on its batch, and workers of one kind
//! run the same forward, so results are bitwise the same whichever worker served them.
//!
//! A worker whose backend reports [`Error::DeviceLost`] is taken out of the rotation (one line on
//! stderr); the requests of the failed forward, those still queued with it and those that reach
//! it later are sent on to the others. With no worker left they fail with that `DeviceLost`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Mutex, OnceLock};

use crate::engine::worker::{Counters, Item, Msg};
use crate::model::backend::{Backend, Device, MemoryReport};
use crate::model::batch::{BatchOutput, PackedBatch};
use crate::model::config::ModelConfig;
use crate::{Error, Result};

/// One worker as the handle and the other workers see it.
pub(crate) struct Slot {
    pub device: Device,
    /// The backend's description, set once it has loaded.
    pub describe: OnceLock<String>,
    /// `None` once the engine is closing (the worker ends when its queue is done).
    tx: Mutex<Option<Sender<Msg>>>,
    /// Tokens sent to the worker and not yet answered (the load that dispatch balances).
    pub load: AtomicU64,
    /// Why the device was lost, once it is.
    lost: Mutex<Option<String>>,
    pub counters: Counters,
}

/// The workers of an engine.
pub(crate) struct Pool {
    pub slots: Vec<Slot>,
    /// Where the next tie-break starts.
    next: AtomicUsize,
}

/// Tokens of some requests, for the load (at least 1 each, so empty texts count too).
pub(crate) fn tokens(items: &[Item]) -> u64 {
    items.iter().map(|i| i.prepared.ids.len().max(1) as u64).sum()
}

impl Pool {
    /// A pool of workers for `devices`, each sending on its channel in `txs`.
    pub fn new(devices: &[Device], txs: Vec<Sender<Msg>>) -> Pool {
        let slots = devices
            .iter()
            .zip(txs)
            .map(|(&device, tx)| Slot {
                device,
                describe: OnceLock::new(),
                tx: Mutex::new(Some(tx)),
                load: AtomicU64::new(0),
                lost: Mutex::new(None),
                counters: Counters::default(),
            })
            .collect();
        Pool { slots, next: AtomicUsize::new(0) }
    }

    /// Why worker `i`'s device was lost, if it was.
    pub fn lost(&self, i: usize) -> Option<String> {
        self.slots[i].lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Closes every channel: each worker ends once its queue is done.
    pub fn close(&self) {
        for s in &self.slots {
            s.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    /// Sends a message to every worker (not only those in rotation); how many were sent.
    pub fn broadcast(&self, m: impl Fn() -> Msg) -> usize {
        let sent = |s: &Slot| {
            s.tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|t| t.send(m()).is_ok())
        };
        self.slots.iter().filter(|s| sent(s)).count()
    }

    /// The least-loaded worker in rotation (see the module documentation).
    fn pick(&self) -> Option<usize> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(u64, usize)> = None;
        for i in (0..n).map(|k| (start + k) % n) {
            if self.lost(i).is_some() {
                continue;
            }
            let load = self.slots[i].load.load(Ordering::Relaxed);
            if best.is_none_or(|(b, _)| load < b) {
                best = Some((load, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// Hands `items` to the least-loaded worker in rotation. Every item is answered exactly once:
    /// by that worker, or here with the error when none is left.
    pub fn dispatch(&self, mut items: Vec<Item>) {
        while !items.is_empty() {
            let Some(i) = self.pick() else {
                let first_lost = (0..self.slots.len()).find_map(|i| self.lost(i));
                let e = first_lost.map_or_else(stopped, Error::DeviceLost);
                for item in &items {
                    let _ = item.reply.send((item.slot, Err(e.clone())));
                }
                return;
            };
            let slot = &self.slots[i];
            let t = tokens(&items);
            slot.load.fetch_add(t, Ordering::Relaxed);
            let tx = slot.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let Some(tx) = tx else {
                for item in &items {
                    let _ = item.reply.send((item.slot, Err(stopped())));
                }
                return;
            };
            match tx.send(Msg::Work(items)) {
                Ok(()) => return,
                // The worker has ended (it can only panic out of its loop): out of rotation.
                Err(back) => {
                    slot.load.fetch_sub(t, Ordering::Relaxed);
                    let Msg::Work(back) = back.0 else { unreachable!("sent Work") };
                    items = back;
                    self.lose(i, "its worker thread has stopped", items.len());
                }
            }
        }
    }

    /// Takes worker `i` out of the rotation, with one line on stderr.
    pub fn lose(&self, i: usize, why: &str, requeued: usize) {
        {
            let mut lost = self.slots[i].lost.lock().unwrap_or_else(|p| p.into_inner());
            if lost.is_some() {
                return;
            }
            *lost = Some(why.to_string());
        }
        let left = (0..self.slots.len()).filter(|&k| self.lost(k).is_none()).count();
        let device = self.slots[i].device;
        if left == 0 {
            eprintln!(
                "jv4: device #{i} ({device}) lost ({why}); no device left, requests fail with device-lost"
            );
        } else {
            eprintln!(
                "jv4: device #{i} ({device}) lost ({why}); taken out of rotation, {requeued} queued \
                 request(s) re-sent to the {left} device(s) left"
            );
        }
    }
}

pub(crate) fn stopped() -> Error {
    Error::Internal("the engine's worker has stopped".into())
}

/// TEST HOOK (fault injection), not an API: a backend that runs `left` forwards, then reports
/// [`Error::DeviceLost`] for every later one, as a device with a sticky fault does. Set through
/// `EngineOptions::lose_device_after`.
pub(crate) struct LoseAfter {
    pub inner: Box<dyn Backend>,
    pub left: u64,
}

impl Backend for LoseAfter {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn forward(&mut self, batch: &PackedBatch) -> Result<BatchOutput> {
        if self.left == 0 {
            return Err(Error::DeviceLost("injected by the test hook lose_device_after".into()));
        }
        self.left -= 1;
        self.inner.forward(batch)
    }
    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }
    fn reset_peak(&mut self) {
        self.inner.reset_peak()
    }
}

/// TEST HOOK (fault injection), not an API: a backend that runs `left` forwards, then makes its
/// device fail for real before the next one ([`Backend::inject_fault`]: a kernel that traps), so
/// that forward meets a genuine sticky CUDA error. Set through `EngineOptions::fault_device_after`.
pub(crate) struct FaultAfter {
    pub inner: Box<dyn Backend>,
    /// Forwards before the fault; `None` once it is injected.
    pub left: Option<u64>,
}

impl Backend for FaultAfter {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn forward(&mut self, batch: &PackedBatch) -> Result<BatchOutput> {
        self.left = match self.left {
            Some(0) => {
                self.inner.inject_fault()?;
                None
            }
            left => left.map(|n| n - 1),
        };
        self.inner.forward(batch)
    }
    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }
    fn reset_peak(&mut self) {
        self.inner.reset_peak()
    }
}
