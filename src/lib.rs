//! jv4: a CUDA inference engine for jina-embeddings-v4.
//!
//! Layers, each depending only on the ones before it:
//! `kernels/*.cu` → [`cuda`] (context, kernels, allocator, cuBLAS) → [`ops`] (typed launches) →
//! [`model`] (config, checkpoint, weights) → [`engine`] (requests, tokenizer) → the `jv4` binary.
//! [`reference`] holds the plain f32 CPU version of every op; tests and benches compare against it.

pub mod cuda;
pub mod engine;
pub mod error;
pub mod model;
pub mod ops;
pub mod reference;
pub mod rng;

pub use error::{Error, Result};
