//! Checkpoint loading on synthetic tiny checkpoints (CPU only): the good path, and one test per
//! bad input, each checking that the message names what is wrong and where.

use jv4::model::checkpoint::{expected_tensors, ADAPTER_FILE, INDEX_FILE};
use jv4::model::synth::{self, Preset, SynthSpec, SHARD_FILES};
use jv4::model::{AdapterConfig, Checkpoint, Dtype, ModelConfig, Source};
use jv4::Error;
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};

const SHARD2: &str = SHARD_FILES[1];

/// A fresh tiny checkpoint (F32 adapters, so conversion is exercised) in its own temp dir.
fn tiny() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("jina-v4-tiny");
    let spec = SynthSpec { seed: 7, preset: Preset::Tiny, adapter_dtype: Dtype::F32 };
    synth::write_checkpoint(&dir, &spec).unwrap();
    (tmp, dir)
}

fn open_err(dir: &Path) -> (Error, String) {
    let e = Checkpoint::open(dir).unwrap_err();
    let s = e.to_string();
    eprintln!("{s}"); // shown with --nocapture, to review the wording
    (e, s)
}

type Owned = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Rewrites a safetensors file after `edit` changed its (owned) tensor list.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<Owned>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<Owned> =
        st.iter().map(|(n, t)| (n.to_string(), t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    edit(&mut v);
    let views: Vec<(String, TensorView)> =
        v.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Applies `edit` to the index's weight_map.
fn edit_index(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join(INDEX_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(v["weight_map"].as_object_mut().unwrap());
    std::fs::write(&p, v.to_string()).unwrap();
}

/// Adds a tensor to shard 2 and lists it in the index.
fn add_to_shard2(dir: &Path, name: &str, dtype: safetensors::Dtype, shape: &[usize]) {
    let n: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
    rewrite(&dir.join(SHARD2), |v| v.push((name.into(), dtype, shape.to_vec(), vec![0; n])));
    edit_index(dir, |m| {
        m.insert(name.into(), SHARD2.into());
    });
}

#[test]
fn tiny_checkpoint_opens_with_every_expected_tensor() {
    let (_tmp, dir) = tiny();
    let ck = Checkpoint::open(&dir).unwrap();
    let table = expected_tensors(&ck.config, &ck.adapter);
    assert_eq!(ck.tensors().len(), table.len());
    for e in &table {
        let t = ck.get(&e.name).unwrap_or_else(|| panic!("{} absent", e.name));
        assert_eq!((&t.shape, t.source), (&e.shape, e.source), "{}", e.name);
        assert_eq!(ck.data(t).unwrap().len(), t.nbytes());
        assert_eq!(t.dtype, if e.source == Source::Base { Dtype::BF16 } else { Dtype::F32 });
    }
    assert!(ck.tensors().windows(2).all(|w| w[0].name < w[1].name), "sorted by name");

    // Ignored keys are reported with their file.
    assert_eq!(ck.ignored, vec![("lm_head.weight".to_string(), dir.join(SHARD2))]);

    // Both spellings normalised; the split layer is looked up across shards.
    let q = ck.get("layers.1.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.stored_name, "model.layers.1.self_attn.q_proj.weight");
    assert_eq!(q.file, dir.join(SHARD_FILES[0]));
    assert_eq!(ck.get("layers.1.mlp.up_proj.weight").unwrap().file, dir.join(SHARD2));
    let a = ck.get("layers.0.self_attn.q_proj.lora_A.text-matching.weight").unwrap();
    assert_eq!(
        a.stored_name,
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.text-matching.weight"
    );
    assert_eq!(a.shape, vec![4, 256]);

    // F32 → bf16 is per-element round-to-nearest-even of the stored floats.
    let raw: Vec<f32> =
        ck.data(a).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let conv = ck.to_bf16(a).unwrap();
    assert_eq!(conv.len(), a.numel());
    assert!(raw.iter().zip(&conv).all(|(x, y)| half::bf16::from_f32(*x) == *y));
    assert!(raw.iter().all(|x| *x != 0.0), "LoRA values are non-zero");
    let norm = ck.get("norm.weight").unwrap();
    assert!(ck.to_bf16(norm).unwrap().iter().all(|x| (0.89..=1.11).contains(&x.to_f32())));

    assert_eq!(ck.total_bytes(), ck.tensors().iter().map(|t| t.nbytes() as u64).sum::<u64>());
    assert_eq!(ck.files(), vec![dir.join(SHARD_FILES[0]), dir.join(SHARD2), dir.join(ADAPTER_FILE)]);
    assert_eq!(ck.config.special.image_token_id, 2012);
    assert_eq!(ck.adapter.scale(), 2.0);

    // Same seed, same bytes.
    let (_tmp2, dir2) = tiny();
    let ck2 = Checkpoint::open(&dir2).unwrap();
    assert_eq!(ck.data(q).unwrap(), ck2.data(ck2.get(&q.name).unwrap()).unwrap());
}

#[test]
fn full_preset_table_matches_spec_parameter_counts() {
    let cfg =
        ModelConfig::from_json_str(&synth::config_json(Preset::Full).to_string(), Path::new("config.json"))
            .unwrap();
    let ad = AdapterConfig::from_json_str(
        &synth::adapter_config_json(Preset::Full).to_string(),
        Path::new("adapter_config.json"),
    )
    .unwrap();
    let table = expected_tensors(&cfg, &ad);
    let count = |src: Source| -> usize {
        table.iter().filter(|e| e.source == src).map(|e| e.shape.iter().product::<usize>()).sum()
    };
    // docs/MODEL.md §6: 59.94M LoRA parameters per task; §9.2: about 3.75B base parameters.
    assert_eq!(count(Source::Adapter), 3 * (36 * (131072 + 73728 + 73728 + 131072 + 3 * 417792) + 69632));
    let base = count(Source::Base);
    assert!((3.70e9..3.80e9).contains(&(base as f64)), "{base}");
    assert_eq!(table.iter().filter(|e| e.source == Source::Adapter).count(), 36 * 7 * 3 * 2 + 6);
    let pe = table.iter().find(|e| e.name == "visual.patch_embed.proj.weight").unwrap();
    assert_eq!(pe.shape, vec![1280, 3, 2, 14, 14]);
}

#[test]
fn single_file_checkpoint_without_index() {
    let (_tmp, dir) = tiny();
    let merged = dir.join("model.safetensors");
    std::fs::copy(dir.join(SHARD_FILES[0]), &merged).unwrap();
    let second = std::fs::read(dir.join(SHARD2)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&second).unwrap();
    rewrite(&merged, |v| {
        v.extend(st.iter().map(|(n, t)| (n.into(), t.dtype(), t.shape().to_vec(), t.data().to_vec())))
    });
    for f in [INDEX_FILE, SHARD_FILES[0], SHARD2] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.files(), vec![merged.clone(), dir.join(ADAPTER_FILE)]);
    assert_eq!(ck.get("norm.weight").unwrap().file, merged);
}

#[test]
fn stale_single_vector_projector_is_ignored() {
    let (_tmp, dir) = tiny();
    add_to_shard2(&dir, "single_vector_projector.weight", safetensors::Dtype::BF16, &[8, 256]);
    let ck = Checkpoint::open(&dir).unwrap();
    let names: Vec<&str> = ck.ignored.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"single_vector_projector.weight"), "{names:?}");
}

#[test]
fn missing_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("no-such-model");
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(s.contains("no-such-model"), "{s}");
}

