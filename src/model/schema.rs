//! The one description of the checkpoint (docs/MODEL.md §9): every tensor's canonical name, its
//! two stored spellings, its shape (from the config), its source file set, the dtypes it may be
//! stored in, and how the GPU forward prepares it. It drives the checkpoint validation
//! ([`crate::model::checkpoint::expected_tensors`] is [`Schema::tensors`]), the GPU preparation
//! (`model::gpu::weights` walks [`Schema`]'s layers, blocks and heads) and the CPU forward's
//! names (`model::cpu` loads the same fields), so a name or shape exists once.
//!
//! Names are formatted here, at load; the forwards only see typed structs built from them.

use crate::model::checkpoint::{Dtype, Source};
use crate::model::config::{AdapterConfig, ModelConfig};
use crate::model::Task;

/// Stored dtypes the engine accepts for any tensor (all are prepared as bf16; the CPU widens that
/// to f32).
pub const ACCEPTED_DTYPES: &[Dtype] = &[Dtype::BF16, Dtype::F16, Dtype::F32];

/// A projection the GPU fuses from several checkpoint projections (rows concatenated in part
/// order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fused {
    /// The decoder's q, k, v → `qkv`.
    Qkv,
    /// gate, up → `gate_up` (decoder and vision MLPs; the SwiGLU kernel reads that layout).
    GateUp,
}

/// How the GPU forward prepares a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prep {
    /// Uploaded as stored.
    AsStored,
    /// Part `part` (0-based) of a fused projection: its rows follow those of the earlier parts.
    Fused {
        /// The fused projection.
        into: Fused,
        /// Which part.
        part: usize,
    },
    /// A LoRA factor, stacked with the other tasks' (and the other fused parts') into one
    /// `A_all` / block-structured `B_all` pair with the scale folded in (`model::gpu::weights`).
    LoraStacked,
    /// The Conv3d patch embedding, used as the `[hidden, c·t·p·p]` matrix it is.
    ConvToMatrix,
}

/// One row of the table of tensors a config implies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Canonical name (prefixes stripped, see [`crate::model::checkpoint::canonical_name`]).
    pub name: String,
    /// Shape, outermost first (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
    /// Which file set it must come from.
    pub source: Source,
    /// The stored dtypes accepted.
    pub dtypes: &'static [Dtype],
    /// How the GPU forward prepares it.
    pub prep: Prep,
}

impl TensorSpec {
    /// The two stored spellings: legacy (`model.layers.*`, `visual.*`; what the real checkpoint's
    /// base shards use) and new (`model.language_model.*`, `model.visual.*`); adapters carry PEFT's
    /// `base_model.model.` in front of either.
    pub fn stored_names(&self) -> [String; 2] {
        stored_names(&self.name, self.source)
    }
}

/// See [`TensorSpec::stored_names`].
pub fn stored_names(canonical: &str, source: Source) -> [String; 2] {
    let lm =
        canonical.starts_with("layers.") || canonical == "embed_tokens.weight" || canonical == "norm.weight";
    let [legacy, new] = if lm {
        [format!("model.{canonical}"), format!("model.language_model.{canonical}")]
    } else if canonical.starts_with("visual.") {
        [canonical.to_string(), format!("model.{canonical}")]
    } else {
        [canonical.to_string(), canonical.to_string()]
    };
    match source {
        Source::Base => [legacy, new],
        Source::Adapter => [format!("base_model.model.{legacy}"), format!("base_model.model.{new}")],
    }
}

/// A norm's weight vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormSpec {
    /// Canonical name of the weight.
    pub weight: String,
    /// Its length.
    pub dim: usize,
}

/// A linear layer `y = x·Wᵀ (+ b)`, optionally task-adapted with LoRA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearSpec {
    /// Canonical prefix (`layers.0.self_attn.q_proj`).
    pub name: String,
    /// Output features (rows of W).
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// Whether it has a bias.
    pub bias: bool,
    /// Whether it has per-task LoRA factors in the adapters file.
    pub lora: bool,
    /// How the GPU prepares its weight and bias.
    pub prep: Prep,
}

impl LinearSpec {
    fn new(name: String, out: usize, inp: usize, bias: bool, lora: bool) -> Self {
        LinearSpec { name, out, inp, bias, lora, prep: Prep::AsStored }
    }

