//! Host-side checkpoint reading: configs, the shard index, safetensors files, and validation of
//! every tensor against the table the config implies (docs/MODEL.md §9,
//! [`crate::model::schema`]).
//!
//! Tensor data is read with positioned reads (`pread`), never through a memory map: a shard that
//! is truncated or fails (e.g. on NFS) while the model loads is an [`Error::Tensor`] naming the
//! file and the tensor, where a mapped read would kill the process with SIGBUS. The header is
//! checked against the file's length at open time (every tensor's bytes must lie in the file).
//!
//! Stored names come in two spellings (legacy `model.layers.*` / `visual.*` and new
//! `model.language_model.*` / `model.visual.*`, docs/MODEL.md §9.1b); both are normalised to one
//! canonical name, so the rest of the engine never sees a prefix. Everything is checked at open
//! time — missing, unexpected, duplicated, mis-shaped or mis-typed tensors — so that the GPU upload
//! that follows can assume a complete, well-formed table.

use crate::model::config::{AdapterConfig, ModelConfig, PreprocessorConfig};
use crate::model::schema::{Schema, TensorSpec};
use crate::model::Task;
use crate::{Error, Result};
use half::{bf16, f16};
use safetensors::tensor::Metadata;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single-file alternative to a sharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The adapters' weights, relative to the checkpoint folder.
pub const ADAPTER_FILE: &str = "adapters/adapter_model.safetensors";
/// The adapters' config, relative to the checkpoint folder.
pub const ADAPTER_CONFIG_FILE: &str = "adapters/adapter_config.json";

