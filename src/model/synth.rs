//! Random checkpoints in the exact on-disk layout of `jinaai/jina-embeddings-v4` (docs/MODEL.md §1.1,
//! §9.1b): two base shards with an index, legacy base names, a tied `lm_head.weight`, and PEFT
//! adapters with the new `model.language_model.` spelling, and a small `tokenizer.json` with the
//! config's special ids ([`crate::model::synth_tokenizer`]). Tests and benches use them where the
//! real 7.5 GB download is unavailable; `Tiny` keeps the real head widths so kernels see real
//! shapes per head, `Full` has every real shape.
//!
//! Values come from a seeded splitmix64 stream per tensor (keyed by the tensor's canonical name),
//! so a checkpoint is reproducible from `(seed, preset)` and independent of write order. Files are
//! written tensor by tensor through a small buffer: memory stays bounded even for `Full`.

use crate::model::checkpoint::{
    expected_tensors, Dtype, ExpectedTensor, Source, ADAPTER_CONFIG_FILE, ADAPTER_FILE, INDEX_FILE,
};
use crate::model::config::{AdapterConfig, ModelConfig};
use crate::model::synth_tokenizer;
use crate::model::Task;
use crate::{Error, Result};
use half::{bf16, f16};
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Shapes to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Small: LM hidden 256 (2 heads × 128, 1 KV head), 2 layers, vocab 2048; ViT hidden 160
    /// (2 heads × 80), depth 4, full attention in blocks 1 and 3; LoRA r = 4. About 7 MB.
    Tiny,
    /// The real shapes (about 7.5 GB plus the tied head).
    Full,
}

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthSpec {
    /// PRNG seed.
    pub seed: u64,
    /// Shapes.
    pub preset: Preset,
    /// dtype of the LoRA tensors (the real one is unconfirmed, docs/MODEL.md §13.1).
    pub adapter_dtype: Dtype,
}

/// The base shard file names, as in the real checkpoint.
pub const SHARD_FILES: [&str; 2] = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];

/// `config.json` for a preset: nested `text_config`, special ids at the top level.
pub fn config_json(preset: Preset) -> Value {
    let (text, vision, ids, matryoshka) = match preset {
        Preset::Full => (
            json!({
                "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936,
            }),
            json!({
                "depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                "fullatt_block_indexes": [7, 15, 23, 31], "out_hidden_size": 2048,
            }),
            151643u32,
            json!([128, 256, 512, 1024, 2048]),
        ),
        // Special ids keep the real relative layout, moved below the small vocab.
        Preset::Tiny => (
            json!({
                "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "intermediate_size": 512, "vocab_size": 2048,
            }),
            json!({
                "depth": 4, "hidden_size": 160, "num_heads": 2, "intermediate_size": 320,
                "fullatt_block_indexes": [1, 3], "out_hidden_size": 256,
            }),
            2000u32,
            json!([64, 128, 256]),
        ),
    };
    let mut text = text;
    let tm = text.as_object_mut().expect("object literal");
    for (k, v) in [
        ("hidden_act", json!("silu")),
        ("rms_norm_eps", json!(1e-6)),
        ("rope_theta", json!(1000000.0)),
        ("rope_scaling", json!({"type": "default", "rope_type": "default", "mrope_section": [16, 24, 24]})),
        ("max_position_embeddings", json!(128000)),
        ("use_sliding_window", json!(false)),
        ("tie_word_embeddings", json!(true)),
        ("torch_dtype", json!("bfloat16")),
        ("model_type", json!("qwen2_5_vl_text")),
    ] {
        tm.insert(k.into(), v);
    }
    let mut vision = vision;
    let vm = vision.as_object_mut().expect("object literal");
    for (k, v) in [
        ("hidden_act", json!("silu")),
        ("patch_size", json!(14)),
        ("temporal_patch_size", json!(2)),
        ("spatial_merge_size", json!(2)),
        ("in_channels", json!(3)),
        ("window_size", json!(112)),
        ("tokens_per_second", json!(2)),
    ] {
        vm.insert(k.into(), v);
    }
    // Real offsets from bos (151643): eos +2, vision_start +9, vision_end +10, vision +11,
    // image +12, video +13.
    json!({
        "architectures": ["JinaEmbeddingsV4Model"],
        "model_type": "jina-embeddings-v4",
        "torch_dtype": "bfloat16",
        "text_config": text,
        "vision_config": vision,
        "bos_token_id": ids,
        "eos_token_id": ids + 2,
        "vision_start_token_id": ids + 9,
        "vision_end_token_id": ids + 10,
        "vision_token_id": ids + 11,
        "image_token_id": ids + 12,
        "video_token_id": ids + 13,
        "multi_vector_projector_dim": 128,
        "matryoshka_dims": matryoshka,
        "task_names": Task::ALL.map(|t| t.name()),
        "single_vector_pool_strategy": "mean",
        "truncate_dim": null,
    })
}

