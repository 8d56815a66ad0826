//! The engine's worker: one thread per device that owns the [`Backend`] (created on it, so a
//! CUDA context is only current there) and runs every forward. Callers send prepared requests;
//! the worker queues them from all callers, packs them in arrival order into forwards under the
//! token and patch budgets, and sends each result back to the caller it came from.
//!
//! Several devices: one worker each, see pool.rs; a worker whose device is lost
//! hands its requests back to the pool and forwards whatever still reaches it.
//!
//! Batching: whatever has queued while the previous forward ran is packed together (continuous
//! batching). With a wait window, a forward that is not yet full waits up to that long for more
//! requests first.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::pool::{tokens, Pool};
use crate::engine::prepare::Prepared;
use crate::engine::request::{matryoshka, Chunk, Embedding, MultiVector, OutputKind};
use crate::model::backend::{Backend, MemoryReport};
use crate::model::batch::{BatchOutput, PackedBatch};
use crate::model::Task;
use crate::{Error, Result};

/// One request on its way to a forward.
pub(crate) struct Item {
    /// The caller's index of the request.
    pub slot: usize,
    pub prepared: Prepared,
    pub task: Task,
    pub output: OutputKind,
    pub dims: Option<usize>,
    /// Where its result goes.
    pub reply: Sender<(usize, Result<Embedding>)>,
    /// Set when the caller has given up: the item is answered Cancelled instead of run.
    pub cancel: Option<crate::engine::Cancel>,
    /// Whether it was in a forward on a device that was then lost. Such a request is re-sent once;
    /// in a forward that loses a second device it fails with that error (it may be the cause: a
    /// request that faults every device must not take them all down in turn).
    pub resent: bool,
}

/// What the worker is sent.
pub(crate) enum Msg {
    /// Requests to embed.
    Work(Vec<Item>),
    /// Report the backend's memory.
    Memory(Sender<MemoryReport>),
    /// Restart the backend's activation peak.
    ResetPeak,
}

/// Counters of the work done, shared with the handle.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub forwards: AtomicU64,
    pub sequences: AtomicU64,
    pub tokens: AtomicU64,
    /// Forwards by sequences packed: bucket `b` counts those of at most `2^b` (the last, more).
    pub batch_sizes: [AtomicU64; BATCH_BUCKETS],
}

/// Buckets of [`Counters::batch_sizes`]: at most 1, 2, 4, ..., 2048 sequences, then more.
pub(crate) const BATCH_BUCKETS: usize = 13;

/// Packing limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budgets {
    pub tokens: usize,
    pub patches: usize,
    pub wait: Duration,
}

/// The worker's loop: until every handle is gone (the channel closes). `me`: this worker's slot
/// in `pool`.
pub(crate) fn run(
    mut backend: Box<dyn Backend>,
    rx: Receiver<Msg>,
    budgets: Budgets,
    pool: Arc<Pool>,
    me: usize,
) {
    let slot = &pool.slots[me];
    let counters = &slot.counters;
    let mut queue: VecDeque<Item> = VecDeque::new();
    let mut open = true;
    loop {
        if queue.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(m) => handle(m, &mut queue, backend.as_mut()),
                Err(_) => return,
            }
            continue;
        }
        // Take what has queued meanwhile; then, while the next forward is not full, wait for more
        // up to the window.
        let deadline = Instant::now() + budgets.wait;
        while open {
            let (tokens, patches) = queued(&queue);
            if tokens >= budgets.tokens || patches >= budgets.patches {
                break;
            }
            let now = Instant::now();
            let got = match rx.try_recv() {
                Ok(m) => Ok(m),
                Err(_) if now >= deadline => break,
                Err(_) => rx.recv_timeout(deadline - now),
            };
            match got {
                Ok(m) => handle(m, &mut queue, backend.as_mut()),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        }
        let dropped = drop_cancelled(&mut queue);
        let group = take_group(&mut queue, budgets);
        let t = tokens(&group) + dropped;
        let lost = run_group(backend.as_mut(), group, counters);
        slot.load.fetch_sub(t, Ordering::Relaxed);
        if let Some((e, ran)) = lost {
            // The failed forward's requests go on once; the queued ones (never run) always.
            let (failed, mut items): (Vec<Item>, Vec<Item>) = ran.into_iter().partition(|i| i.resent);
            for item in &mut items {
                item.resent = true;
            }
            // Out of the rotation first, so that nothing handed on comes back here.
            items.extend(queue.drain(..));
            let why = match e {
                Error::DeviceLost(m) => m,
                e => e.to_string(),
            };
            // Reported lost before anyone hears of it.
            pool.lose(me, &why, items.len());
            for item in &failed {
                answer(item, Err(Error::DeviceLost(why.clone())));
            }
            pool.dispatch(items);
            for m in rx {
                match m {
                    Msg::Work(items) => pool.dispatch(items),
                    m => handle(m, &mut queue, backend.as_mut()),
                }
            }
            return;
        }
    }
}