    fn fused(mut self, into: Fused, part: usize) -> Self {
        self.prep = Prep::Fused { into, part };
        self
    }

    /// Canonical name of the weight.
    pub fn weight(&self) -> String {
        format!("{}.weight", self.name)
    }

    /// Canonical name of the bias, when it has one.
    pub fn bias_name(&self) -> Option<String> {
        self.bias.then(|| format!("{}.bias", self.name))
    }

    /// Canonical name of `task`'s LoRA A (`[r, in]`).
    pub fn lora_a(&self, task: Task) -> String {
        format!("{}.lora_A.{}.weight", self.name, task.name())
    }

    /// Canonical name of `task`'s LoRA B (`[out, r]`).
    pub fn lora_b(&self, task: Task) -> String {
        format!("{}.lora_B.{}.weight", self.name, task.name())
    }
}

/// One decoder layer (docs/MODEL.md §7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSpec {
    /// `input_layernorm`.
    pub input_norm: NormSpec,
    /// `self_attn.q_proj` (fused into qkv on the GPU).
    pub q: LinearSpec,
    /// `self_attn.k_proj`.
    pub k: LinearSpec,
    /// `self_attn.v_proj`.
    pub v: LinearSpec,
    /// `self_attn.o_proj`.
    pub o: LinearSpec,
    /// `post_attention_layernorm`.
    pub post_norm: NormSpec,
    /// `mlp.gate_proj` (fused into gate_up on the GPU).
    pub gate: LinearSpec,
    /// `mlp.up_proj`.
    pub up: LinearSpec,
    /// `mlp.down_proj`.
    pub down: LinearSpec,
}

impl LayerSpec {
    /// The parts of the fused qkv projection, in row order.
    pub fn qkv(&self) -> [&LinearSpec; 3] {
        [&self.q, &self.k, &self.v]
    }
    /// The parts of the fused gate_up projection, in row order.
    pub fn gate_up(&self) -> [&LinearSpec; 2] {
        [&self.gate, &self.up]
    }
    fn linears(&self) -> [&LinearSpec; 7] {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
    }
}

/// One vision block (docs/MODEL.md §5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    /// `norm1`.
    pub norm1: NormSpec,
    /// `norm2`.
    pub norm2: NormSpec,
    /// `attn.qkv` (stored fused).
    pub qkv: LinearSpec,
    /// `attn.proj`.
    pub proj: LinearSpec,
    /// `mlp.gate_proj` (fused into gate_up on the GPU).
    pub gate: LinearSpec,
    /// `mlp.up_proj`.
    pub up: LinearSpec,
    /// `mlp.down_proj`.
    pub down: LinearSpec,
}

impl BlockSpec {
    /// The parts of the fused gate_up projection, in row order.
    pub fn gate_up(&self) -> [&LinearSpec; 2] {
        [&self.gate, &self.up]
    }
}

/// The patch merger (docs/MODEL.md §5.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergerSpec {
    /// `ln_q`, per patch.
    pub ln_q: NormSpec,
    /// `mlp.0`, on merge² patches as one row.
    pub mlp0: LinearSpec,
    /// `mlp.2`, to the decoder's width.
    pub mlp2: LinearSpec,
}

/// The patch embedding's Conv3d weight `[hidden, channels, temporal, patch, patch]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchEmbedSpec {
    /// Canonical name.
    pub weight: String,
    /// Stored shape.
    pub shape: [usize; 5],
}

impl PatchEmbedSpec {
    /// The matrix it is: `[hidden, c·t·p·p]`.
    pub fn matrix(&self) -> [usize; 2] {
        [self.shape[0], self.shape[1..].iter().product()]
    }
}

/// The whole checkpoint, structured. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schema {
    /// `embed_tokens.weight`, `[vocab, hidden]`.
    pub embed: (String, [usize; 2]),
    /// The decoder layers.
    pub layers: Vec<LayerSpec>,
    /// The final norm.
    pub norm: NormSpec,
    /// The patch embedding.
    pub patch_embed: PatchEmbedSpec,
    /// The vision blocks.
    pub blocks: Vec<BlockSpec>,
    /// The patch merger.
    pub merger: MergerSpec,
    /// The multi-vector projector (task-adapted).
    pub projector: LinearSpec,
    /// LoRA rank.
    pub rank: usize,
}

