//! The engine's cases (tests/common/engine_cases.rs) on the CUDA backend: the same bodies the CPU
//! tests run in CI, with cosine instead of bitwise comparisons. The harness holds device 0; the
//! engine opens its own handle on its worker thread.

use crate::harness::Ctx;
use jv4::Device;

#[path = "../common/engine_cases.rs"]
pub mod engine_cases;

#[path = "../common/chunk_cases.rs"]
mod chunk_cases;

macro_rules! cuda_case {
    ($name:ident) => {
        pub fn $name(_ctx: &mut Ctx) -> Result<(), String> {
            engine_cases::$name(Device::Cuda(0))
        }
    };
}

cuda_case!(mixed_batch_equals_requests_alone);
cuda_case!(batch_invariant_bitwise);
cuda_case!(concurrent_callers_get_their_own_results);
cuda_case!(concurrent_callers_share_forwards);
cuda_case!(bad_requests_fail_alone);
cuda_case!(tiny_budget_serves_every_request);
cuda_case!(open_errors_are_clear);
cuda_case!(device_list_of_one_equals_device);

macro_rules! cuda_chunk_case {
    ($name:ident) => {
        pub fn $name(_ctx: &mut Ctx) -> Result<(), String> {
            chunk_cases::$name(Device::Cuda(0))
        }
    };
}

cuda_chunk_case!(chunks_equal_the_reference_pooling);
cuda_chunk_case!(chunk_vectors_are_independent_of_the_batch);
cuda_chunk_case!(bad_chunking_fails_alone);
cuda_chunk_case!(long_chunks_equal_the_reference_pooling);
