//! The GPU suite (`cargo test --test gpu`, or the packed binary on a GPU machine: see
//! tools/pack_gpu.sh). Skips with a message where there is no GPU.

mod alloc;
mod attention;
mod check;
mod harness;
mod ops;
mod weights;

fn main() {
    harness::run(&[
        ("kernels_resolve", ops::kernels_resolve),
        ("swiglu_matches_reference", ops::swiglu_matches_reference),
        ("swiglu_rejects_bad_shapes", ops::swiglu_rejects_bad_shapes),
        ("linear_matches_reference", ops::linear_matches_reference),
        ("linear_rejects_bad_shapes", ops::linear_rejects_bad_shapes),
        ("attention_matches_reference", attention::attention_matches_reference),
        ("attention_tolerance_catches_mistakes", attention::attention_tolerance_catches_mistakes),
        ("attention_rejects_bad_shapes", attention::attention_rejects_bad_shapes),
        ("alloc_round_trip", alloc::alloc_round_trip),
        ("alloc_no_growth_over_100_cycles", alloc::alloc_no_growth_over_100_cycles),
        ("alloc_budget_gives_typed_oom", alloc::alloc_budget_gives_typed_oom),
        ("weights_upload_round_trip", weights::weights_upload_round_trip),
    ]);
}