impl Schema {
    /// The schema the configs imply.
    pub fn new(cfg: &ModelConfig, adapter: &AdapterConfig) -> Schema {
        let t = &cfg.text;
        let v = &cfg.vision;
        let (h, inter) = (t.hidden_size, t.intermediate_size);
        let q = t.num_attention_heads * t.head_dim;
        let kv = t.num_key_value_heads * t.head_dim;
        let (vh, vi) = (v.hidden_size, v.intermediate_size);
        let merged = v.merged_dim();
        let norm = |weight: String, dim: usize| NormSpec { weight, dim };
        let layers = (0..t.num_hidden_layers)
            .map(|l| {
                let p = format!("layers.{l}");
                let lin = |m: &str, out, inp, bias| LinearSpec::new(format!("{p}.{m}"), out, inp, bias, true);
                LayerSpec {
                    input_norm: norm(format!("{p}.input_layernorm.weight"), h),
                    q: lin("self_attn.q_proj", q, h, true).fused(Fused::Qkv, 0),
                    k: lin("self_attn.k_proj", kv, h, true).fused(Fused::Qkv, 1),
                    v: lin("self_attn.v_proj", kv, h, true).fused(Fused::Qkv, 2),
                    o: lin("self_attn.o_proj", h, q, false),
                    post_norm: norm(format!("{p}.post_attention_layernorm.weight"), h),
                    gate: lin("mlp.gate_proj", inter, h, false).fused(Fused::GateUp, 0),
                    up: lin("mlp.up_proj", inter, h, false).fused(Fused::GateUp, 1),
                    down: lin("mlp.down_proj", h, inter, false),
                }
            })
            .collect();
        let blocks = (0..v.depth)
            .map(|j| {
                let p = format!("visual.blocks.{j}");
                let lin = |m: &str, out, inp| LinearSpec::new(format!("{p}.{m}"), out, inp, true, false);
                BlockSpec {
                    norm1: norm(format!("{p}.norm1.weight"), vh),
                    norm2: norm(format!("{p}.norm2.weight"), vh),
                    qkv: lin("attn.qkv", 3 * vh, vh),
                    proj: lin("attn.proj", vh, vh),
                    gate: lin("mlp.gate_proj", vi, vh).fused(Fused::GateUp, 0),
                    up: lin("mlp.up_proj", vi, vh).fused(Fused::GateUp, 1),
                    down: lin("mlp.down_proj", vh, vi),
                }
            })
            .collect();
        Schema {
            embed: ("embed_tokens.weight".into(), [t.vocab_size, h]),
            layers,
            norm: norm("norm.weight".into(), h),
            patch_embed: PatchEmbedSpec {
                weight: "visual.patch_embed.proj.weight".into(),
                shape: [vh, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size],
            },
            blocks,
            merger: MergerSpec {
                ln_q: norm("visual.merger.ln_q.weight".into(), vh),
                mlp0: LinearSpec::new("visual.merger.mlp.0".into(), merged, merged, true, false),
                mlp2: LinearSpec::new("visual.merger.mlp.2".into(), v.out_hidden_size, merged, true, false),
            },
            projector: LinearSpec::new(
                "multi_vector_projector".into(),
                cfg.multi_vector_projector_dim,
                h,
                true,
                true,
            ),
            rank: adapter.r,
        }
    }

