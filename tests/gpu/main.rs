//! The GPU suite (`cargo test --test gpu`, or the packed binary on a GPU machine: see
//! tools/pack_gpu.sh). Skips with a message where there is no GPU.

mod alloc;
mod attention;
mod check;
mod harness;
mod model;
mod ops;
mod textops;
mod visionops;
mod weights;

fn main() {
    harness::run(&[
        ("kernels_resolve", ops::kernels_resolve),
        ("swiglu_matches_reference", ops::swiglu_matches_reference),
        ("swiglu_rejects_bad_shapes", ops::swiglu_rejects_bad_shapes),
        ("linear_matches_reference", ops::linear_matches_reference),
        ("linear_rejects_bad_shapes", ops::linear_rejects_bad_shapes),
        ("embedding_matches_reference", textops::embedding_matches_reference),
        ("rmsnorm_matches_reference", textops::rmsnorm_matches_reference),
        ("mrope_matches_reference", textops::mrope_matches_reference),
        ("vision_rope_matches_reference", textops::vision_rope_matches_reference),
        ("mean_pool_l2_matches_reference", textops::mean_pool_l2_matches_reference),
        ("mean_pool_l2_invalid_spans_give_nan", textops::mean_pool_l2_invalid_spans_give_nan),
        ("l2_rows_matches_reference", textops::l2_rows_matches_reference),
        ("lora_mask_matches_cpu", textops::lora_mask_matches_cpu),
        ("textops_reject_bad_shapes", textops::textops_reject_bad_shapes),
        ("residual_f32_ops_match_reference", textops::residual_f32_ops_match_reference),
        ("gelu_matches_reference", visionops::gelu_matches_reference),
        ("gather_rows_matches_reference", visionops::gather_rows_matches_reference),
        ("scatter_rows_f32_matches_reference", visionops::scatter_rows_f32_matches_reference),
        ("attention_matches_reference", attention::attention_matches_reference),
        ("attention_tolerance_catches_mistakes", attention::attention_tolerance_catches_mistakes),
        ("attention_rejects_bad_shapes", attention::attention_rejects_bad_shapes),
        ("attention_batch_invariant", attention::attention_batch_invariant),
        ("alloc_round_trip", alloc::alloc_round_trip),
        ("alloc_no_growth_over_100_cycles", alloc::alloc_no_growth_over_100_cycles),
        ("alloc_budget_gives_typed_oom", alloc::alloc_budget_gives_typed_oom),
        ("weights_upload_round_trip", weights::weights_upload_round_trip),
        ("text_forward_matches_cpu_layer_by_layer", model::text_forward_matches_cpu_layer_by_layer),
        ("text_outputs_match_fp32_reference", model::text_outputs_match_fp32_reference),
        ("image_outputs_match_fp32_reference", model::image_outputs_match_fp32_reference),
    ]);
}
