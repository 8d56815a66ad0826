//! jv4: an inference engine for [jina-embeddings-v4](https://huggingface.co/jinaai/jina-embeddings-v4)
//! on NVIDIA GPUs (hand-written CUDA kernels) with an exact f32 CPU backend.
//!
//! The API a host needs is re-exported here: open an [`Engine`] on a model folder with
//! [`EngineOptions`], send it [`Request`]s (texts, images, token ids; any task, prompt, output and
//! Matryoshka width), get one [`Embedding`] (or [`Error`]) per request back, in order. The handle
//! is `Send + Sync + Clone`: call it from as many threads as you like; requests that arrive
//! together are packed into the same forward.
//!
//! ```
//! # fn main() -> jv4::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! # use jv4::model::synth::{write_checkpoint, Preset, SynthSpec};
//! # let spec = SynthSpec { seed: 7, preset: Preset::Tiny, adapter_dtype: jv4::model::Dtype::BF16 };
//! # write_checkpoint(dir.path(), &spec)?;
//! use jv4::{Device, Engine, EngineOptions, PromptName, Request};
//! let engine = Engine::open(dir.path(), EngineOptions { device: Device::Cpu, ..Default::default() })?;
//! let results = engine.embed(&[
//!     Request::text("how do I sort a list?"),
//!     Request::text("Use sorted(xs).").prompt(PromptName::Passage),
//! ]);
//! let q = results[0].as_ref().unwrap().single.as_ref().unwrap();
//! let p = results[1].as_ref().unwrap().single.as_ref().unwrap();
//! let cos: f32 = q.iter().zip(p).map(|(a, b)| a * b).sum();
//! assert!(cos.abs() <= 1.0 + 1e-5);
//! # Ok(())
//! # }
//! ```
//!
//! Layers, each depending only on the ones before it:
//! `kernels/*.cu` → [`cuda`] (context, kernels, allocator, cuBLAS) → [`ops`] (typed launches) →
//! [`model`] (config, checkpoint, weights, the packed batch, the CPU and CUDA backends) →
//! [`engine`] (requests, tokenizer, images, the worker) → [`server`] (the HTTP server of
//! `jv4 serve`) → the `jv4` binary. [`cuda`], [`ops`] and
//! [`reference`] (the plain f32 CPU version of every op, the oracle of the tests) are public for
//! kernel research and benchmarks; a host needs none of them.

pub mod capi;
pub mod cuda;
pub mod diag;
pub mod engine;
pub mod error;
pub mod host_malloc;
pub mod model;
pub mod ops;
pub mod reference;
pub mod rng;
pub mod server;

pub use cuda::parse_bytes;
pub use engine::{
    Chunk, Chunking, DeviceState, Embedding, Engine, EngineOptions, EngineStats, Input, Limits, LoraMode,
    MultiVector, OutputKind, PromptName, Request, Truncation,
};
pub use error::{Error, Result};
pub use model::{Device, Task};
