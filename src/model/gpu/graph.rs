//! Short text forwards through CUDA graphs (issue 10, deliverable 3). A 16-token query runs ~900
//! kernels whose host-side launch cost exceeds their GPU time; a graph replays all of them with
//! one launch.
//!
//! A graph is captured per bucket ([`Graphs::bucket`]): token rows rounded up (to 16 up to 128
//! rows, to 64 up to [`GRAPH_MAX_TOKENS`]), segments, the longest segment and pooling spans each
//! rounded up to a power of two, and for task-merged weights the one task of the batch. The batch
//! is staged padded to its bucket (`Inputs::write`): padding rows lie in no segment, extra
//! segments are empty, extra spans pool a dummy row. What a request gets is bitwise what the
//! eager forward gives it: every GEMM configuration the engine picks gives the same bits at every
//! height (`cuda::blas`), and the attention computes each segment alone.
//!
//! Addresses: every graph's memory comes from its own small pool ([`GRAPH_POOL_BYTES`], mapped up
//! front), used only here, one forward at a time, always from empty. The same bucket therefore
//! allocates the same addresses on every forward: the inputs are staged (outside the graph) where
//! the captured kernels read them, the outputs are read back from where they wrote, and the
//! activations of all graphs share the pool (their replays are ordered on the one stream).

use super::{fetch, Dims, GpuModel, TaskRun, Trace};
use crate::cuda::lru::Lru;
use crate::cuda::{DView, DeviceAllocator, Gpu, Graph, DEFAULT_PAGE_SIZE};
use crate::model::batch::{BatchOutput, PackedBatch};
use crate::{Error, Result};

/// The longest batch (in tokens) a graph runs; longer ones run eagerly (their kernels are long
/// enough to hide the launches).
pub const GRAPH_MAX_TOKENS: usize = 512;
/// Device memory of the graph pool: the activations of a [`GRAPH_MAX_TOKENS`]-row forward of the
/// full model (≈ 60 MB with page rounding) with room to spare.
pub const GRAPH_POOL_BYTES: u64 = 128 << 20;
/// Graphs held at most (least recently used dropped first); each holds only host-side state and
/// its instantiated nodes, no activation memory of its own.
pub const GRAPH_CACHE: usize = 64;
/// `JV4_GRAPHS=0` turns graphs off (every forward eager).
pub const GRAPHS_ENV: &str = "JV4_GRAPHS";

/// What a graph is captured for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GraphKey {
    dims: Dims,
    /// The batch's task, for task-merged weights (their GEMMs run per task); `None` for stacked
    /// LoRA (the row tasks are device data).
    task: Option<u8>,
}

/// A captured graph and the addresses it reads and writes.
struct Captured {
    graph: Graph,
    input: u64,
    single: u64,
    multi: u64,
}

/// Counters, for reports and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Forwards that replayed a held graph.
    pub replays: u64,
    /// Graphs captured (each also ran its forward).
    pub captures: u64,
    /// Short forwards that ran eagerly because a graph failed (after the first failure every
    /// forward does: a graph that fails once is not retried).
    pub fallbacks: u64,
    /// Graphs held now.
    pub held: usize,
}

/// The graphs of one GPU and their memory pool (module documentation).
pub struct Graphs {
    // Field order is drop order: the graphs go before the pool they use.
    cache: Lru<GraphKey, Captured>,
    mem: DeviceAllocator,
    stats: GraphStats,
}

impl Graphs {
    /// An empty cache with its pool, every page mapped now (a capture must not map memory).
    pub fn new(gpu: &Gpu) -> Result<Graphs> {
        let mut mem = DeviceAllocator::new(gpu, GRAPH_POOL_BYTES, DEFAULT_PAGE_SIZE)?;
        let all = mem.stats().budget;
        let block = mem.alloc(all)?;
        mem.free(block);
        Ok(Graphs { mem, cache: Lru::new(GRAPH_CACHE), stats: GraphStats::default() })
    }

    /// Whether graphs are on: not turned off by `$JV4_GRAPHS=0`.
    pub fn enabled_by_env() -> bool {
        std::env::var(GRAPHS_ENV).map_or(true, |v| v.trim() != "0")
    }

    /// The counters.
    pub fn stats(&self) -> GraphStats {
        GraphStats { held: self.cache.len(), ..self.stats }
    }