/// Element types the engine accepts in a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// bfloat16 (the real checkpoint's dtype).
    BF16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }

    /// The safetensors header spelling (`"BF16"`, `"F16"`, `"F32"`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F32 => "F32",
        }
    }

    fn from_safetensors(d: safetensors::Dtype) -> Option<Dtype> {
        match d {
            safetensors::Dtype::BF16 => Some(Dtype::BF16),
            safetensors::Dtype::F16 => Some(Dtype::F16),
            safetensors::Dtype::F32 => Some(Dtype::F32),
            _ => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a tensor lives: the base shards or the adapters file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// `model-*.safetensors` (or `model.safetensors`).
    Base,
    /// `adapters/adapter_model.safetensors`.
    Adapter,
}

/// One row of the table of tensors a config implies (see [`crate::model::schema`]).
pub type ExpectedTensor = TensorSpec;

/// One tensor found in the checkpoint, validated against the expected table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Canonical name.
    pub name: String,
    /// The name as stored in the file (for messages).
    pub stored_name: String,
    /// The safetensors file holding it.
    pub file: PathBuf,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Base shard or adapters file.
    pub source: Source,
    file_index: usize,
    range: Range<usize>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of bytes in the file.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// An opened, fully validated checkpoint folder. Holds the open shard files; tensor data is read
/// on demand ([`Checkpoint::read`], [`Checkpoint::to_bf16`]) with positioned reads.
#[derive(Debug)]
pub struct Checkpoint {
    /// The checkpoint folder.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: ModelConfig,
    /// `preprocessor_config.json`.
    pub preprocessor: PreprocessorConfig,
    /// `adapters/adapter_config.json`.
    pub adapter: AdapterConfig,
    /// Documented stale keys that were skipped (`lm_head.weight`, `single_vector_projector*`),
    /// as stored name and file, so a report can list them.
    pub ignored: Vec<(String, PathBuf)>,
    files: Vec<PathBuf>,
    shards: Vec<File>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

/// Normalises a stored name (docs/MODEL.md §9.1): drops PEFT's `base_model.model.`, maps
/// `model.visual.` → `visual.`, and strips `model.language_model.` or `model.` from LM names.
/// Names without a known prefix (`visual.*`, `multi_vector_projector.*`, `lm_head.*`) are kept.
pub fn canonical_name(stored: &str) -> String {
    let s = stored.strip_prefix("base_model.model.").unwrap_or(stored);
    if let Some(rest) = s.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else if let Some(rest) = s.strip_prefix("model.language_model.") {
        rest.to_string()
    } else if let Some(rest) = s.strip_prefix("model.") {
        rest.to_string()
    } else {
        s.to_string()
    }
}

/// Keys that may be present but are deliberately unused: the tied LM head and the stale
/// single-vector projector (docs/MODEL.md §6, §9.2).
fn is_ignored(canonical: &str) -> bool {
    canonical == "lm_head.weight" || canonical.starts_with("single_vector_projector")
}

/// The task of a canonical LoRA name (`….lora_{A|B}.<task>.weight`).
fn lora_task(canonical: &str) -> Option<Task> {
    let stem = canonical.strip_suffix(".weight")?;
    let (head, task) = stem.rsplit_once('.')?;
    if head.ends_with(".lora_A") || head.ends_with(".lora_B") {
        task.parse().ok()
    } else {
        None
    }
}

/// The full tensor table implied by the configs (docs/MODEL.md §9.2, §9.3), base tensors first: the
/// rows of [`Schema::tensors`].
pub fn expected_tensors(cfg: &ModelConfig, adapter: &AdapterConfig) -> Vec<ExpectedTensor> {
    Schema::new(cfg, adapter).tensors()
}

/// One tensor as found in a safetensors header, before validation.
struct RawTensor {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// The largest safetensors header accepted (the format's own limit, 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Opens `path` and parses its safetensors header (read with positioned reads, bounded by the
/// file's length); every tensor's byte range must lie inside the file. Every failure names the
/// file.
fn open_safetensors(path: &Path) -> Result<(File, Vec<RawTensor>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Checkpoint { file: path.to_path_buf(), msg };
    const TRUNC: &str = " (the file is truncated or was not fully written)";
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    if len < 8 {
        return Err(bad(format!("not a valid safetensors file: {len} bytes, no header{TRUNC}")));
    }
    file.read_exact_at(&mut n, 0).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!("not a valid safetensors file: header of {n} bytes is too large")));
    }
    if 8 + n > len {
        return Err(bad(format!(
            "not a valid safetensors file: header of {n} bytes in a file of {len} bytes{TRUNC}"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| Error::io(path, e))?;
    let meta: Metadata = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not a valid safetensors file: bad header: {e}")))?;
    let start = 8 + n;
    let data_len = len - start;
    let mut raw = Vec::new();
    for (name, info) in meta.tensors() {
        let (b, e) = info.data_offsets;
        let size = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.bitsize()))
            .map(|bits| bits.div_ceil(8));
        if b > e || size != Some(e - b) {
            return Err(bad(format!(
                "tensor `{name}`: data offsets {b}..{e} do not hold {:?} {:?}",
                info.dtype, info.shape
            )));
        }
        if e as u64 > data_len {
            return Err(bad(format!(
                "tensor `{name}`: data {b}..{e} ends past the data section of {data_len} bytes{TRUNC}"
            )));
        }
        let (b, e) = (start as usize + b, start as usize + e);
        raw.push(RawTensor { name, dtype: info.dtype, shape: info.shape.clone(), range: b..e });
    }
    raw.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((file, raw))
}

/// Shard file → stored names it holds, from the index (or the single file's own header).
type ShardPlan = BTreeMap<String, Vec<String>>;

fn read_index(path: &Path) -> Result<ShardPlan> {
    let bad = |msg: String| Error::Checkpoint { file: path.to_path_buf(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("missing `weight_map` object".into()))?;
    let mut plan = ShardPlan::new();
    for (name, shard) in map {
        let shard =
            shard.as_str().ok_or_else(|| bad(format!("weight_map[{name:?}] is not a file name: {shard}")))?;
        // Shards must sit inside the folder: refuse absolute paths and `..`.
        let p = Path::new(shard);
        if shard.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(bad(format!("weight_map[{name:?}] = {shard:?} is not a plain file name")));
        }
        plan.entry(shard.to_string()).or_default().push(name.clone());
    }
    if plan.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    for names in plan.values_mut() {
        names.sort();
    }
    Ok(plan)
}

/// Accumulates validated tensors across files.
struct Builder<'a> {
    expected: HashMap<&'a str, &'a ExpectedTensor>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    ignored: Vec<(String, PathBuf)>,
}

