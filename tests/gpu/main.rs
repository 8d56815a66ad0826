//! The GPU suite (`cargo test --test gpu`, or the packed binary on a GPU machine: see
//! tools/pack_gpu.sh). Skips with a message where there is no GPU.
//!
//! One file per op family of `src/ops` (`swiglu.rs`, `linear.rs`, `embedding.rs`, `rmsnorm.rs`,
//! `rope.rs`, `pool.rs`, `lora.rs`, `gelu.rs`, `rows.rs`, `attention.rs`), each testing its ops
//! against the op-named CPU reference at the shapes of the family's `CASES`.

mod alloc;
mod attention;
mod check;
mod embedding;
mod engine;
mod fault;
mod fold;
mod gelu;
mod harness;
mod kernels;
mod linear;
mod lora;
mod model;
mod oom;
mod pool;
mod probe;
mod rmsnorm;
mod rope;
mod rows;
mod swiglu;
mod util;
mod weights;

use harness::Ctx;

/// The shape checks of the text path's ops, one family after the other.
fn textops_reject_bad_shapes(ctx: &mut Ctx) -> Result<(), String> {
    embedding::embedding_rejects_bad_shapes(ctx)?;
    rmsnorm::rmsnorm_rejects_bad_shapes(ctx)?;
    rope::rope_rejects_bad_shapes(ctx)?;
    pool::pool_rejects_bad_shapes(ctx)?;
    lora::lora_rejects_bad_shapes(ctx)
}

/// The f32-residual variants the decoder uses: `embedding_f32` (exact), `rmsnorm_f32` and
/// `linear_f32` accumulating into f32.
fn residual_f32_ops_match_reference(ctx: &mut Ctx) -> Result<(), String> {
    embedding::embedding_f32_matches_reference(ctx)?;
    rmsnorm::rmsnorm_f32_matches_reference(ctx)?;
    linear::linear_f32_matches_reference(ctx)
}

/// The device-fault tests: each leaves the process's context broken, so each runs alone, in a
/// process of its own, when `JV4_GPU_FAULT` names it (tools/gpu_run.sh runs both, after the suite);
/// the suite itself never runs them.
const FAULT_TESTS: &[(&str, harness::TestFn)] = &[
    ("device_fault_turns_the_engine_lost", fault::device_fault_turns_the_engine_lost),
    ("device_fault_on_one_of_two_devices", fault::device_fault_on_one_of_two_devices),
];

