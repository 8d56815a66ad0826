//! CUDA graphs: a forward's kernels recorded once from the stream and replayed with one launch
//! (the host cost of hundreds of small launches, which dominates a short query, paid once).
//!
//! A graph holds the device addresses and launch shapes it was captured with: replaying it is
//! only right when the inputs sit at the same addresses with the same shapes, which the caller
//! (`model::gpu::graph`) guarantees. Capture uses the thread-local mode: a call on this thread
//! that is not allowed inside a capture (a synchronisation, an allocation) fails the capture
//! instead of running.

use cudarc::driver::{sys, CudaGraph};

use super::{cuda_err, Gpu};
use crate::Result;

/// A captured, instantiated graph, replayed on the stream it was captured from.
pub struct Graph(CudaGraph);

impl Graph {
    /// Enqueues one replay on the stream (does not wait).
    pub fn launch(&self) -> Result<()> {
        self.0.launch().map_err(|e| cuda_err("launch a CUDA graph", e))
    }
}

impl Gpu {
    /// Runs `record` with the stream capturing, and returns the instantiated graph of what it
    /// enqueued with `record`'s value. Nothing runs until the graph is launched. The stream leaves
    /// capture mode whatever happens: when `record` fails, its error is returned and the partial
    /// graph dropped.
    pub fn capture<R>(&self, record: impl FnOnce() -> Result<R>) -> Result<(Graph, R)> {
        let stream = self.stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| cuda_err("begin a graph capture", e))?;
        let recorded = record();
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        let value = recorded?;
        match ended.map_err(|e| cuda_err("end a graph capture", e))? {
            Some(g) => {
                // Uploaded now (ordered on the stream), so that the first replay does not do it.
                g.upload().map_err(|e| cuda_err("upload a CUDA graph", e))?;
                Ok((Graph(g), value))
            }
            None => Err(crate::Error::Internal("a graph capture recorded nothing".into())),
        }
    }
}