#[test]
fn missing_config_json() {
    let (_tmp, dir) = tiny();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(s.contains("config.json"), "{s}");
}

#[test]
fn missing_shard_file_named_in_index() {
    let (_tmp, dir) = tiny();
    std::fs::remove_file(dir.join(SHARD2)).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(s.contains(SHARD2), "{s}");
}

#[test]
fn missing_adapters_file() {
    let (_tmp, dir) = tiny();
    std::fs::remove_file(dir.join(ADAPTER_FILE)).unwrap();
    let (_, s) = open_err(&dir);
    assert!(s.contains("adapter_model.safetensors"), "{s}");
}

#[test]
fn truncated_shard() {
    let (_tmp, dir) = tiny();
    let p = dir.join(SHARD_FILES[0]);
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 1000).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
    assert!(s.contains(SHARD_FILES[0]) && s.contains("truncated"), "{s}");
}

#[test]
fn shard_truncated_after_open_is_an_error_not_sigbus() {
    let (_tmp, dir) = tiny();
    let ck = Checkpoint::open(&dir).unwrap();
    // Truncate the first shard under the open checkpoint (a file replaced or failing on NFS):
    // with a memory map, touching its tail raised SIGBUS and killed the test process.
    let p = dir.join(SHARD_FILES[0]);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(64).unwrap();
    let mut failed = 0;
    for t in ck.tensors().iter().filter(|t| t.file == p) {
        let e = ck.data(t).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, Error::Tensor { .. }), "{e:?}");
        assert!(s.contains(&t.stored_name) && s.contains(SHARD_FILES[0]) && s.contains("truncated"), "{s}");
        assert!(ck.to_bf16(t).is_err());
        failed += 1;
    }
    assert!(failed > 10, "{failed}");
    // The other shards still read.
    let other = ck.tensors().iter().find(|t| t.file != p).unwrap();
    assert_eq!(ck.data(other).unwrap().len(), other.nbytes());
    // Reads past a tensor's end are refused, whatever the file holds.
    let mut buf = vec![0u8; 8];
    assert!(ck.read_at(other, other.nbytes() - 4, &mut buf).is_err());
}

