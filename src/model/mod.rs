//! The model layer: configuration, checkpoint reading and validation, and (later) the forward.
//! It never names a kernel and never touches cudarc: device work goes through `ops` and `cuda`.

pub mod backend;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod constants;
pub mod cpu;
pub mod folder;
pub mod gpu;
pub mod plan;
pub mod schema;
pub mod synth;
pub mod synth_tokenizer;
pub mod task;
pub mod weights;

pub use backend::{Backend, CpuBackend, CudaBackend, Device};
pub use batch::{BatchOutput, ImageInput, PackedBatch};
pub use checkpoint::{Checkpoint, Dtype, ExpectedTensor, Source, TensorInfo};
pub use config::{AdapterConfig, ModelConfig, PreprocessorConfig};
pub use task::Task;