fn handle(m: Msg, queue: &mut VecDeque<Item>, backend: &mut dyn Backend) {
    match m {
        Msg::Work(items) => queue.extend(items),
        Msg::Memory(reply) => {
            let _ = reply.send(backend.memory());
        }
        Msg::ResetPeak => backend.reset_peak(),
    }
}

/// Answers the items whose caller has given up, and removes them from the queue; their tokens.
fn drop_cancelled(queue: &mut VecDeque<Item>) -> u64 {
    let mut dropped = 0;
    queue.retain(|item| {
        let gone = item.cancel.as_ref().is_some_and(|c| c.is_cancelled());
        if gone {
            answer(item, Err(crate::engine::cancelled_error()));
            dropped += tokens(std::slice::from_ref(item));
        }
        !gone
    });
    dropped
}

fn queued(queue: &VecDeque<Item>) -> (usize, usize) {
    queue.iter().fold((0, 0), |(t, p), i| (t + i.prepared.ids.len(), p + i.prepared.patches()))
}

/// The longest prefix of the queue that fits the budgets (at least one request: a request over
/// the budget runs alone).
fn take_group(queue: &mut VecDeque<Item>, b: Budgets) -> Vec<Item> {
    let (mut n, mut tokens, mut patches) = (0, 0, 0);
    for item in queue.iter() {
        let (t, p) = (item.prepared.ids.len(), item.prepared.patches());
        if n > 0 && (tokens + t > b.tokens || patches + p > b.patches) {
            break;
        }
        tokens += t;
        patches += p;
        n += 1;
    }
    queue.drain(..n).collect()
}

/// One forward for `group`. On out-of-memory, or an input error the batch cannot place, the
/// group is halved and each half tried again, so that only the request(s) at fault fail; any
/// other error is every member's, except [`Error::DeviceLost`]: then the error and the requests
/// not yet answered are returned, for other devices to serve.
fn run_group(
    backend: &mut dyn Backend,
    mut group: Vec<Item>,
    counters: &Counters,
) -> Option<(Error, Vec<Item>)> {
    // Same-task requests side by side: task-merged weights run one GEMM per run of a task.
    group.sort_by_key(|i| i.task.index());
    let mut batch = PackedBatch::new(backend.config());
    let mut members = Vec::with_capacity(group.len());
    for item in group {
        let image = item.prepared.image.clone().into_iter().collect();
        let spans: Vec<(usize, usize)> =
            item.prepared.chunks.iter().flatten().map(|c| (c.tokens.start, c.tokens.end)).collect();
        match batch.push_chunked(&item.prepared.ids, item.task, image, &spans) {
            Ok(()) => members.push(item),
            Err(e) => answer(&item, Err(e)),
        }
    }
    if members.is_empty() {
        return None;
    }
    batch.want_multi = members.iter().any(|i| i.output.multi());
    let result = catch_unwind(AssertUnwindSafe(|| backend.forward(&batch)))
        .unwrap_or_else(|p| Err(Error::Internal(format!("the forward panicked: {}", panic_message(&p)))));
    match result {
        Ok(out) => {
            counters.forwards.fetch_add(1, Ordering::Relaxed);
            counters.sequences.fetch_add(batch.sequences() as u64, Ordering::Relaxed);
            counters.tokens.fetch_add(batch.tokens() as u64, Ordering::Relaxed);
            let bucket = (batch.sequences().max(1).next_power_of_two().trailing_zeros() as usize)
                .min(BATCH_BUCKETS - 1);
            counters.batch_sizes[bucket].fetch_add(1, Ordering::Relaxed);
            let hid = backend.config().text.hidden_size;
            let pd = backend.config().multi_vector_projector_dim;
            for (k, item) in members.iter().enumerate() {
                answer(item, finite(embedding(&out, &batch, k, item, hid, pd)));
            }
            None
        }
        Err(Error::OutOfMemory { .. } | Error::Input(_)) if members.len() > 1 => {
            let mut rest = members;
            let second = rest.split_off(rest.len() / 2);
            match run_group(backend, rest, counters) {
                Some((e, mut items)) => {
                    items.extend(second);
                    Some((e, items))
                }
                None => run_group(backend, second, counters),
            }
        }
        Err(e @ Error::DeviceLost(_)) => Some((e, members)),
        Err(e) => {
            for item in &members {
                answer(item, Err(e.clone()));
            }
            None
        }
    }
}

