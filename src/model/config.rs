//! Typed views of a checkpoint's `config.json`, `preprocessor_config.json` and
//! `adapters/adapter_config.json` (docs/MODEL.md §1.2, §1.3, §6).
//!
//! Parsing goes through `serde_json::Value` lookups rather than derived structs because the real
//! config comes from transformers' `Qwen2_5_VLConfig`, whose layout moved between versions (text
//! fields flat at the top level or nested in `text_config`; `rope_theta` beside `rope_scaling` or
//! inside `rope_parameters`). Unknown keys are ignored; JSON `null` counts as absent (transformers
//! writes unset values as `null`). Every constructor validates, so a `ModelConfig` in hand is
//! consistent.

use crate::model::Task;
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The language model's dimensions (docs/MODEL.md §1.2 "Text").
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    /// Model width (2048).
    pub hidden_size: usize,
    /// Decoder layers (36).
    pub num_hidden_layers: usize,
    /// Query heads (16).
    pub num_attention_heads: usize,
    /// Key/value heads (2).
    pub num_key_value_heads: usize,
    /// Per-head width: the explicit `head_dim` key if present, else hidden / heads (128).
    pub head_dim: usize,
    /// SwiGLU inner width (11008).
    pub intermediate_size: usize,
    /// RMSNorm epsilon (1e-6).
    pub rms_norm_eps: f64,
    /// RoPE base (1e6).
    pub rope_theta: f64,
    /// M-RoPE split of the head_dim/2 frequency pairs over (t, h, w) ([16, 24, 24]).
    pub mrope_section: [usize; 3],
    /// Rows of `embed_tokens` (151936).
    pub vocab_size: usize,
    /// MLP activation; only `silu` is supported.
    pub hidden_act: String,
    /// Whether `lm_head` is tied to `embed_tokens` (irrelevant here: no LM head is used).
    pub tie_word_embeddings: bool,
}

/// The vision tower's dimensions (docs/MODEL.md §1.2 "Vision").
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// ViT blocks (32).
    pub depth: usize,
    /// ViT width (1280).
    pub hidden_size: usize,
    /// ViT heads (16, giving head_dim 80).
    pub num_heads: usize,
    /// ViT SwiGLU inner width (3420).
    pub intermediate_size: usize,
    /// Spatial patch side in pixels (14).
    pub patch_size: usize,
    /// Frames per temporal patch (2).
    pub temporal_patch_size: usize,
    /// Patch-merger side (2: 2×2 patches → one LM token).
    pub spatial_merge_size: usize,
    /// Colour channels (3).
    pub in_channels: usize,
    /// Window-attention side in pixels (112).
    pub window_size: usize,
    /// Blocks that use full (per-image) attention instead of windows ([7, 15, 23, 31]).
    pub fullatt_block_indexes: Vec<usize>,
    /// Merger output width; must equal the LM's hidden size (2048).
    pub out_hidden_size: usize,
    /// MLP activation; only `silu` is supported.
    pub hidden_act: String,
}

impl VisionConfig {
    /// Per-head width (80).
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Width of one merge group: `hidden_size · spatial_merge_size²` (5120).
    pub fn merged_dim(&self) -> usize {
        self.hidden_size * self.spatial_merge_size * self.spatial_merge_size
    }
}

/// Special token ids, read from the config (never hard-coded: docs/MODEL.md §1.2 "Special ids").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `<|endoftext|>`, also the pad token.
    pub bos_token_id: u32,
    /// `<|im_end|>`.
    pub eos_token_id: u32,
    /// `<|vision_start|>`: opens an image span.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`: closes an image span.
    pub vision_end_token_id: u32,
    /// `<|image_pad|>`: replaced by merged vision embeddings.
    pub image_token_id: u32,
    /// `<|vision_pad|>`: unused by the model, hence optional.
    pub vision_token_id: Option<u32>,
    /// `<|video_pad|>`: video is unsupported, hence optional.
    pub video_token_id: Option<u32>,
}