#[test]
fn header_that_points_past_the_file_is_refused_at_open() {
    let (_tmp, dir) = tiny();
    let p = dir.join(SHARD_FILES[0]);
    let mut bytes = std::fs::read(&p).unwrap();
    // Drop the last tensor's final byte but keep the header: its range now ends past the data.
    bytes.pop();
    std::fs::write(&p, &bytes).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
    assert!(s.contains(SHARD_FILES[0]) && s.contains("truncated"), "{s}");
}

/// Load speed on the CPU: positioned reads of the whole checkpoint (page cache warm), against
/// copying out of a memory map as before. Prints the figures (`--nocapture`); checks only that
/// both read the same bytes.
#[test]
fn read_speed_from_the_page_cache() {
    let (_tmp, dir) = tiny();
    let ck = Checkpoint::open(&dir).unwrap();
    let total: usize = ck.tensors().iter().map(|t| t.nbytes()).sum();
    let rounds = 50;
    let mut buf = vec![0u8; ck.tensors().iter().map(|t| t.nbytes()).max().unwrap()];
    let t0 = std::time::Instant::now();
    for _ in 0..rounds {
        for t in ck.tensors() {
            ck.read(t, &mut buf[..t.nbytes()]).unwrap();
        }
    }
    let pread = (total * rounds) as f64 / t0.elapsed().as_secs_f64() / 1e9;
    let maps: Vec<_> = ck
        .files()
        .iter()
        .map(|f| {
            let file = std::fs::File::open(f).unwrap();
            // SAFETY: test-only read-only map of a file nobody modifies during the test.
            unsafe { memmap2::Mmap::map(&file) }.unwrap()
        })
        .collect();
    let t0 = std::time::Instant::now();
    for _ in 0..rounds {
        for (m, f) in maps.iter().zip(ck.files()) {
            let n = buf.len().min(m.len());
            buf[..n].copy_from_slice(&m[..n]);
            std::hint::black_box(&buf);
            let _ = f;
        }
    }
    let mapped = (maps.iter().map(|m| m.len().min(buf.len())).sum::<usize>() * rounds) as f64
        / t0.elapsed().as_secs_f64()
        / 1e9;
    eprintln!("checkpoint read: pread {pread:.1} GB/s, memory-map copy {mapped:.1} GB/s ({total} bytes)");
    assert!(pread > 0.0);
}

#[test]
fn tensor_with_wrong_shape() {
    let (_tmp, dir) = tiny();
    let name = "model.layers.1.mlp.down_proj.weight";
    rewrite(&dir.join(SHARD2), |v| {
        let t = v.iter_mut().find(|t| t.0 == name).unwrap();
        t.2 = vec![t.2[1], t.2[0]]; // [256, 512] stored as [512, 256]
    });
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Tensor { .. }), "{e:?}");
    assert!(s.contains(name) && s.contains(SHARD2), "{s}");
    assert!(s.contains("[512, 256]") && s.contains("[256, 512]"), "{s}");
}