fn embedding(
    out: &BatchOutput,
    batch: &PackedBatch,
    k: usize,
    item: &Item,
    hid: usize,
    pd: usize,
) -> Embedding {
    let rows = batch.rows(k);
    let width = |v: &[f32]| match item.dims {
        Some(d) if d < hid => matryoshka(v, d),
        _ => v.to_vec(),
    };
    // Multi-vector rows `[a, b)` of this sequence.
    let multi = |a: usize, b: usize| MultiVector {
        dim: pd,
        data: out
            .multi
            .as_ref()
            .map_or_else(Vec::new, |m| m[(rows.start + a) * pd..(rows.start + b) * pd].to_vec()),
    };
    let chunks = item.prepared.chunks.as_ref().map(|plan| {
        plan.iter()
            .zip(batch.chunks(k))
            .map(|(c, j)| Chunk {
                single: item.output.single().then(|| width(&out.chunk_single[j * hid..(j + 1) * hid])),
                multi: item.output.multi().then(|| multi(c.tokens.start, c.tokens.end)),
                tokens: c.tokens.clone(),
                chars: c.chars.clone(),
            })
            .collect()
    });
    Embedding {
        single: item.output.single().then(|| width(&out.single[k * hid..(k + 1) * hid])),
        multi: item.output.multi().then(|| multi(0, rows.len())),
        tokens: rows.len(),
        dropped: item.prepared.dropped,
        chunks,
    }
}

/// The embedding, or [`Error::NonFinite`] if any value of it is NaN or infinite.
fn finite(e: Embedding) -> Result<Embedding> {
    let bad = |v: &[f32]| v.iter().filter(|x| !x.is_finite()).count();
    let (mut s, mut m) = (e.single.as_deref().map_or(0, bad), e.multi.as_ref().map_or(0, |m| bad(&m.data)));
    for c in e.chunks.iter().flatten() {
        s += c.single.as_deref().map_or(0, bad);
        m += c.multi.as_ref().map_or(0, |m| bad(&m.data));
    }
    if s + m > 0 {
        return Err(Error::NonFinite(format!(
            "{s} single-vector and {m} multi-vector values of this request's {} tokens are NaN or infinite",
            e.tokens
        )));
    }
    Ok(e)
}

fn answer(item: &Item, r: Result<Embedding>) {
    // The caller may have gone (its thread ended): nothing to do then.
    let _ = item.reply.send((item.slot, r));
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_outputs_are_an_error() {
        let good =
            Embedding { single: Some(vec![0.6, 0.8]), multi: None, tokens: 1, dropped: 0, chunks: None };
        assert_eq!(finite(good.clone()).unwrap(), good);
        let nan = Embedding { single: Some(vec![f32::NAN, 0.0]), ..good.clone() };
        let e = finite(nan).unwrap_err();
        assert!(matches!(e, Error::NonFinite(_)) && e.to_string().contains("1 single-vector"), "{e}");
        let inf =
            Embedding { multi: Some(MultiVector { dim: 2, data: vec![1.0, f32::INFINITY] }), ..good.clone() };
        assert!(finite(inf).unwrap_err().to_string().contains("1 multi-vector"));
        let chunk = Chunk { single: Some(vec![f32::NAN, 1.0]), multi: None, tokens: 0..1, chars: 0..1 };
        let in_chunk = Embedding { chunks: Some(vec![chunk]), ..good };
        assert!(finite(in_chunk).unwrap_err().to_string().contains("1 single-vector"));
    }
}