/// `preprocessor_config.json` (docs/MODEL.md §1.3 values).
pub fn preprocessor_json() -> Value {
    json!({
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": true, "do_rescale": true, "do_normalize": true, "do_convert_rgb": true,
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "min_pixels": 3136,
        "max_pixels": 602112,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    })
}

/// `adapters/adapter_config.json` (docs/MODEL.md §6). Tiny uses alpha = 2r so that the scale (2.0) is
/// not the identity and a forgotten scale shows up in parity tests.
pub fn adapter_config_json(preset: Preset) -> Value {
    let (r, alpha) = match preset {
        Preset::Full => (32, 32),
        Preset::Tiny => (4, 8),
    };
    json!({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": false,
        "lora_dropout": 0.1,
        "bias": "none",
        "target_modules": "(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(single_vector_projector|multi_vector_projector).*$)",
        "exclude_modules": ".*visual.*",
    })
}

/// The real checkpoint's spelling of a canonical name: legacy `model.` for LM base tensors,
/// `base_model.model.model.language_model.` for LM LoRA, `base_model.model.` for projector LoRA.
pub fn stored_name(canonical: &str, source: Source) -> String {
    let lm =
        canonical.starts_with("layers.") || canonical == "embed_tokens.weight" || canonical == "norm.weight";
    match (source, lm) {
        (Source::Base, true) => format!("model.{canonical}"),
        (Source::Base, false) => canonical.to_string(),
        (Source::Adapter, true) => format!("base_model.model.model.language_model.{canonical}"),
        (Source::Adapter, false) => format!("base_model.model.{canonical}"),
    }
}

/// Writes a random checkpoint for `spec` into `dir` (created if needed).
pub fn write_checkpoint(dir: &Path, spec: &SynthSpec) -> Result<()> {
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).map_err(|e| Error::io(&adapters, e))?;
    let config = config_json(spec.preset);
    let adapter_cfg = adapter_config_json(spec.preset);
    write_json(&dir.join("config.json"), &config)?;
    write_json(&dir.join("preprocessor_config.json"), &preprocessor_json())?;
    write_json(&dir.join(ADAPTER_CONFIG_FILE), &adapter_cfg)?;

    // The table comes from the parsed config, so the files match what the loader expects.
    let cfg = ModelConfig::from_json_str(&config.to_string(), &dir.join("config.json"))?;
    let acfg = AdapterConfig::from_json_str(&adapter_cfg.to_string(), &dir.join(ADAPTER_CONFIG_FILE))?;
    let table = expected_tensors(&cfg, &acfg);
    // A tokenizer with the config's special ids makes the folder a complete model folder.
    synth_tokenizer::write(dir, &cfg)?;

    // Shard 1: embed + layers before `split` + the attention half of layer `split`; shard 2 the
    // rest, so one decoder layer straddles the two files as in the real checkpoint (layer 19/36).
    let layers = cfg.text.num_hidden_layers;
    let split = (layers * 19 / 36).min(layers - 1);
    let in_first = |name: &str| -> bool {
        if name == "embed_tokens.weight" {
            return true;
        }
        let Some(rest) = name.strip_prefix("layers.") else {
            return false;
        };
        let (l, tail) = rest.split_once('.').expect("layer names have a tail");
        let l: usize = l.parse().expect("layer index");
        l < split || (l == split && (tail.starts_with("self_attn") || tail.starts_with("input_layernorm")))
    };
    let mut shards: [Vec<Planned>; 2] = [Vec::new(), Vec::new()];
    for e in table.iter().filter(|e| e.source == Source::Base) {
        let s = if in_first(&e.name) { 0 } else { 1 };
        shards[s].push(Planned::new(e, Dtype::BF16));
    }
    // Tied and unused: same values as the embedding (same PRNG key).
    shards[1].push(Planned {
        stored: "lm_head.weight".into(),
        key: "embed_tokens.weight".into(),
        dtype: Dtype::BF16,
        shape: vec![cfg.text.vocab_size, cfg.text.hidden_size],
        init: Init::Matrix,
    });

    let mut weight_map = Map::new();
    let mut total: u64 = 0;
    for (tensors, file) in shards.iter().zip(SHARD_FILES) {
        total += write_safetensors(&dir.join(file), tensors, spec.seed)?;
        for t in tensors {
            weight_map.insert(t.stored.clone(), json!(file));
        }
    }
    write_json(&dir.join(INDEX_FILE), &json!({"metadata": {"total_size": total}, "weight_map": weight_map}))?;

    let lora: Vec<Planned> = table
        .iter()
        .filter(|e| e.source == Source::Adapter)
        .map(|e| Planned::new(e, spec.adapter_dtype))
        .collect();
    write_safetensors(&dir.join(ADAPTER_FILE), &lora, spec.seed)?;
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values always serialise");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug)]
enum Init {
    /// Uniform with std 1/sqrt(fan_in), fan_in = product of all but the first dim.
    Matrix,
    /// LoRA B: half the Matrix scale, so the adapter perturbs rather than dominates.
    LoraB,
    /// Norm weights: 1 ± 0.1.
    Norm,
    /// Biases: small and non-zero, ±0.02.
    Bias,
}

