//! The engine's one error type. Every variant names what was wrong (the file, the tensor, the
//! kernel, the input) so that a message alone is enough to fix the cause, and callers can match
//! on the kind: e.g. `Error::OutOfMemory` means "split the batch and retry".

use std::path::PathBuf;
use std::sync::Arc;

/// Everything that can go wrong in the engine. `Clone`, so that one failure can be every member's
/// of a batch without losing its kind; more kinds may come (`#[non_exhaustive]`).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said (shared, so that the error can be cloned).
        source: Arc<std::io::Error>,
    },
    /// A configuration file is missing a key, malformed, or inconsistent.
    #[error("{}: {msg}", file.display())]
    Config {
        /// The configuration file.
        file: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A checkpoint file is malformed (bad header, truncated data, broken index).
    #[error("{}: {msg}", file.display())]
    Checkpoint {
        /// The safetensors or index file.
        file: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// One tensor of a checkpoint is missing, unexpected, duplicated, or has the wrong shape or dtype.
    #[error("tensor `{name}` ({}): {msg}", file.display())]
    Tensor {
        /// The tensor's name as stored in the file.
        name: String,
        /// The file it is in (or should be in).
        file: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request is invalid (unknown task, text too long in strict mode, bad dims, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// The device memory budget cannot hold this allocation. Recoverable: free memory or split
    /// the work and try again.
    #[error("out of device memory: {requested} bytes requested, {in_use} in use, budget {budget} bytes")]
    OutOfMemory {
        /// Bytes asked for (rounded up to whole pages).
        requested: u64,
        /// Bytes held by live allocations.
        in_use: u64,
        /// The hard limit.
        budget: u64,
    },
    /// No usable CUDA driver or GPU on this machine.
    #[error("no GPU available: {0}")]
    NoGpu(String),
    /// A CUDA driver call failed.
    #[error("CUDA: {what}: {msg}")]
    Cuda {
        /// What the engine was doing.
        what: String,
        /// The driver's error.
        msg: String,
    },
    /// The GPU hit a sticky error (an illegal address, a failed launch, an ECC error, ...): its
    /// context is unusable, so this engine fails every later call with this error at once. Drop
    /// the engine and open a new one (in a new process if the device itself is broken).
    #[error("the GPU is lost: {0}; drop this engine and open a new one")]
    DeviceLost(String),
    /// A kernel could not be loaded or launched.
    #[error("kernel `{kernel}`: {msg}")]
    Kernel {
        /// The kernel's symbol.
        kernel: &'static str,
        /// What failed.
        msg: String,
    },
    /// A cuBLAS / cuBLASLt call failed.
    #[error("cuBLAS: {0}")]
    Blas(String),
    /// A forward produced NaN or infinite values for this request: it is not returned (a wrong
    /// vector must never leave the engine).
    #[error("non-finite output: {0}")]
    NonFinite(String),
    /// The caller gave up on the request before it ran (its [`crate::engine::Cancel`] was set:
    /// e.g. a server's client went away or its time ran out).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A bug or a broken invariant inside the engine (e.g. its worker thread stopped); the
    /// message says where.
    #[error("internal error: {0}")]
    Internal(String),
    /// An op was called with operands of the wrong shape, size or alignment.
    #[error("{op}: {msg}")]
    Shape {
        /// The op.
        op: &'static str,
        /// What does not fit.
        msg: String,
    },
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source: Arc::new(source) }
    }
}
