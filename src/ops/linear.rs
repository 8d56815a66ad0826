//! `linear`: `y = x·wᵀ (+ bias) (+ y)`, every projection of the model, through cuBLASLt
//! ([`crate::cuda::Blas::linear`]). Reference: [`crate::reference::linear`].

use half::bf16;

use crate::cuda::{DView, DViewMut, Gpu};
use crate::Result;

/// Every GEMM shape the model runs, as (name, n, k) of `w [n, k]` (jina-v4 full size: the
/// config's widths, LoRA rank 32 and 3 tasks stacked as `GpuModel::load` prepares them; checked
/// against the full preset's config by `tests/op_cases.rs`). Each shape is listed once, under the
/// first projection that has it.
pub const CASES: &[(&str, usize, usize)] = &[
    // Decoder layer: q+k+v fused (16 + 2·2 heads of 128), o, gate+up fused, down.
    ("qkv", 2560, 2048),
    ("o", 2048, 2048),
    ("gate_up", 22016, 2048),
    ("down", 2048, 11008),
    // Batched LoRA: shrink `x·A_allᵀ` (tasks · fused parts · r rows) and expand `t·B_allᵀ`.
    ("qkv_lora_a", 288, 2048),
    ("qkv_lora_b", 2560, 288),
    ("o_lora_a", 96, 2048), // also the multi-vector projector's
    ("o_lora_b", 2048, 96), // also down's
    ("gate_up_lora_a", 192, 2048),
    ("gate_up_lora_b", 22016, 192),
    ("down_lora_a", 96, 11008),
    // The folded LoRA (`model::gpu::weights`, the default): `[W | B_all]` over `[x | t]`.
    ("qkv_folded", 2560, 2336),
    ("gate_up_folded", 22016, 2240),
    ("down_folded", 2048, 11104),
    // Multi-vector projector (its shrink is o_lora_a's shape).
    ("multi", 128, 2048),
    ("multi_lora_b", 128, 96),
    // Vision tower: patch embedding (3·2·14·14 pixels per patch), block qkv, proj, gate+up
    // fused, down; the merger's two layers over groups of 4 patches.
    ("vision_patch_embed", 1280, 1176),
    ("vision_qkv", 3840, 1280),
    ("vision_proj", 1280, 1280),
    ("vision_gate_up", 6912, 1280), // 2 × 3456: the MLP padded (model::constants::vision_mlp_width)
    ("vision_down", 1280, 3456),
    ("merger_0", 5120, 5120),
    ("merger_2", 2048, 5120),
];

/// Token counts the GEMM tests run each case at: one token, odd sizes, a full batch.
pub const TOKENS: &[usize] = &[1, 7, 129, 1000, 4096];

/// Token counts `jv4-bench ops` times each case at: a short query, a document, a full batch and
/// the largest forward.
pub const BENCH_TOKENS: &[usize] = &[16, 512, 4096, 16384];

/// `y [m, n] = x [m, k] · w [n, k]ᵀ (+ bias [n]) (+ y when accumulate)`.
pub fn linear(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    w: &DView<'_, bf16>,
    bias: Option<&DView<'_, bf16>>,
    y: &mut DViewMut<'_, bf16>,
    accumulate: bool,
) -> Result<()> {
    gpu.blas().linear(x, w, bias, y, accumulate)
}

/// [`linear`] into an f32 output, no bias: `y [m, n] (f32) = x·wᵀ (+ y when accumulate)`, the
/// residual adds of the decoder (its residual stream is f32).
pub fn linear_f32(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    w: &DView<'_, bf16>,
    y: &mut DViewMut<'_, f32>,
    accumulate: bool,
) -> Result<()> {
    gpu.blas().linear_f32(x, w, y, accumulate)
}

/// [`linear`] within one buffer: `xt[:, y_col..y_col + n] = xt[:, ..k] · w [n, k]ᵀ` (`y_col ≥ k`,
/// the other columns untouched). The folded LoRA writes its shrink `t` beside the `x` it reads
/// (`model::gpu::weights`).
pub fn linear_cols(
    gpu: &Gpu,
    xt: &mut DViewMut<'_, bf16>,
    k: usize,
    w: &DView<'_, bf16>,
    y_col: usize,
) -> Result<()> {
    gpu.blas().linear_cols(xt, k, w, y_col)
}