/// A tensor to write.
struct Planned {
    stored: String,
    /// PRNG key (canonical name), so values do not depend on file placement or spelling.
    key: String,
    dtype: Dtype,
    shape: Vec<usize>,
    init: Init,
}

impl Planned {
    fn new(e: &ExpectedTensor, dtype: Dtype) -> Planned {
        let init = if e.shape.len() >= 2 {
            if e.name.contains(".lora_B.") {
                Init::LoraB
            } else {
                Init::Matrix
            }
        } else if e.name.ends_with(".bias") {
            Init::Bias
        } else {
            Init::Norm
        };
        Planned {
            stored: stored_name(&e.name, e.source),
            key: e.name.clone(),
            dtype,
            shape: e.shape.clone(),
            init,
        }
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// splitmix64: tiny, fast, and good enough for test weights.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32) * (2.0 / (1u64 << 24) as f32) - 1.0
    }
}

/// FNV-1a, to turn a tensor name into a PRNG stream key.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

/// Writes one safetensors file by hand (8-byte LE header length, space-padded JSON header, then
/// the data in list order), generating values chunk by chunk. Returns the data size in bytes.
fn write_safetensors(path: &Path, tensors: &[Planned], seed: u64) -> Result<u64> {
    let io = |e| Error::io(path, e);
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for t in tensors {
        let end = offset + t.numel() * t.dtype.size();
        header.insert(
            t.stored.clone(),
            json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    // Pad so the data starts 8-byte aligned (as the reference writer does).
    h.resize(h.len().div_ceil(8) * 8, b' ');

    let mut w = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    const CHUNK: usize = 1 << 16;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK * 4);
    for t in tensors {
        let fan_in: usize = t.shape.iter().skip(1).product::<usize>().max(1);
        let (scale, center) = match t.init {
            Init::Matrix => ((3.0 / fan_in as f32).sqrt(), 0.0),
            Init::LoraB => (0.5 * (3.0 / fan_in as f32).sqrt(), 0.0),
            Init::Norm => (0.1, 1.0),
            Init::Bias => (0.02, 0.0),
        };
        let mut rng = SplitMix(seed ^ fnv1a(&t.key).rotate_left(17));
        let mut left = t.numel();
        while left > 0 {
            let n = left.min(CHUNK);
            buf.clear();
            for _ in 0..n {
                let x = center + scale * rng.uniform();
                match t.dtype {
                    Dtype::BF16 => buf.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
                    Dtype::F16 => buf.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                    Dtype::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                }
            }
            w.write_all(&buf).map_err(io)?;
            left -= n;
        }
    }
    w.flush().map_err(io)?;
    Ok(offset as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_use_the_real_spellings() {
        assert_eq!(stored_name("embed_tokens.weight", Source::Base), "model.embed_tokens.weight");
        assert_eq!(stored_name("visual.merger.mlp.0.bias", Source::Base), "visual.merger.mlp.0.bias");
        assert_eq!(
            stored_name("layers.7.mlp.up_proj.lora_A.code.weight", Source::Adapter),
            "base_model.model.model.language_model.layers.7.mlp.up_proj.lora_A.code.weight"
        );
        assert_eq!(
            stored_name("multi_vector_projector.lora_B.code.weight", Source::Adapter),
            "base_model.model.multi_vector_projector.lora_B.code.weight"
        );
    }

    #[test]
    fn uniform_stays_in_range() {
        let mut r = SplitMix(1);
        let xs: Vec<f32> = (0..10_000).map(|_| r.uniform()).collect();
        assert!(xs.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        assert!(mean.abs() < 0.05, "{mean}");
    }
}