/// The whole `config.json`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The file it was read from (named in every error).
    pub path: PathBuf,
    /// Language model.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// Special token ids.
    pub special: SpecialTokens,
    /// Width of the multi-vector head (128).
    pub multi_vector_projector_dim: usize,
    /// Matryoshka truncation sizes, ascending ([128, 256, 512, 1024, 2048]).
    pub matryoshka_dims: Vec<usize>,
    /// The adapter task names, as stored (validated to be the three known tasks).
    pub task_names: Vec<String>,
    /// Single-vector pooling; only `mean` is supported.
    pub single_vector_pool_strategy: String,
}

/// `preprocessor_config.json` (docs/MODEL.md §1.3), validated.
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessorConfig {
    /// The file it was read from.
    pub path: PathBuf,
    /// Lower bound on resized image area (default 3136 only when absent).
    pub min_pixels: usize,
    /// Upper bound on resized image area (default 602112 only when absent).
    pub max_pixels: usize,
    /// Spatial patch side (14).
    pub patch_size: usize,
    /// Temporal patch (2).
    pub temporal_patch_size: usize,
    /// Merge side (2).
    pub merge_size: usize,
    /// Per-channel mean, after rescaling to [0, 1].
    pub image_mean: [f32; 3],
    /// Per-channel std, after rescaling to [0, 1].
    pub image_std: [f32; 3],
}

/// `adapters/adapter_config.json` (docs/MODEL.md §6), validated.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// The file it was read from.
    pub path: PathBuf,
    /// LoRA rank (32).
    pub r: usize,
    /// LoRA alpha (32).
    pub lora_alpha: f64,
    /// Rank-stabilised scaling (alpha / sqrt(r)) instead of alpha / r.
    pub use_rslora: bool,
}

impl AdapterConfig {
    /// The factor applied to `x·Aᵀ·Bᵀ`: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        let s = if self.use_rslora { self.lora_alpha / r.sqrt() } else { self.lora_alpha / r };
        s as f32
    }

    /// Reads and validates `adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates `adapter_config.json` text; `path` is only used in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let root = parse_json(text, path)?;
        let j = Lookup { file: path, root: &root };
        let top = [Scope::TOP];
        let cfg = AdapterConfig {
            path: path.to_path_buf(),
            r: j.req_usize(&top, "r")?,
            lora_alpha: j.req_f64(&top, "lora_alpha")?,
            use_rslora: j.opt_bool(&top, "use_rslora")?.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects r = 0 and a non-finite alpha.
    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(config_err(&self.path, msg));
        if self.r == 0 {
            return err("r must be > 0".into());
        }
        if !self.lora_alpha.is_finite() {
            return err(format!("lora_alpha must be finite, found {}", self.lora_alpha));
        }
        Ok(())
    }
}