impl Builder<'_> {
    fn admit(&mut self, raw: RawTensor, file: &Path, file_index: usize, source: Source) -> Result<()> {
        let err = |msg: String| Error::Tensor { name: raw.name.clone(), file: file.to_path_buf(), msg };
        let canonical = canonical_name(&raw.name);
        if is_ignored(&canonical) {
            self.ignored.push((raw.name, file.to_path_buf()));
            return Ok(());
        }
        let Some(exp) = self.expected.get(canonical.as_str()) else {
            return Err(err("unexpected tensor (not part of jina-embeddings-v4)".into()));
        };
        if exp.source != source {
            return Err(err(match source {
                Source::Base => format!("LoRA tensor `{canonical}` belongs in {ADAPTER_FILE}"),
                Source::Adapter => format!("base tensor `{canonical}` belongs in the base shards"),
            }));
        }
        if let Some(&i) = self.by_name.get(&canonical) {
            let first = &self.tensors[i];
            return Err(err(format!(
                "duplicate: `{canonical}` is stored twice, here and as `{}` in {}",
                first.stored_name,
                first.file.display()
            )));
        }
        let Some(dtype) = Dtype::from_safetensors(raw.dtype).filter(|d| exp.dtypes.contains(d)) else {
            let names: Vec<&str> = exp.dtypes.iter().map(|d| d.name()).collect();
            let expected = match names.split_last() {
                Some((last, [])) => last.to_string(),
                Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                None => "none".into(),
            };
            return Err(err(format!("dtype {:?} is not supported (expected {expected})", raw.dtype)));
        };
        if raw.shape != exp.shape {
            return Err(err(format!("shape {:?}, expected {:?}", raw.shape, exp.shape)));
        }
        self.by_name.insert(canonical.clone(), self.tensors.len());
        self.tensors.push(TensorInfo {
            name: canonical,
            stored_name: raw.name,
            file: file.to_path_buf(),
            dtype,
            shape: raw.shape,
            source,
            file_index,
            range: raw.range,
        });
        Ok(())
    }
}

impl Checkpoint {
    /// Opens and validates a checkpoint folder laid out like `jinaai/jina-embeddings-v4`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if !meta.is_dir() {
            return Err(Error::Checkpoint {
                file: dir.to_path_buf(),
                msg: "not a directory (expected a checkpoint folder)".into(),
            });
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let preprocessor = PreprocessorConfig::from_file(&dir.join("preprocessor_config.json"))?;
        for (key, p, v) in [
            ("patch_size", preprocessor.patch_size, config.vision.patch_size),
            ("temporal_patch_size", preprocessor.temporal_patch_size, config.vision.temporal_patch_size),
            ("merge_size", preprocessor.merge_size, config.vision.spatial_merge_size),
        ] {
            if p != v {
                return Err(Error::Config {
                    file: preprocessor.path.clone(),
                    msg: format!("{key} ({p}) disagrees with config.json's vision_config ({v})"),
                });
            }
        }
        let adapter = AdapterConfig::from_file(&dir.join(ADAPTER_CONFIG_FILE))?;

        // The base file set: the index's shards, or one model.safetensors.
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (base_ref, plan) = if index_path.is_file() {
            let plan = read_index(&index_path)?;
            (index_path, Some(plan))
        } else if single_path.is_file() {
            (single_path, None)
        } else {
            return Err(Error::Checkpoint {
                file: dir.to_path_buf(),
                msg: format!("neither {INDEX_FILE} nor {SINGLE_FILE} found"),
            });
        };

        let expected_table = expected_tensors(&config, &adapter);
        let mut b = Builder {
            expected: expected_table.iter().map(|e| (e.name.as_str(), e)).collect(),
            tensors: Vec::with_capacity(expected_table.len()),
            by_name: HashMap::new(),
            ignored: Vec::new(),
        };
        let mut files = Vec::new();
        let mut shards = Vec::new();

        let shard_paths: Vec<PathBuf> = match &plan {
            Some(plan) => plan.keys().map(|f| dir.join(f)).collect(),
            None => vec![base_ref.clone()],
        };
        let mut stored = Vec::with_capacity(shard_paths.len());
        for path in shard_paths {
            let (shard, raw) = open_safetensors(&path)?;
            stored.push(raw.iter().map(|r| r.name.clone()).collect::<Vec<_>>());
            let fi = files.len();
            files.push(path.clone());
            shards.push(shard);
            for r in raw {
                b.admit(r, &path, fi, Source::Base)?;
            }
        }
        // After admission, so that a tensor stored in two shards is reported as a duplicate.
        if let Some(plan) = &plan {
            check_against_index(&base_ref, plan, &files, &stored)?;
        }

        let adapter_path = dir.join(ADAPTER_FILE);
        let (shard, raw) = open_safetensors(&adapter_path)?;
        let fi = files.len();
        files.push(adapter_path.clone());
        shards.push(shard);
        for r in raw {
            b.admit(r, &adapter_path, fi, Source::Adapter)?;
        }

