//! The engine end to end on the CPU backend with a synthetic tiny model (its own tokenizer):
//! mixed batches equal requests alone bit for bit, concurrent callers get their own results and
//! share forwards, bad requests fail alone, a tiny budget still serves everything. The GPU suite
//! runs the same cases on CUDA (tests/gpu/engine.rs).

#[path = "common/engine_cases.rs"]
mod engine_cases;

use jv4::Device;

macro_rules! cpu_case {
    ($name:ident) => {
        #[test]
        fn $name() {
            if let Err(e) = engine_cases::$name(Device::Cpu) {
                panic!("{e}");
            }
        }
    };
}

cpu_case!(mixed_batch_equals_requests_alone);
cpu_case!(batch_invariant_bitwise);
cpu_case!(concurrent_callers_get_their_own_results);
cpu_case!(concurrent_callers_share_forwards);
cpu_case!(bad_requests_fail_alone);
cpu_case!(tiny_budget_serves_every_request);
cpu_case!(open_errors_are_clear);
cpu_case!(device_list_of_one_equals_device);
