//! The ops' `CASES` tables (what the GPU tests check and `jv4-bench ops` times) hold the shapes
//! the full model runs: derived here from the full preset's config and adapter config, not
//! restated. CPU only.

use std::collections::BTreeSet;
use std::path::Path;

use jv4::model::constants::vision_mlp_width;
use jv4::model::synth::{adapter_config_json, config_json, Preset};
use jv4::model::{AdapterConfig, ModelConfig, Task};
use jv4::ops;

fn full() -> (ModelConfig, AdapterConfig) {
    let cfg = ModelConfig::from_json_str(&config_json(Preset::Full).to_string(), Path::new("config.json"))
        .expect("full config");
    let adapter = AdapterConfig::from_json_str(
        &adapter_config_json(Preset::Full).to_string(),
        Path::new("adapter.json"),
    )
    .expect("full adapter config");
    (cfg, adapter)
}

/// Every `w [n, k]` a full-size forward multiplies by, as `GpuModel::load` prepares them: q/k/v
/// and gate/up fused, each adapted projection's LoRA stacked over tasks (`tasks · parts · r`
/// rows of A, the same columns of B), the vision tower and the merger.
fn model_gemms(cfg: &ModelConfig, adapter: &AdapterConfig) -> Vec<(&'static str, usize, usize)> {
    let (t, v) = (&cfg.text, &cfg.vision);
    let (h, q, kv) = (t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim);
    let lora = |parts: usize| Task::ALL.len() * parts * adapter.r;
    let pd = cfg.multi_vector_projector_dim;
    let patch = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size;
    vec![
        ("qkv", q + 2 * kv, h),
        ("o", h, q),
        ("gate_up", 2 * t.intermediate_size, h),
        ("down", h, t.intermediate_size),
        ("qkv lora A", lora(3), h),
        ("qkv lora B", q + 2 * kv, lora(3)),
        ("o lora A", lora(1), q),
        ("o lora B", h, lora(1)),
        ("gate_up lora A", lora(2), h),
        ("gate_up lora B", 2 * t.intermediate_size, lora(2)),
        ("down lora A", lora(1), t.intermediate_size),
        ("down lora B", h, lora(1)),
        ("qkv folded", q + 2 * kv, h + lora(3).next_multiple_of(8)),
        ("gate_up folded", 2 * t.intermediate_size, h + lora(2).next_multiple_of(8)),
        ("down folded", h, t.intermediate_size + lora(1).next_multiple_of(8)),
        ("multi", pd, h),
        ("multi lora A", lora(1), h),
        ("multi lora B", pd, lora(1)),
        ("vision patch_embed", v.hidden_size, patch),
        ("vision qkv", 3 * v.hidden_size, v.hidden_size),
        ("vision proj", v.hidden_size, v.hidden_size),
        ("vision gate_up", 2 * vision_mlp_width(v.intermediate_size), v.hidden_size),
        ("vision down", v.hidden_size, vision_mlp_width(v.intermediate_size)),
        ("merger 0", v.merged_dim(), v.merged_dim()),
        ("merger 2", v.out_hidden_size, v.merged_dim()),
    ]
}

#[test]
fn linear_cases_are_the_models_gemms() {
    let (cfg, adapter) = full();
    let want: BTreeSet<(usize, usize)> =
        model_gemms(&cfg, &adapter).iter().map(|&(_, n, k)| (n, k)).collect();
    let got: BTreeSet<(usize, usize)> = ops::linear::CASES.iter().map(|&(_, n, k)| (n, k)).collect();
    assert_eq!(got.len(), ops::linear::CASES.len(), "a shape is listed twice in linear::CASES");
    let names: BTreeSet<&str> = ops::linear::CASES.iter().map(|c| c.0).collect();
    assert_eq!(names.len(), ops::linear::CASES.len(), "a name is listed twice in linear::CASES");
    assert_eq!(
        got,
        want,
        "missing from linear::CASES: {:?}; not a model GEMM: {:?}",
        want.difference(&got).collect::<Vec<_>>(),
        got.difference(&want).collect::<Vec<_>>()
    );
    // The four decoder GEMMs keep their bench names.
    for (name, n, k) in &model_gemms(&cfg, &adapter)[..4] {
        assert!(ops::linear::CASES.contains(&(name, *n, *k)), "{name} [{n}, {k}]");
    }
}

#[test]
fn other_cases_cover_the_models_shapes() {
    let (cfg, adapter) = full();
    let (t, v) = (&cfg.text, &cfg.vision);
    let tasks = Task::ALL.len();
    assert!(ops::embedding::CASES.iter().any(|c| (c.0, c.1) == (t.vocab_size, t.hidden_size)));
    for d in [t.hidden_size, v.hidden_size] {
        assert!(ops::rmsnorm::CASES.iter().any(|c| c.1 == d), "rmsnorm d={d}");
    }
    assert_eq!(ops::rmsnorm::EPS as f64, t.rms_norm_eps as f32 as f64);
    for i in [t.intermediate_size, vision_mlp_width(v.intermediate_size)] {
        assert!(ops::swiglu::CASES.iter().any(|c| c.1 == i), "swiglu I={i}");
    }
    let section = t.mrope_section.map(|s| s as u32);
    assert_eq!(ops::rope::SECTION, section);
    assert_eq!(ops::rope::THETA, t.rope_theta);
    assert!(
        ops::rope::CASES
            .iter()
            .any(|c| (c.1, c.2, c.3, c.4)
                == (t.num_attention_heads, t.num_key_value_heads, t.head_dim, section))
    );
    assert!(ops::rope::VISION_CASES.iter().any(|c| (c.1, c.2) == (v.num_heads, v.head_dim())));
    assert!(ops::pool::CASES.iter().any(|c| c.1 == t.hidden_size));
    assert!(ops::pool::L2_CASES.iter().any(|c| c.1 == cfg.multi_vector_projector_dim));
    // The mask runs on the shrink of 1 (o, down, projector), 2 (gate_up) or 3 (qkv) fused
    // projections: groups of parts · r columns.
    for parts in 1..=3 {
        assert!(
            ops::lora::CASES.iter().any(|c| (c.1, c.2) == (tasks, parts * adapter.r)),
            "lora {parts} parts"
        );
    }
    assert!(ops::rows::CASES.iter().any(|c| c.1 == v.merged_dim()));
    assert!(ops::rows::SCATTER_CASES.iter().any(|c| c.2 == t.hidden_size));
    assert!(ops::gelu::CASES.iter().any(|&n| n > v.merged_dim() && n % v.merged_dim() == 0));
}