#[test]
fn tensor_with_wrong_dtype() {
    let (_tmp, dir) = tiny();
    let name = "model.norm.weight";
    rewrite(&dir.join(SHARD2), |v| {
        let t = v.iter_mut().find(|t| t.0 == name).unwrap();
        t.1 = safetensors::Dtype::I32;
        t.3 = vec![0; t.2.iter().product::<usize>() * 4];
    });
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Tensor { .. }), "{e:?}");
    assert!(s.contains(name) && s.contains("I32"), "{s}");
}

#[test]
fn unexpected_extra_tensor() {
    let (_tmp, dir) = tiny();
    let name = "model.layers.0.self_attn.rotary_emb.inv_freq";
    add_to_shard2(&dir, name, safetensors::Dtype::F32, &[64]);
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Tensor { .. }), "{e:?}");
    assert!(s.contains(name) && s.contains("unexpected"), "{s}");
}

#[test]
fn missing_tensor() {
    let (_tmp, dir) = tiny();
    let name = "visual.blocks.2.attn.qkv.bias";
    rewrite(&dir.join(SHARD2), |v| v.retain(|t| t.0 != name));
    edit_index(&dir, |m| {
        m.remove(name);
    });
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Tensor { .. }), "{e:?}");
    assert!(s.contains(name) && s.contains("missing") && s.contains(INDEX_FILE), "{s}");
}

#[test]
fn index_lists_a_tensor_the_shard_lacks() {
    let (_tmp, dir) = tiny();
    let name = "visual.merger.ln_q.weight";
    rewrite(&dir.join(SHARD2), |v| v.retain(|t| t.0 != name));
    let (_, s) = open_err(&dir);
    assert!(s.contains(name) && s.contains(SHARD2) && s.contains(INDEX_FILE), "{s}");
}

#[test]
fn adapters_missing_a_task() {
    let (_tmp, dir) = tiny();
    rewrite(&dir.join(ADAPTER_FILE), |v| v.retain(|t| !t.0.contains(".code.")));
    let (_, s) = open_err(&dir);
    assert!(s.contains("`code`") && s.contains("adapter_model.safetensors"), "{s}");
}

#[test]
fn config_with_inconsistent_dims() {
    let (_tmp, dir) = tiny();
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["text_config"]["num_attention_heads"] = 3.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    assert!(s.contains("hidden_size") && s.contains("num_attention_heads"), "{s}");
    assert!(s.contains("config.json"), "{s}");
}

#[test]
fn same_tensor_under_two_spellings() {
    let (_tmp, dir) = tiny();
    add_to_shard2(&dir, "model.language_model.norm.weight", safetensors::Dtype::BF16, &[256]);
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Tensor { .. }), "{e:?}");
    assert!(s.contains("model.language_model.norm.weight") && s.contains("`model.norm.weight`"), "{s}");
}

#[test]
fn same_tensor_in_two_shards() {
    let (_tmp, dir) = tiny();
    let name = "model.norm.weight";
    let bytes = std::fs::read(dir.join(SHARD2)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let copy = (name.to_string(), t.dtype(), t.shape().to_vec(), t.data().to_vec());
    rewrite(&dir.join(SHARD_FILES[0]), |v| v.push(copy));
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Tensor { .. }), "{e:?}");
    assert!(s.contains("duplicate") && s.contains(SHARD_FILES[0]) && s.contains(SHARD2), "{s}");
}

#[test]
fn shard_tensor_not_listed_in_index() {
    let (_tmp, dir) = tiny();
    edit_index(&dir, |m| {
        m.remove("model.norm.weight");
    });
    let (_, s) = open_err(&dir);
    assert!(s.contains("model.norm.weight") && s.contains(SHARD2) && s.contains(INDEX_FILE), "{s}");
}

/// Writes and opens the full-size synthetic checkpoint (~8 GB on disk): run by hand with
/// `cargo test --release --test checkpoint -- --ignored`.
#[test]
#[ignore]
fn full_checkpoint_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("full");
    let spec = SynthSpec { seed: 1, preset: Preset::Full, adapter_dtype: Dtype::BF16 };
    let t0 = std::time::Instant::now();
    synth::write_checkpoint(&dir, &spec).unwrap();
    let t1 = t0.elapsed();
    let ck = Checkpoint::open(&dir).unwrap();
    eprintln!(
        "full: wrote in {t1:.1?}, opened in {:.1?}, {} tensors, {} bytes",
        t0.elapsed() - t1,
        ck.tensors().len(),
        ck.total_bytes()
    );
}
