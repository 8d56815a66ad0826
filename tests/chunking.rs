//! Late chunking on the CPU backend with a synthetic tiny model (tests/common/chunk_cases.rs; the
//! GPU suite runs the same cases on CUDA).

#[path = "common/engine_cases.rs"]
mod engine_cases;

#[path = "common/chunk_cases.rs"]
mod chunk_cases;

use jv4::Device;

macro_rules! cpu_case {
    ($name:ident) => {
        #[test]
        fn $name() {
            if let Err(e) = chunk_cases::$name(Device::Cpu) {
                panic!("{e}");
            }
        }
    };
}

cpu_case!(chunks_equal_the_reference_pooling);
cpu_case!(chunk_vectors_are_independent_of_the_batch);
cpu_case!(bad_chunking_fails_alone);
cpu_case!(long_chunks_equal_the_reference_pooling);