    /// The bucket a batch runs in, or `None` when it runs eagerly (images, over
    /// [`GRAPH_MAX_TOKENS`] tokens).
    pub fn bucket(batch: &PackedBatch) -> Option<Dims> {
        let n = batch.tokens();
        if n == 0 || n > GRAPH_MAX_TOKENS || batch.sequences() == 0 || !batch.images().is_empty() {
            return None;
        }
        let own = Dims::of(batch);
        let tokens = if n <= 128 { n.next_multiple_of(16) } else { n.next_multiple_of(64) };
        Some(Dims {
            tokens,
            padded: true,
            segments: own.segments.next_power_of_two(),
            max_seqlen: own.max_seqlen.next_power_of_two().min(tokens),
            spans: own.spans.next_power_of_two(),
        })
    }

    /// Stages the batch padded to `key`, captures the bucket's graph if it is not held, replays it
    /// and downloads the batch's outputs.
    fn run(
        &mut self,
        model: &GpuModel,
        gpu: &Gpu,
        key: GraphKey,
        batch: &PackedBatch,
    ) -> Result<BatchOutput> {
        let Graphs { mem, cache, stats } = self;
        let arena = mem.arena();
        let inputs = model.plan_inputs(batch, &key.dims)?;
        let staged = arena.upload(gpu, &inputs.lay, |st| inputs.write(st, batch, &key.dims, key.task))?;
        let held = cache.get_mut(&key).is_some();
        if !held {
            let runs: Vec<TaskRun> = key
                .task
                .map(|t| TaskRun { rows: 0..key.dims.tokens, task: t as usize })
                .into_iter()
                .collect();
            let (graph, (single, multi)) = gpu.capture(|| {
                let out =
                    model.compute(gpu, &arena, &staged, &inputs, &key.dims, &runs, true, &mut Trace(None))?;
                let multi = out.multi.as_ref().map_or(0, |m| m.view().ptr());
                Ok((out.single.view().ptr(), multi))
            })?;
            stats.captures += 1;
            cache.insert(key, Captured { graph, input: staged.ptr(), single, multi });
        }
        let c = cache.get_mut(&key).ok_or_else(|| Error::Internal("a captured graph went missing".into()))?;
        if c.input != staged.ptr() {
            return Err(Error::Internal(format!(
                "graph inputs staged at {:#x}, captured reading {:#x}",
                staged.ptr(),
                c.input
            )));
        }
        c.graph.launch()?;
        if held {
            stats.replays += 1;
        }
        let (hid, pd) = (model.cfg.text.hidden_size, model.cfg.multi_vector_projector_dim);
        // SAFETY: the graph wrote these outputs in the pool, which lives as long as `self` and
        // which nothing else writes until this forward's downloads (below, in stream order after
        // the replay) are done; the shapes are those they were captured with.
        let single = unsafe { DView::<f32>::from_raw(c.single, &[key.dims.spans, hid]) };
        // SAFETY: as above; every graph computes the multi-vector rows.
        let multi = unsafe { DView::<f32>::from_raw(c.multi, &[key.dims.tokens, pd]) };
        fetch(gpu, &single, Some(&multi), batch, batch.want_multi)
    }
}

impl GpuModel {
    /// [`GpuModel::forward`], through a graph of `graphs` when the batch is short text (see
    /// [`Graphs::bucket`]; for task-merged weights also of one task); same results, bitwise. A
    /// graph that cannot be captured or run (other than a lost device) is reported once, and this
    /// forward and every later one run eagerly (counted in [`GraphStats::fallbacks`]).
    pub fn forward_graphed(
        &self,
        gpu: &Gpu,
        mem: &mut DeviceAllocator,
        graphs: &mut Graphs,
        batch: &PackedBatch,
    ) -> Result<BatchOutput> {
        let Some(dims) = Graphs::bucket(batch) else { return self.forward(gpu, mem, batch) };
        let task = if self.w.merged() {
            let rt = batch.row_task();
            match rt.first() {
                Some(&t) if rt.iter().all(|&r| r == t) => Some(t),
                _ => return self.forward(gpu, mem, batch),
            }
        } else {
            None
        };
        if graphs.stats.fallbacks > 0 {
            graphs.stats.fallbacks += 1;
            return self.forward(gpu, mem, batch);
        }
        match graphs.run(self, gpu, GraphKey { dims, task }, batch) {
            Ok(out) => Ok(out),
            Err(e @ Error::DeviceLost(_)) => Err(e),
            Err(e) => {
                // A sticky fault can surface inside a replay as a library error (cuBLAS reports an
                // execution failure): a synchronise tells, and a lost device is not retried.
                if let Err(lost @ Error::DeviceLost(_)) = gpu.sync() {
                    return Err(lost);
                }
                eprintln!("jv4: a CUDA graph failed ({e}); from now on every forward runs without graphs");
                graphs.stats.fallbacks += 1;
                self.forward(gpu, mem, batch)
            }
        }
    }
}