    /// The full tensor table (docs/MODEL.md §9.2, §9.3): base tensors first (embedding, layers, final
    /// norm, vision tower, projector), then the adapters task by task.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        let row = |name: String, shape: Vec<usize>, source: Source, prep: Prep| TensorSpec {
            name,
            shape,
            source,
            dtypes: ACCEPTED_DTYPES,
            prep,
        };
        let norm = |out: &mut Vec<TensorSpec>, n: &NormSpec| {
            out.push(row(n.weight.clone(), vec![n.dim], Source::Base, Prep::AsStored))
        };
        let linear = |out: &mut Vec<TensorSpec>, l: &LinearSpec| {
            out.push(row(l.weight(), vec![l.out, l.inp], Source::Base, l.prep));
            if let Some(b) = l.bias_name() {
                out.push(row(b, vec![l.out], Source::Base, l.prep));
            }
        };
        out.push(row(self.embed.0.clone(), self.embed.1.to_vec(), Source::Base, Prep::AsStored));
        for l in &self.layers {
            norm(&mut out, &l.input_norm);
            for p in [&l.q, &l.k, &l.v, &l.o] {
                linear(&mut out, p);
            }
            norm(&mut out, &l.post_norm);
            for p in [&l.gate, &l.up, &l.down] {
                linear(&mut out, p);
            }
        }
        norm(&mut out, &self.norm);
        let pe = &self.patch_embed;
        out.push(row(pe.weight.clone(), pe.shape.to_vec(), Source::Base, Prep::ConvToMatrix));
        for b in &self.blocks {
            norm(&mut out, &b.norm1);
            norm(&mut out, &b.norm2);
            for p in [&b.qkv, &b.proj, &b.gate, &b.up, &b.down] {
                linear(&mut out, p);
            }
        }
        norm(&mut out, &self.merger.ln_q);
        linear(&mut out, &self.merger.mlp0);
        linear(&mut out, &self.merger.mlp2);
        linear(&mut out, &self.projector);

        let r = self.rank;
        let lora = |out: &mut Vec<TensorSpec>, l: &LinearSpec, task: Task| {
            out.push(row(l.lora_a(task), vec![r, l.inp], Source::Adapter, Prep::LoraStacked));
            out.push(row(l.lora_b(task), vec![l.out, r], Source::Adapter, Prep::LoraStacked));
        };
        for task in Task::ALL {
            for l in &self.layers {
                for p in l.linears() {
                    lora(&mut out, p, task);
                }
            }
            lora(&mut out, &self.projector, task);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::canonical_name;
    use crate::model::synth::{adapter_config_json, config_json, Preset};
    use std::collections::HashSet;
    use std::path::Path;

    fn schema(preset: Preset) -> Schema {
        let cfg =
            ModelConfig::from_json_str(&config_json(preset).to_string(), Path::new("config.json")).unwrap();
        let ad =
            AdapterConfig::from_json_str(&adapter_config_json(preset).to_string(), Path::new("adapter.json"))
                .unwrap();
        Schema::new(&cfg, &ad)
    }

    #[test]
    fn both_spellings_map_back_to_the_canonical_name() {
        for preset in [Preset::Tiny, Preset::Full] {
            let table = schema(preset).tensors();
            let mut seen = HashSet::new();
            for e in &table {
                assert!(seen.insert(e.name.clone()), "{} twice", e.name);
                let [legacy, new] = e.stored_names();
                assert_ne!(legacy.starts_with("base_model."), e.source == Source::Base, "{legacy}");
                assert_eq!(canonical_name(&legacy), e.name, "{legacy}");
                assert_eq!(canonical_name(&new), e.name, "{new}");
            }
        }
    }

    #[test]
    fn preparation_accounts_for_every_tensor() {
        // Each fused projection has its parts 0..n exactly once per layer/block, with one input
        // width; every adapter tensor is stacked, every base one has a base preparation.
        let s = schema(Preset::Tiny);
        for l in &s.layers {
            for (into, parts) in [(Fused::Qkv, l.qkv().to_vec()), (Fused::GateUp, l.gate_up().to_vec())] {
                for (i, p) in parts.iter().enumerate() {
                    assert_eq!(p.prep, Prep::Fused { into, part: i }, "{}", p.name);
                    assert_eq!(p.inp, parts[0].inp);
                }
            }
        }
        for b in &s.blocks {
            for (i, p) in b.gate_up().iter().enumerate() {
                assert_eq!(p.prep, Prep::Fused { into: Fused::GateUp, part: i });
            }
        }
        for e in s.tensors() {
            assert_eq!(e.source == Source::Adapter, e.prep == Prep::LoraStacked, "{}", e.name);
            assert_eq!(e.prep == Prep::ConvToMatrix, e.name == s.patch_embed.weight, "{}", e.name);
        }
        assert_eq!(s.patch_embed.matrix(), [160, 3 * 2 * 14 * 14]);
    }
}