        // A whole task absent is one clear error, not hundreds of missing tensors.
        for task in Task::ALL {
            let of_task = |n: &str| lora_task(n) == Some(task);
            if !b.tensors.iter().any(|t| of_task(&t.name)) {
                let n = expected_table.iter().filter(|e| of_task(&e.name)).count();
                return Err(Error::Checkpoint {
                    file: adapter_path,
                    msg: format!(
                        "adapters for task `{task}` are missing: none of its {n} \
                         lora_A/lora_B tensors is stored"
                    ),
                });
            }
        }
        let missing: Vec<&ExpectedTensor> =
            expected_table.iter().filter(|e| !b.by_name.contains_key(&e.name)).collect();
        if let Some(first) = missing.first() {
            let more = match missing.len() {
                1 => String::new(),
                n => format!(" (and {} more missing tensors)", n - 1),
            };
            return Err(Error::Tensor {
                name: first.name.clone(),
                file: match first.source {
                    Source::Base => base_ref,
                    Source::Adapter => adapter_path,
                },
                msg: format!("missing{more}"),
            });
        }

        let mut tensors = b.tensors;
        tensors.sort_by(|x, y| x.name.cmp(&y.name));
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            preprocessor,
            adapter,
            ignored: b.ignored,
            files,
            shards,
            tensors,
            by_name,
        })
    }

    /// All tensors, sorted by canonical name.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor by canonical name.
    pub fn get(&self, canonical: &str) -> Option<&TensorInfo> {
        self.by_name.get(canonical).map(|&i| &self.tensors[i])
    }

    /// Reads `buf.len()` bytes of tensor `t`'s raw little-endian data, from byte `offset` of the
    /// tensor on. `t` must come from this checkpoint. A short or failed read (a file truncated
    /// or failing after open) is an [`Error::Tensor`] naming the tensor and its file.
    pub fn read_at(&self, t: &TensorInfo, offset: usize, buf: &mut [u8]) -> Result<()> {
        let err = |msg: String| Error::Tensor { name: t.stored_name.clone(), file: t.file.clone(), msg };
        let len = t.range.len();
        if offset.checked_add(buf.len()).is_none_or(|end| end > len) {
            return Err(err(format!(
                "read of {} bytes at {offset} past the tensor's {len} bytes",
                buf.len()
            )));
        }
        let at = (t.range.start + offset) as u64;
        self.shards[t.file_index].read_exact_at(buf, at).map_err(|e| {
            err(format!(
                "cannot read {} bytes at file offset {at}: {e} (the file is truncated or failing)",
                buf.len()
            ))
        })
    }

    /// Reads all of tensor `t`'s raw bytes into `buf` (which must hold [`TensorInfo::nbytes`]).
    pub fn read(&self, t: &TensorInfo, buf: &mut [u8]) -> Result<()> {
        if buf.len() != t.range.len() {
            return Err(Error::Tensor {
                name: t.stored_name.clone(),
                file: t.file.clone(),
                msg: format!("a buffer of {} bytes for a tensor of {} bytes", buf.len(), t.range.len()),
            });
        }
        self.read_at(t, 0, buf)
    }

    /// Tensor `t`'s raw little-endian bytes, in a new vector.
    pub fn data(&self, t: &TensorInfo) -> Result<Vec<u8>> {
        let mut v = vec![0u8; t.range.len()];
        self.read(t, &mut v)?;
        Ok(v)
    }

    /// The tensor as bf16: BF16 is copied, F16 and F32 are rounded to nearest even.
    pub fn to_bf16(&self, t: &TensorInfo) -> Result<Vec<bf16>> {
        if t.dtype == Dtype::BF16 {
            // Read straight into the result (no second copy); the bytes are little-endian.
            let mut v = vec![bf16::ZERO; t.numel()];
            self.read(t, bytemuck::cast_slice_mut(&mut v))?;
            for x in &mut v {
                *x = bf16::from_bits(u16::from_le(x.to_bits()));
            }
            return Ok(v);
        }
        let d = self.data(t)?;
        Ok(match t.dtype {
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| bf16::from_f32(f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
                .collect(),
            Dtype::F32 => {
                d.chunks_exact(4).map(|c| f32_to_bf16(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()
            }
            Dtype::BF16 => unreachable!("handled above"),
        })
    }

    /// Sum of [`TensorInfo::nbytes`] over all (non-ignored) tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes() as u64).sum()
    }

    /// The safetensors files read: base shards, then the adapters file.
    pub fn files(&self) -> Vec<PathBuf> {
        self.files.clone()
    }
}

/// f32 → bf16, round to nearest even (F16 goes through f32 exactly, so one rounding either way).
pub(crate) fn f32_to_bf16(x: f32) -> bf16 {
    bf16::from_f32(x)
}

/// The index and the shards must agree both ways: a tensor the index places in a shard must be
/// there, and a tensor stored in a shard must be listed for it (otherwise the index is stale).
/// `files[i]` and `stored[i]` (sorted names) belong to the i-th shard of `plan`.
fn check_against_index(
    index: &Path,
    plan: &ShardPlan,
    files: &[PathBuf],
    stored: &[Vec<String>],
) -> Result<()> {
    let err = |name: &str, file: &Path, msg: String| Error::Tensor {
        name: name.to_string(),
        file: file.to_path_buf(),
        msg,
    };
    for ((listed, file), stored) in plan.values().zip(files).zip(stored) {
        if let Some(name) = listed.iter().find(|n| stored.binary_search(n).is_err()) {
            let msg = format!("listed for this file in {} but not stored in it", index.display());
            return Err(err(name, file, msg));
        }
        if let Some(name) = stored.iter().find(|n| listed.binary_search(n).is_err()) {
            let msg = match plan.iter().find(|(_, l)| l.binary_search(name).is_ok()) {
                Some((other, _)) => {
                    format!("stored in this file, but {} maps it to {other}", index.display())
                }
                None => format!("stored in this file but not listed in {}", index.display()),
            };
            return Err(err(name, file, msg));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_to_bf16_rounds_to_nearest_even() {
        // bf16 keeps 7 mantissa bits: the step at 1.0 is u = 2^-7; h = u/2 is a halfway point.
        let u = 1.0 / 128.0;
        let h = u / 2.0;
        let cases: [(f32, f32); 7] = [
            (1.0, 1.0),
            (1.0 + h, 1.0),                 // 1.00390625: tie between 1.0 and 1+u → even (1.0)
            (1.0 + 3.0 * h, 1.0 + 2.0 * u), // 1.01171875: tie between 1+u and 1+2u → 1.015625
            (1.0 + 1.5 * h, 1.0 + u),       // above halfway: up
            (1.0 + 0.5 * h, 1.0),           // below halfway: down
            (-(1.0 + 3.0 * h), -(1.0 + 2.0 * u)),
            (0.0, 0.0),
        ];
        // The values named in the brief, exactly (f64 literals: both are exact in f32 too).
        assert_eq!(((1.0 + h) as f64, (1.0 + 3.0 * h) as f64), (1.003_906_25, 1.011_718_75));
        for (x, want) in cases {
            assert_eq!(f32_to_bf16(x).to_f32(), want, "{x}");
        }
        assert!(f32_to_bf16(f32::NAN).is_nan());
        assert_eq!(f32_to_bf16(f32::INFINITY).to_f32(), f32::INFINITY);
    }

    #[test]
    fn canonical_names_from_both_spellings() {
        for (stored, canon) in [
            ("model.embed_tokens.weight", "embed_tokens.weight"),
            ("model.language_model.layers.3.mlp.up_proj.weight", "layers.3.mlp.up_proj.weight"),
            ("model.layers.3.mlp.up_proj.weight", "layers.3.mlp.up_proj.weight"),
            ("visual.blocks.3.attn.qkv.bias", "visual.blocks.3.attn.qkv.bias"),
            ("model.visual.blocks.3.attn.qkv.bias", "visual.blocks.3.attn.qkv.bias"),
            ("multi_vector_projector.weight", "multi_vector_projector.weight"),
            (
                "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.code.weight",
                "layers.0.self_attn.q_proj.lora_A.code.weight",
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.retrieval.weight",
                "layers.0.self_attn.q_proj.lora_B.retrieval.weight",
            ),
            (
                "base_model.model.multi_vector_projector.lora_A.text-matching.weight",
                "multi_vector_projector.lora_A.text-matching.weight",
            ),
        ] {
            assert_eq!(canonical_name(stored), canon);
        }
        assert!(is_ignored(&canonical_name("lm_head.weight")));
        assert!(is_ignored(&canonical_name("base_model.model.single_vector_projector.lora_A.code.weight")));
        assert_eq!(lora_task("multi_vector_projector.lora_B.text-matching.weight"), Some(Task::TextMatching));
        assert_eq!(lora_task("layers.0.mlp.up_proj.weight"), None);
    }
}