fn main() {
    if let Ok(name) = std::env::var("JV4_GPU_FAULT") {
        let Some(t) = FAULT_TESTS.iter().find(|(n, _)| *n == name) else {
            let names: Vec<_> = FAULT_TESTS.iter().map(|(n, _)| *n).collect();
            eprintln!("JV4_GPU_FAULT={name:?}: expected one of {names:?}");
            std::process::exit(2);
        };
        harness::run(std::slice::from_ref(t));
    }
    harness::run(&[
        ("kernels_resolve", kernels::kernels_resolve),
        ("swiglu_matches_reference", swiglu::swiglu_matches_reference),
        ("swiglu_rejects_bad_shapes", swiglu::swiglu_rejects_bad_shapes),
        ("linear_matches_reference", linear::linear_matches_reference),
        ("linear_rejects_bad_shapes", linear::linear_rejects_bad_shapes),
        ("linear_batch_invariant", linear::linear_batch_invariant),
        ("linear_f32_bias_matches_reference", linear::linear_f32_bias_matches_reference),
        ("linear_stream_matches_reference", linear::linear_stream_matches_reference),
        ("linear_stream_equals_cublas_bitwise", linear::linear_stream_equals_cublas_bitwise),
        ("linear_stream_rejects_what_it_does_not_take", linear::linear_stream_rejects_what_it_does_not_take),
        ("fold_ops_write_only_their_columns", fold::fold_ops_write_only_their_columns),
        ("linear_ignores_bytes_past_its_operands", probe::linear_ignores_bytes_past_its_operands),
        ("probe_gemm_output_read_by_a_kernel", probe::probe_gemm_output_read_by_a_kernel),
        ("probe_graph_writes_read_eagerly", probe::probe_graph_writes_read_eagerly),
        ("probe_graph_chain_embedding_rmsnorm", probe::probe_graph_chain_embedding_rmsnorm),
        ("probe_graph_pool_forward_like", probe::probe_graph_pool_forward_like),
        ("probe_linear_wgmma_bits", probe::probe_linear_wgmma_bits),
        ("embedding_matches_reference", embedding::embedding_matches_reference),
        ("rmsnorm_matches_reference", rmsnorm::rmsnorm_matches_reference),
        ("mrope_matches_reference", rope::mrope_matches_reference),
        ("vision_rope_matches_reference", rope::vision_rope_matches_reference),
        ("mean_pool_l2_matches_reference", pool::mean_pool_l2_matches_reference),
        ("mean_pool_l2_invalid_spans_give_nan", pool::mean_pool_l2_invalid_spans_give_nan),
        ("l2_rows_matches_reference", pool::l2_rows_matches_reference),
        ("lora_mask_matches_cpu", lora::lora_mask_matches_cpu),
        ("lora_shrink_equals_unfused_bitwise", lora::lora_shrink_equals_unfused_bitwise),
        ("textops_reject_bad_shapes", textops_reject_bad_shapes),
        ("residual_f32_ops_match_reference", residual_f32_ops_match_reference),
        ("gelu_matches_reference", gelu::gelu_matches_reference),
        ("gather_rows_matches_reference", rows::gather_rows_matches_reference),
        ("scatter_rows_f32_matches_reference", rows::scatter_rows_f32_matches_reference),
        ("attention_matches_reference", attention::attention_matches_reference),
        ("attention_tolerance_catches_mistakes", attention::attention_tolerance_catches_mistakes),
        ("attention_rejects_bad_shapes", attention::attention_rejects_bad_shapes),
        ("attention_batch_invariant", attention::attention_batch_invariant),
        ("alloc_round_trip", alloc::alloc_round_trip),
        ("alloc_no_growth_over_100_cycles", alloc::alloc_no_growth_over_100_cycles),
        ("alloc_budget_gives_typed_oom", alloc::alloc_budget_gives_typed_oom),
        ("arena_gives_every_block_back", alloc::arena_gives_every_block_back),
        ("arena_upload_stages_in_one_copy", alloc::arena_upload_stages_in_one_copy),
        ("weights_upload_round_trip", weights::weights_upload_round_trip),
        ("text_forward_matches_cpu_layer_by_layer", model::text_forward_matches_cpu_layer_by_layer),
        ("text_outputs_match_fp32_reference", model::text_outputs_match_fp32_reference),
        ("image_outputs_match_fp32_reference", model::image_outputs_match_fp32_reference),
        ("graph_forward_equals_eager_bitwise", model::graph_forward_equals_eager_bitwise),
        ("engine_mixed_batch_equals_requests_alone", engine::mixed_batch_equals_requests_alone),
        ("engine_batch_invariant_bitwise", engine::batch_invariant_bitwise),
        ("engine_concurrent_callers_get_their_own_results", engine::concurrent_callers_get_their_own_results),
        ("engine_concurrent_callers_share_forwards", engine::concurrent_callers_share_forwards),
        ("engine_bad_requests_fail_alone", engine::bad_requests_fail_alone),
        ("engine_tiny_budget_serves_every_request", engine::tiny_budget_serves_every_request),
        ("engine_open_errors_are_clear", engine::open_errors_are_clear),
        ("engine_device_list_of_one_equals_device", engine::device_list_of_one_equals_device),
        ("oom_splits_serve_every_request_bitwise", oom::oom_splits_serve_every_request_bitwise),
        ("chunk_equal_the_reference_pooling", engine::chunks_equal_the_reference_pooling),
        ("chunk_vectors_are_independent_of_the_batch", engine::chunk_vectors_are_independent_of_the_batch),
        ("chunk_bad_chunking_fails_alone", engine::bad_chunking_fails_alone),
        ("chunk_long_equal_the_reference_pooling", engine::long_chunks_equal_the_reference_pooling),
    ]);
}