impl PreprocessorConfig {
    /// Reads and validates `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates `preprocessor_config.json` text; `path` is only used in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let root = parse_json(text, path)?;
        let j = Lookup { file: path, root: &root };
        let top = [Scope::TOP];
        // Newer processors spell the pixel bounds as size.{shortest,longest}_edge.
        let size = [Scope { key: Some("size") }];
        let min_pixels = match j.opt_usize(&top, "min_pixels")? {
            Some(v) => Some(v),
            None => j.opt_usize(&size, "shortest_edge")?,
        };
        let max_pixels = match j.opt_usize(&top, "max_pixels")? {
            Some(v) => Some(v),
            None => j.opt_usize(&size, "longest_edge")?,
        };
        let cfg = PreprocessorConfig {
            path: path.to_path_buf(),
            min_pixels: min_pixels.unwrap_or(3136),
            max_pixels: max_pixels.unwrap_or(602_112),
            patch_size: j.req_usize(&top, "patch_size")?,
            temporal_patch_size: j.req_usize(&top, "temporal_patch_size")?,
            merge_size: j.req_usize(&top, "merge_size")?,
            image_mean: j.req_f32x3(&top, "image_mean")?,
            image_std: j.req_f32x3(&top, "image_std")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects min_pixels > max_pixels, zero sizes, and a non-positive std.
    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(config_err(&self.path, msg));
        if self.min_pixels == 0 || self.min_pixels > self.max_pixels {
            return err(format!(
                "min_pixels ({}) must be > 0 and <= max_pixels ({})",
                self.min_pixels, self.max_pixels
            ));
        }
        for (k, v) in [
            ("patch_size", self.patch_size),
            ("temporal_patch_size", self.temporal_patch_size),
            ("merge_size", self.merge_size),
        ] {
            if v == 0 {
                return err(format!("{k} must be > 0"));
            }
        }
        if self.image_std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return err(format!("image_std must be finite and > 0, found {:?}", self.image_std));
        }
        if self.image_mean.iter().any(|m| !m.is_finite()) {
            return err(format!("image_mean must be finite, found {:?}", self.image_mean));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates `config.json` text; `path` is only used in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let root = parse_json(text, path)?;
        let j = Lookup { file: path, root: &root };
        let text_first = [Scope { key: Some("text_config") }, Scope::TOP];
        let top_first = [Scope::TOP, Scope { key: Some("text_config") }];
        let vis = [Scope { key: Some("vision_config") }];
        let top = [Scope::TOP];

        // Text fields: nested `text_config` (transformers >= 4.52) first, then the flat layout.
        let hidden_size = j.req_usize(&text_first, "hidden_size")?;
        let num_attention_heads = j.req_usize(&text_first, "num_attention_heads")?;
        let head_dim = match j.opt_usize(&text_first, "head_dim")? {
            Some(d) => d,
            None if num_attention_heads == 0 => 0, // validate() reports the zero
            None => hidden_size / num_attention_heads,
        };

        // rope_scaling (older) or rope_parameters (newer), top level first like the special ids.
        let rope = j.rope_dict(&top_first)?;
        let mrope_section = match &rope {
            Some(dict) => j.mrope_section(dict)?,
            None => {
                return Err(config_err(
                    path,
                    "missing key `rope_scaling.mrope_section` (looked for `rope_scaling` / \
                     `rope_parameters` at the top level and in `text_config`)"
                        .into(),
                ))
            }
        };
        let rope_theta = match j.opt_f64(&text_first, "rope_theta")? {
            Some(t) => t,
            None => rope
                .and_then(|d| d.get("rope_theta"))
                .filter(|v| !v.is_null())
                .map(|v| v.as_f64().ok_or_else(|| j.bad("rope_scaling.rope_theta", "a number", v)))
                .transpose()?
                .ok_or_else(|| {
                    config_err(
                        path,
                        "missing key `rope_theta` (looked in `text_config`, at the top level and \
                         inside `rope_scaling` / `rope_parameters`)"
                            .into(),
                    )
                })?,
        };

        let text = TextConfig {
            hidden_size,
            num_hidden_layers: j.req_usize(&text_first, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: j.req_usize(&text_first, "num_key_value_heads")?,
            head_dim,
            intermediate_size: j.req_usize(&text_first, "intermediate_size")?,
            rms_norm_eps: j.req_f64(&text_first, "rms_norm_eps")?,
            rope_theta,
            mrope_section,
            vocab_size: j.req_usize(&text_first, "vocab_size")?,
            hidden_act: j.opt_string(&text_first, "hidden_act")?.unwrap_or_else(|| "silu".into()),
            // transformers' PretrainedConfig default; unused here anyway (no LM head).
            tie_word_embeddings: j.opt_bool(&text_first, "tie_word_embeddings")?.unwrap_or(true),
        };

        if j.scope(&vis[0]).is_none() {
            return Err(config_err(path, "missing key `vision_config`".into()));
        }
        let vision = VisionConfig {
            depth: j.req_usize(&vis, "depth")?,
            hidden_size: j.req_usize(&vis, "hidden_size")?,
            num_heads: j.req_usize(&vis, "num_heads")?,
            intermediate_size: j.req_usize(&vis, "intermediate_size")?,
            // Qwen's own configs spell these `spatial_patch_size` and `in_chans`.
            patch_size: j.req_usize_any(&vis, &["patch_size", "spatial_patch_size"])?,
            temporal_patch_size: j.req_usize(&vis, "temporal_patch_size")?,
            spatial_merge_size: j.req_usize(&vis, "spatial_merge_size")?,
            in_channels: j.req_usize_any(&vis, &["in_channels", "in_chans"])?,
            window_size: j.req_usize(&vis, "window_size")?,
            fullatt_block_indexes: j.req_usize_list(&vis, "fullatt_block_indexes")?,
            out_hidden_size: j.req_usize(&vis, "out_hidden_size")?,
            hidden_act: j.opt_string(&vis, "hidden_act")?.unwrap_or_else(|| "silu".into()),
        };

        let special = SpecialTokens {
            bos_token_id: j.req_token(&top_first, "bos_token_id")?,
            eos_token_id: j.req_token(&top_first, "eos_token_id")?,
            vision_start_token_id: j.req_token(&top_first, "vision_start_token_id")?,
            vision_end_token_id: j.req_token(&top_first, "vision_end_token_id")?,
            image_token_id: j.req_token(&top_first, "image_token_id")?,
            vision_token_id: j.opt_token(&top_first, "vision_token_id")?,
            video_token_id: j.opt_token(&top_first, "video_token_id")?,
        };

        let cfg = ModelConfig {
            path: path.to_path_buf(),
            text,
            vision,
            special,
            multi_vector_projector_dim: j.opt_usize(&top, "multi_vector_projector_dim")?.unwrap_or(128),
            matryoshka_dims: match j.get(&top, "matryoshka_dims") {
                Some(_) => j.req_usize_list(&top, "matryoshka_dims")?,
                None => vec![128, 256, 512, 1024, 2048],
            },
            task_names: match j.get(&top, "task_names") {
                Some(_) => j.req_string_list(&top, "task_names")?,
                None => Task::ALL.iter().map(|t| t.name().to_string()).collect(),
            },
            single_vector_pool_strategy: j
                .opt_string(&top, "single_vector_pool_strategy")?
                .unwrap_or_else(|| "mean".into()),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The tasks, in `task_names` order (valid after [`ModelConfig::validate`]).
    pub fn tasks(&self) -> Vec<Task> {
        self.task_names.iter().filter_map(|n| n.parse().ok()).collect()
    }

    /// Rejects dimensions the engine cannot run (or that contradict each other), naming the keys.
    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(config_err(&self.path, msg));
        let t = &self.text;
        for (k, v) in [
            ("hidden_size", t.hidden_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
            ("num_key_value_heads", t.num_key_value_heads),
            ("head_dim", t.head_dim),
            ("intermediate_size", t.intermediate_size),
            ("vocab_size", t.vocab_size),
        ] {
            if v == 0 {
                return err(format!("{k} must be > 0"));
            }
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            return err(format!(
                "hidden_size ({}) is not divisible by num_attention_heads ({})",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if t.num_attention_heads % t.num_key_value_heads != 0 {
            return err(format!(
                "num_attention_heads ({}) is not divisible by num_key_value_heads ({})",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if t.head_dim * t.num_attention_heads != t.hidden_size {
            return err(format!(
                "head_dim ({}) × num_attention_heads ({}) != hidden_size ({})",
                t.head_dim, t.num_attention_heads, t.hidden_size
            ));
        }
        let msum: usize = t.mrope_section.iter().sum();
        if msum * 2 != t.head_dim {
            return err(format!(
                "rope_scaling.mrope_section {:?} sums to {msum}, but must sum to head_dim / 2 = {}",
                t.mrope_section,
                t.head_dim as f64 / 2.0
            ));
        }
        if !(t.rms_norm_eps.is_finite() && t.rms_norm_eps > 0.0) {
            return err(format!("rms_norm_eps must be finite and > 0, found {}", t.rms_norm_eps));
        }
        if !(t.rope_theta.is_finite() && t.rope_theta > 0.0) {
            return err(format!("rope_theta must be finite and > 0, found {}", t.rope_theta));
        }
        if t.hidden_act != "silu" {
            return err(format!("hidden_act {:?} is not supported (only \"silu\")", t.hidden_act));
        }

        let v = &self.vision;
        for (k, val) in [
            ("depth", v.depth),
            ("hidden_size", v.hidden_size),
            ("num_heads", v.num_heads),
            ("intermediate_size", v.intermediate_size),
            ("patch_size", v.patch_size),
            ("temporal_patch_size", v.temporal_patch_size),
            ("spatial_merge_size", v.spatial_merge_size),
            ("in_channels", v.in_channels),
            ("window_size", v.window_size),
            ("out_hidden_size", v.out_hidden_size),
        ] {
            if val == 0 {
                return err(format!("vision_config.{k} must be > 0"));
            }
        }
        if v.hidden_size % v.num_heads != 0 {
            return err(format!(
                "vision_config.hidden_size ({}) is not divisible by vision_config.num_heads ({})",
                v.hidden_size, v.num_heads
            ));
        }
        if v.head_dim() % 4 != 0 {
            return err(format!(
                "vision head_dim = vision_config.hidden_size / vision_config.num_heads = {} must be \
                 even and divisible by 4 (2-D rotary splits it into row and column halves)",
                v.head_dim()
            ));
        }
        if v.window_size % (v.patch_size * v.spatial_merge_size) != 0 {
            return err(format!(
                "vision_config.window_size ({}) is not a multiple of patch_size × \
                 spatial_merge_size ({})",
                v.window_size,
                v.patch_size * v.spatial_merge_size
            ));
        }
        for (n, &i) in v.fullatt_block_indexes.iter().enumerate() {
            if i >= v.depth {
                return err(format!(
                    "vision_config.fullatt_block_indexes contains {i}, but vision_config.depth is {}",
                    v.depth
                ));
            }
            if v.fullatt_block_indexes[..n].contains(&i) {
                return err(format!("vision_config.fullatt_block_indexes repeats {i}"));
            }
        }
        if v.out_hidden_size != t.hidden_size {
            return err(format!(
                "vision_config.out_hidden_size ({}) != hidden_size ({}): merged image tokens \
                 must have the LM's width",
                v.out_hidden_size, t.hidden_size
            ));
        }
        if v.hidden_act != "silu" {
            return err(format!(
                "vision_config.hidden_act {:?} is not supported (only \"silu\")",
                v.hidden_act
            ));
        }

        let s = &self.special;
        let ids = [
            ("bos_token_id", Some(s.bos_token_id)),
            ("eos_token_id", Some(s.eos_token_id)),
            ("vision_start_token_id", Some(s.vision_start_token_id)),
            ("vision_end_token_id", Some(s.vision_end_token_id)),
            ("image_token_id", Some(s.image_token_id)),
            ("vision_token_id", s.vision_token_id),
            ("video_token_id", s.video_token_id),
        ];
        for (k, id) in ids {
            if let Some(id) = id {
                if id as usize >= t.vocab_size {
                    return err(format!("{k} ({id}) is not below vocab_size ({})", t.vocab_size));
                }
            }
        }

        if self.multi_vector_projector_dim == 0 {
            return err("multi_vector_projector_dim must be > 0".into());
        }
        let m = &self.matryoshka_dims;
        if m.is_empty() || m[0] == 0 || m.windows(2).any(|w| w[0] >= w[1]) {
            return err(format!("matryoshka_dims {m:?} must be non-empty, > 0 and strictly ascending"));
        }
        if let Some(&last) = m.last() {
            if last > t.hidden_size {
                return err(format!("matryoshka_dims {m:?}: {last} exceeds hidden_size ({})", t.hidden_size));
            }
        }
        let known = Task::ALL.map(|t| t.name());
        let mut seen = [false; 3];
        for name in &self.task_names {
            match known.iter().position(|k| k == name) {
                Some(i) if !seen[i] => seen[i] = true,
                Some(_) => return err(format!("task_names repeats {name:?}")),
                None => {
                    return err(format!("task_names contains unknown task {name:?} (expected {known:?})"))
                }
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return err(format!("task_names {:?} lacks {:?}", self.task_names, known[i]));
        }
        if self.single_vector_pool_strategy != "mean" {
            return err(format!(
                "single_vector_pool_strategy {:?} is not supported (only \"mean\")",
                self.single_vector_pool_strategy
            ));
        }
        Ok(())
    }
}

fn config_err(file: &Path, msg: String) -> Error {
    Error::Config { file: file.to_path_buf(), msg }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn parse_json(text: &str, path: &Path) -> Result<Value> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| config_err(path, format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(config_err(path, "expected a JSON object at the top level".into()));
    }
    Ok(v)
}

/// One place to look for a key: the top level (`key: None`) or a nested object.
#[derive(Clone, Copy)]
struct Scope {
    key: Option<&'static str>,
}

impl Scope {
    const TOP: Scope = Scope { key: None };

    fn path(&self, key: &str) -> String {
        match self.key {
            Some(s) => format!("{s}.{key}"),
            None => key.to_string(),
        }
    }
}

/// Key lookups over an ordered list of scopes, with errors that name the key and the file.
struct Lookup<'a> {
    file: &'a Path,
    root: &'a Value,
}

impl<'a> Lookup<'a> {
    fn scope(&self, s: &Scope) -> Option<&'a Map<String, Value>> {
        match s.key {
            None => self.root.as_object(),
            Some(k) => self.root.get(k).and_then(Value::as_object),
        }
    }

    /// The first non-null value of `key` in `scopes`, with the dotted path where it was found.
    fn find(&self, scopes: &[Scope], key: &str) -> Option<(&'a Value, String)> {
        scopes.iter().find_map(|s| {
            self.scope(s).and_then(|m| m.get(key)).filter(|v| !v.is_null()).map(|v| (v, s.path(key)))
        })
    }

    fn get(&self, scopes: &[Scope], key: &str) -> Option<&'a Value> {
        self.find(scopes, key).map(|(v, _)| v)
    }

    fn missing(&self, scopes: &[Scope], key: &str) -> Error {
        let places: Vec<String> = scopes
            .iter()
            .map(|s| match s.key {
                Some(k) => format!("in `{k}`"),
                None => "at the top level".to_string(),
            })
            .collect();
        config_err(self.file, format!("missing key `{key}` (looked {})", places.join(" and ")))
    }

    fn bad(&self, path: &str, want: &str, v: &Value) -> Error {
        config_err(self.file, format!("key `{path}`: expected {want}, found {v}"))
    }

    fn opt_usize(&self, scopes: &[Scope], key: &str) -> Result<Option<usize>> {
        match self.find(scopes, key) {
            None => Ok(None),
            Some((v, p)) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.bad(&p, "a non-negative integer", v)),
        }
    }

    fn req_usize(&self, scopes: &[Scope], key: &str) -> Result<usize> {
        self.opt_usize(scopes, key)?.ok_or_else(|| self.missing(scopes, key))
    }

    /// The first of `keys` present: one value spelled differently across config versions.
    fn req_usize_any(&self, scopes: &[Scope], keys: &[&str]) -> Result<usize> {
        for k in keys {
            if let Some(v) = self.opt_usize(scopes, k)? {
                return Ok(v);
            }
        }
        Err(self.missing(scopes, &keys.join("` or `")))
    }

    fn opt_f64(&self, scopes: &[Scope], key: &str) -> Result<Option<f64>> {
        match self.find(scopes, key) {
            None => Ok(None),
            Some((v, p)) => v.as_f64().map(Some).ok_or_else(|| self.bad(&p, "a number", v)),
        }
    }

    fn req_f64(&self, scopes: &[Scope], key: &str) -> Result<f64> {
        self.opt_f64(scopes, key)?.ok_or_else(|| self.missing(scopes, key))
    }

    fn opt_bool(&self, scopes: &[Scope], key: &str) -> Result<Option<bool>> {
        match self.find(scopes, key) {
            None => Ok(None),
            Some((v, p)) => v.as_bool().map(Some).ok_or_else(|| self.bad(&p, "true or false", v)),
        }
    }

    fn opt_string(&self, scopes: &[Scope], key: &str) -> Result<Option<String>> {
        match self.find(scopes, key) {
            None => Ok(None),
            Some((v, p)) => {
                v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| self.bad(&p, "a string", v))
            }
        }
    }

    /// A token id; a list (as in some generation configs) means its first element.
    fn opt_token(&self, scopes: &[Scope], key: &str) -> Result<Option<u32>> {
        match self.find(scopes, key) {
            None => Ok(None),
            Some((v, p)) => {
                let n = match v {
                    Value::Array(a) => a.first(),
                    _ => Some(v),
                };
                n.and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| self.bad(&p, "a token id (u32)", v))
            }
        }
    }

    fn req_token(&self, scopes: &[Scope], key: &str) -> Result<u32> {
        self.opt_token(scopes, key)?.ok_or_else(|| self.missing(scopes, key))
    }

    fn req_list(&self, scopes: &[Scope], key: &str) -> Result<(&'a Vec<Value>, String)> {
        let (v, p) = self.find(scopes, key).ok_or_else(|| self.missing(scopes, key))?;
        v.as_array().map(|a| (a, p.clone())).ok_or_else(|| self.bad(&p, "a list", v))
    }

    fn req_usize_list(&self, scopes: &[Scope], key: &str) -> Result<Vec<usize>> {
        let (a, p) = self.req_list(scopes, key)?;
        a.iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.bad(&p, "a list of non-negative integers", x))
            })
            .collect()
    }

    fn req_string_list(&self, scopes: &[Scope], key: &str) -> Result<Vec<String>> {
        let (a, p) = self.req_list(scopes, key)?;
        a.iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| self.bad(&p, "a list of strings", x)))
            .collect()
    }

    fn req_f32x3(&self, scopes: &[Scope], key: &str) -> Result<[f32; 3]> {
        let (a, p) = self.req_list(scopes, key)?;
        let v: Vec<f32> = a
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32).ok_or_else(|| self.bad(&p, "a list of numbers", x)))
            .collect::<Result<_>>()?;
        v.try_into().map_err(|v: Vec<f32>| {
            config_err(self.file, format!("key `{p}`: expected 3 values, found {}", v.len()))
        })
    }

    /// `rope_scaling` or `rope_parameters` (transformers v5), first found in `scopes`.
    fn rope_dict(&self, scopes: &[Scope]) -> Result<Option<&'a Map<String, Value>>> {
        for s in scopes {
            for key in ["rope_scaling", "rope_parameters"] {
                if let Some(v) = self.scope(s).and_then(|m| m.get(key)).filter(|v| !v.is_null()) {
                    let p = s.path(key);
                    let dict = v.as_object().ok_or_else(|| self.bad(&p, "an object", v))?;
                    let kind = dict
                        .get("rope_type")
                        .filter(|v| !v.is_null())
                        .or_else(|| dict.get("type").filter(|v| !v.is_null()));
                    if let Some(kind) = kind {
                        // transformers renames Qwen2-VL's "mrope" to "default"; both are plain RoPE.
                        if !matches!(kind.as_str(), Some("default") | Some("mrope")) {
                            return Err(config_err(
                                self.file,
                                format!(
                                    "key `{p}.rope_type`: {kind} is not supported (only \
                                     \"default\" / \"mrope\")"
                                ),
                            ));
                        }
                    }
                    return Ok(Some(dict));
                }
            }
        }
        Ok(None)
    }

    fn mrope_section(&self, dict: &Map<String, Value>) -> Result<[usize; 3]> {
        let p = "rope_scaling.mrope_section";
        let v = dict
            .get("mrope_section")
            .filter(|v| !v.is_null())
            .ok_or_else(|| config_err(self.file, format!("missing key `{p}`")))?;
        let list: Option<Vec<usize>> = v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok())).collect());
        match list {
            Some(l) if l.len() == 3 => Ok([l[0], l[1], l[2]]),
            _ => Err(self.bad(p, "a list of 3 non-negative integers", v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vision() -> Value {
        json!({
            "depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
            "hidden_act": "silu", "patch_size": 14, "temporal_patch_size": 2,
            "spatial_merge_size": 2, "in_chans": 3, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31], "out_hidden_size": 2048,
            "tokens_per_second": 2
        })
    }

    fn text_fields() -> Value {
        json!({
            "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
            "num_key_value_heads": 2, "intermediate_size": 11008, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "vocab_size": 151936, "hidden_act": "silu",
            "tie_word_embeddings": true, "max_position_embeddings": 128000,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}
        })
    }

    fn specials(v: &mut Value) {
        let m = v.as_object_mut().unwrap();
        for (k, id) in [
            ("bos_token_id", 151643),
            ("eos_token_id", 151645),
            ("vision_start_token_id", 151652),
            ("vision_end_token_id", 151653),
            ("vision_token_id", 151654),
            ("image_token_id", 151655),
            ("video_token_id", 151656),
        ] {
            m.insert(k.into(), json!(id));
        }
    }

    fn check_real_values(c: &ModelConfig) {
        assert_eq!(c.text.hidden_size, 2048);
        assert_eq!(c.text.num_hidden_layers, 36);
        assert_eq!(c.text.num_attention_heads, 16);
        assert_eq!(c.text.num_key_value_heads, 2);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.intermediate_size, 11008);
        assert_eq!(c.text.mrope_section, [16, 24, 24]);
        assert_eq!(c.text.rope_theta, 1e6);
        assert_eq!(c.text.vocab_size, 151936);
        assert_eq!(c.vision.in_channels, 3);
        assert_eq!(c.vision.head_dim(), 80);
        assert_eq!(c.vision.merged_dim(), 5120);
        assert_eq!(c.vision.fullatt_block_indexes, vec![7, 15, 23, 31]);
        assert_eq!(c.special.image_token_id, 151655);
        assert_eq!(c.special.bos_token_id, 151643);
        assert_eq!(c.special.video_token_id, Some(151656));
        assert_eq!(c.multi_vector_projector_dim, 128);
        assert_eq!(c.matryoshka_dims, vec![128, 256, 512, 1024, 2048]);
        assert_eq!(c.tasks(), Task::ALL.to_vec());
        assert_eq!(c.single_vector_pool_strategy, "mean");
    }

    #[test]
    fn nested_text_config_layout() {
        let mut v = json!({
            "architectures": ["JinaEmbeddingsV4Model"],
            "text_config": text_fields(),
            "vision_config": vision(),
            "some_future_key": {"x": 1},
            "task_names": ["retrieval", "text-matching", "code"],
        });
        specials(&mut v);
        // A conflicting top-level value must lose against text_config.
        v["hidden_size"] = json!(999);
        let c = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")).unwrap();
        check_real_values(&c);
    }

    #[test]
    fn flat_top_level_layout_with_defaults() {
        let mut v = text_fields();
        v["vision_config"] = vision();
        v["head_dim"] = Value::Null; // null means absent: derived as hidden / heads
        specials(&mut v);
        let c = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")).unwrap();
        check_real_values(&c);
    }

    #[test]
    fn rope_theta_inside_rope_parameters() {
        let mut t = text_fields();
        t.as_object_mut().unwrap().remove("rope_theta");
        t.as_object_mut().unwrap().remove("rope_scaling");
        t["rope_parameters"] =
            json!({"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]});
        let mut v = json!({"text_config": t, "vision_config": vision()});
        specials(&mut v);
        let c = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")).unwrap();
        check_real_values(&c);
    }

    #[test]
    fn missing_key_names_key_and_file() {
        let mut v = json!({"text_config": text_fields(), "vision_config": vision()});
        specials(&mut v);
        v.as_object_mut().unwrap().remove("image_token_id");
        let e =
            ModelConfig::from_json_str(&v.to_string(), Path::new("/m/config.json")).unwrap_err().to_string();
        assert!(e.contains("image_token_id") && e.contains("/m/config.json"), "{e}");
    }

    #[test]
    fn side_configs() {
        let p = PreprocessorConfig::from_json_str(
            r#"{"patch_size":14,"temporal_patch_size":2,"merge_size":2,
               "image_mean":[0.48145466,0.4578275,0.40821073],
               "image_std":[0.26862954,0.26130258,0.27577711]}"#,
            Path::new("p.json"),
        )
        .unwrap();
        assert_eq!((p.min_pixels, p.max_pixels), (3136, 602112));
        let bad = PreprocessorConfig::from_json_str(
            r#"{"patch_size":14,"temporal_patch_size":2,"merge_size":2,"min_pixels":10,
               "max_pixels":5,"image_mean":[0,0,0],"image_std":[1,1,1]}"#,
            Path::new("p.json"),
        );
        assert!(bad.unwrap_err().to_string().contains("min_pixels"));
        let a = AdapterConfig::from_json_str(r#"{"r":32,"lora_alpha":32}"#, Path::new("a.json")).unwrap();
        assert_eq!(a.scale(), 1.0);
        let a = AdapterConfig::from_json_str(
            r#"{"r":16,"lora_alpha":32,"use_rslora":true}"#,
            Path::new("a.json"),
        )
        .unwrap();
        assert_eq!(a.scale(), 8.0);
        assert!(AdapterConfig::from_json_str(r#"{"r":0,"lora_alpha":1}"#, Path::new("a.json")).is_err());
    }
}
