//! The CPU forward of the whole model against the PyTorch reference on the tiny fixture model
//! (tests/fixtures/README.md): host planning equal to transformers' dumps exactly, every output
//! within ~1e-5 of the fp32 reference, and within the bf16 reference's own distance from fp32.

mod common;

use std::sync::OnceLock;

use common::{cosine, dist, fixtures, load, rel_err, Tensor};
use jv4::engine::image::{preprocess, ImageConfig, RgbImage8};
use jv4::model::batch::{ImageInput, PackedBatch};
use jv4::model::checkpoint::Checkpoint;
use jv4::model::cpu::CpuModel;
use jv4::model::plan::{self, GridThw};
use jv4::model::Task;
use jv4::reference;
use serde_json::Value;
use std::collections::HashMap;

struct Fixture {
    model: CpuModel,
    meta: Value,
    refs: HashMap<String, Tensor>,
    pre: HashMap<String, Tensor>,
    max_pixels: HashMap<String, usize>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = fixtures().join("tiny");
        let ckpt = Checkpoint::open(&dir.join("model")).expect("tiny fixture model");
        let meta: Value =
            serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let images: Value =
            serde_json::from_slice(&std::fs::read(fixtures().join("images/images.json")).unwrap()).unwrap();
        let max_pixels = images["images"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| Some((stem(i["file"].as_str()?), i.get("max_pixels")?.as_u64()? as usize)))
            .collect();
        Fixture {
            model: CpuModel::from_checkpoint(&ckpt).expect("tiny fixture model"),
            meta,
            refs: load(&dir.join("reference.safetensors")),
            pre: load(&dir.join("preprocess.safetensors")),
            max_pixels,
        }
    })
}

/// One sequence of a test batch.
#[derive(Clone)]
struct SeqInput {
    ids: Vec<u32>,
    task: Task,
    images: Vec<ImageInput>,
}

/// What the model produced for one sequence.
struct SeqOutput {
    /// Final-norm hidden states `[L, hidden]`.
    hidden: Vec<f32>,
    single: Vec<f32>,
    multi: Vec<f32>,
}

/// One packed forward of `seqs` on the CPU model, split per sequence.
fn forward(seqs: &[SeqInput]) -> Vec<SeqOutput> {
    let m = &fixture().model;
    let mut b = PackedBatch::new(m.config());
    for s in seqs {
        b.push(&s.ids, s.task, s.images.clone()).unwrap();
    }
    b.want_multi = true;
    let mut trace = Vec::new();
    let out = m.forward_traced(&b, Some(&mut trace)).unwrap();
    let h = trace.pop().unwrap();
    let (hid, multi) = (m.config().text.hidden_size, out.multi.unwrap());
    let pd = multi.len() / b.tokens();
    (0..seqs.len())
        .map(|k| {
            let rows = b.rows(k);
            SeqOutput {
                hidden: h[rows.start * hid..rows.end * hid].to_vec(),
                single: out.single[k * hid..(k + 1) * hid].to_vec(),
                multi: multi[rows.start * pd..rows.end * pd].to_vec(),
            }
        })
        .collect()
}

fn stem(file: &str) -> String {
    file.rsplit_once('.').map_or(file, |(s, _)| s).to_string()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn task(v: &Value) -> Task {
    v.as_str().unwrap().parse().unwrap()
}

fn r(key: &str) -> &'static Tensor {
    fixture().refs.get(key).unwrap_or_else(|| panic!("reference tensor {key} missing"))
}

/// The image as the reference resized it, through our normalise + patchify (identical math), so
/// that the model comparison does not include the resampler's ±1 LSB.
fn image_input(name: &str) -> ImageInput {
    let f = fixture();
    let resized = &f.pre[&format!("image/{name}/resized")];
    let (h, w) = (resized.shape[0], resized.shape[1]);
    let img = RgbImage8 { width: w, height: h, data: resized.data.iter().map(|&v| v as u8).collect() };
    let mut cfg = ImageConfig::default();
    if let Some(&mp) = f.max_pixels.get(name) {
        cfg.max_pixels = mp;
    }
    let p = preprocess(&img, &cfg).unwrap();
    assert_eq!(p.resized, (h, w), "{name}: the resized image must pass through unchanged");
    ImageInput::new(GridThw { t: p.grid_thw[0], h: p.grid_thw[1], w: p.grid_thw[2] }, p.pixel_values)
}

fn image_seq(entry: &Value) -> (String, SeqInput) {
    let name = stem(entry["file"].as_str().unwrap());
    let input = image_input(&name);
    (name, SeqInput { ids: ids(&entry["ids"]), task: task(&entry["task"]), images: vec![input] })
}

/// Compares one output with its fp32 and bf16 references; returns (single rel err vs fp32,
/// multi worst rel err vs fp32) for the summary.
fn compare(what: &str, key: &str, out: &SeqOutput) -> (f64, f64) {
    let single32 = &r(&format!("{key}/single/fp32")).data;
    let single16 = &r(&format!("{key}/single/bf16")).data;
    let multi32 = r(&format!("{key}/multi/fp32"));
    let multi16 = &r(&format!("{key}/multi/bf16")).data;
    let pd = multi32.shape[1];
    assert_eq!(out.multi.len(), multi32.data.len(), "{what}: multi-vector rows (token count)");

    // fp32: the same computation up to summation order: relative error ~1e-6..1e-5.
    let e_single = rel_err(&out.single, single32);
    assert!(e_single < 1e-4, "{what}: single vs fp32 reference: rel err {e_single:.2e}");
    let mut e_multi = 0f64;
    for (i, (a, b)) in out.multi.chunks(pd).zip(multi32.data.chunks(pd)).enumerate() {
        let e = rel_err(a, b);
        assert!(e < 1e-4, "{what}: multi row {i} vs fp32 reference: rel err {e:.2e}");
        e_multi = e_multi.max(e);
    }
    // bf16: we compute in f32, so we must be at least as close to the bf16 reference as the fp32
    // reference is (times 2, plus the f32 noise floor) — the flash-attention rule.
    let gap = dist(single32, single16);
    let ours = dist(&out.single, single16);
    assert!(
        ours <= 2.0 * gap + 1e-5,
        "{what}: single vs bf16 reference {ours:.2e}, fp32-vs-bf16 gap {gap:.2e}"
    );
    let gap = dist(&multi32.data, multi16);
    let ours = dist(&out.multi, multi16);
    assert!(
        ours <= 2.0 * gap + 1e-5,
        "{what}: multi vs bf16 reference {ours:.2e}, fp32-vs-bf16 gap {gap:.2e}"
    );
    // Matryoshka: every configured width is truncate-then-renormalise of the single vector.
    for &d in &fixture().model.config().matryoshka_dims {
        let ours = reference::matryoshka(&out.single, d);
        let want = reference::matryoshka(single32, d);
        assert!(cosine(&ours, &want) > 1.0 - 1e-8, "{what}: matryoshka {d}");
    }
    (e_single, e_multi)
}

#[test]
fn texts_match_the_reference() {
    let f = fixture();
    let mut worst = (0f64, 0f64);
    for (i, t) in f.meta["texts"].as_array().unwrap().iter().enumerate() {
        let seq = SeqInput { ids: ids(&t["ids"]), task: task(&t["task"]), images: vec![] };
        let out = forward(&[seq]).remove(0);
        let (a, b) = compare(&format!("text {i}"), &format!("text/{i}"), &out);
        worst = (worst.0.max(a), worst.1.max(b));
        if let Some(hidden) = f.refs.get(&format!("text/{i}/hidden/fp32")) {
            let last = &hidden.data[hidden.data.len() - out.hidden.len()..];
            let e = rel_err(&out.hidden, last);
            assert!(e < 1e-4, "text {i}: final hidden states rel err {e:.2e}");
        }
    }
    eprintln!("texts: worst rel err vs fp32: single {:.2e}, multi {:.2e}", worst.0, worst.1);
}

#[test]
fn mixed_task_batch_equals_separate_requests() {
    let f = fixture();
    let texts = f.meta["texts"].as_array().unwrap();
    let members: Vec<usize> =
        f.meta["mixed_batch"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let batch: Vec<SeqInput> = members
        .iter()
        .map(|&j| SeqInput { ids: ids(&texts[j]["ids"]), task: task(&texts[j]["task"]), images: vec![] })
        .collect();
    let tasks: Vec<Task> = batch.iter().map(|s| s.task).collect();
    assert!(tasks.windows(2).any(|w| w[0] != w[1]), "the mixed batch must mix tasks");
    let packed = forward(&batch);
    for (k, &j) in members.iter().enumerate() {
        compare(&format!("mixed {j}"), &format!("mixed/{j}"), &packed[k]);
        let alone = forward(&batch[k..k + 1]).remove(0);
        // Rows never interact across sequences: packing must not change a single bit.
        assert_eq!(alone.single, packed[k].single, "text {j}: packed vs alone");
        assert_eq!(alone.multi, packed[k].multi, "text {j}: packed vs alone (multi)");
    }
}

#[test]
fn images_match_the_reference() {
    let f = fixture();
    let mut worst = (0f64, 0f64, 0f64);
    for entry in f.meta["images"].as_array().unwrap().iter().filter(|e| e["embed"].as_bool().unwrap_or(true))
    {
        let (name, seq) = image_seq(entry);
        // The vision tower alone, against the rows transformers spliced into the embeddings.
        let vis = f.model.vision(&[&seq.images[0]]);
        let e_vis = rel_err(&vis, &r(&format!("image/{name}/vision/fp32")).data);
        assert!(e_vis < 1e-4, "{name}: vision tower rel err {e_vis:.2e}");
        let out = forward(&[seq]).remove(0);
        let (a, b) = compare(&format!("image {name}"), &format!("image/{name}"), &out);
        worst = (worst.0.max(e_vis), worst.1.max(a), worst.2.max(b));
    }
    eprintln!(
        "images: worst rel err vs fp32: vision {:.2e}, single {:.2e}, multi {:.2e}",
        worst.0, worst.1, worst.2
    );
}

#[test]
fn planning_equals_the_dumps() {
    let f = fixture();
    let cfg = f.model.config();
    let merge = cfg.vision.spatial_merge_size;
    for (i, t) in f.meta["texts"].as_array().unwrap().iter().enumerate() {
        let pos = plan::mrope_positions(&ids(&t["ids"]), cfg.special.image_token_id, &[], merge).unwrap();
        let want = r(&format!("text/{i}/positions"));
        let n = pos.len();
        assert_eq!(
            [pos.t.clone(), pos.h.clone(), pos.w.clone()].concat(),
            want.data.iter().map(|&v| v as i32).collect::<Vec<_>>(),
            "text {i} positions ({n} tokens)"
        );
    }
    for entry in f.meta["images"].as_array().unwrap().iter().filter(|e| e["embed"].as_bool().unwrap_or(true))
    {
        let name = stem(entry["file"].as_str().unwrap());
        let g = &entry["grid_thw"];
        let grid = GridThw {
            t: g[0].as_u64().unwrap() as usize,
            h: g[1].as_u64().unwrap() as usize,
            w: g[2].as_u64().unwrap() as usize,
        };
        let pos =
            plan::mrope_positions(&ids(&entry["ids"]), cfg.special.image_token_id, &[grid], merge).unwrap();
        let want: Vec<i32> = r(&format!("image/{name}/positions")).data.iter().map(|&v| v as i32).collect();
        assert_eq!([pos.t, pos.h, pos.w].concat(), want, "{name}: M-RoPE positions");
        let v = &cfg.vision;
        let vp = plan::vision_plan(&[grid], merge, v.window_size, v.patch_size);
        let as_i32 =
            |k: &str| r(&format!("image/{name}/{k}")).data.iter().map(|&x| x as i32).collect::<Vec<_>>();
        assert_eq!(
            vp.window_index.iter().map(|&x| x as i32).collect::<Vec<_>>(),
            as_i32("window_index"),
            "{name}: window_index"
        );
        assert_eq!(vp.cu_window_seqlens, as_i32("cu_window_seqlens"), "{name}: cu_window_seqlens");
        assert_eq!(vp.cu_seqlens, as_i32("cu_seqlens"), "{name}: cu_seqlens");
        // The rotary table the blocks use (after the window permutation): cos/sin of our angles,
        // repeated for both halves, against transformers' f32 tables.
        let angles = reference::vision_rope_angles(&vp.rot_pos_windowed(merge), v.head_dim(), 10000.0);
        let half = v.head_dim() / 2;
        let (cos, sin) = (r(&format!("image/{name}/rope_cos")), r(&format!("image/{name}/rope_sin")));
        for (p, a) in angles.chunks(half).enumerate() {
            for j in 0..v.head_dim() {
                let ang = a[j % half] as f64;
                let (c, s) = (cos.data[p * v.head_dim() + j] as f64, sin.data[p * v.head_dim() + j] as f64);
                assert!(
                    (ang.cos() - c).abs() < 2e-5 && (ang.sin() - s).abs() < 2e-5,
                    "{name}: rotary patch {p} dim {j}"
                );
            }
        }
    }
}

#[test]
fn preprocessing_matches_the_reference_processor() {
    // Decode + convert + smart_resize + bicubic, against the reference processor's resized image;
    // the reference resamples with torchvision, we with Pillow's algorithm: they differ by at most
    // 1 in a few values (the fixture shows the two reference resamplers apart by the same).
    let f = fixture();
    let images: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("images/images.json")).unwrap()).unwrap();
    let mut report = Vec::new();
    for im in images["images"].as_array().unwrap() {
        let file = im["file"].as_str().unwrap();
        let name = stem(file);
        let mut cfg = ImageConfig::default();
        if let Some(mp) = im.get("max_pixels").and_then(|v| v.as_u64()) {
            cfg.max_pixels = mp as usize;
        }
        let bytes = std::fs::read(fixtures().join("images").join(file)).unwrap();
        let rgb = jv4::engine::image::decode(&bytes, jv4::engine::image::AlphaMode::Drop).unwrap();
        if let Some(want) = f.pre.get(&format!("image/{name}/rgb")) {
            assert_eq!(want.shape, vec![rgb.height, rgb.width, 3], "{name}: decoded size");
            let max =
                rgb.data.iter().zip(&want.data).map(|(&a, &b)| (a as f32 - b).abs()).fold(0f32, f32::max);
            assert!(max <= 1.0, "{name}: RGB conversion differs from PIL's by {max}");
            report.push(format!("{name}: rgb max {max}"));
        }
        let p = preprocess(&rgb, &cfg).unwrap();
        let want = &f.pre[&format!("image/{name}/resized")];
        let pil = &f.pre[&format!("image/{name}/resized_pil")];
        assert_eq!((p.resized.0, p.resized.1), (want.shape[0], want.shape[1]), "{name}: smart_resize");
        // Our resized uint8 image, recovered from our pixel_values.
        let ours = unpatchify(&p.pixel_values, p.grid_thw, &cfg);
        let stats = |want: &[f32]| {
            let d: Vec<f32> = ours.iter().zip(want).map(|(a, b)| (a - b).abs()).collect();
            (d.iter().fold(0f32, |m, &x| m.max(x)), d.iter().sum::<f32>() / d.len() as f32)
        };
        let (max_tv, mean_tv) = stats(&want.data);
        let (max_pil, mean_pil) = stats(&pil.data);
        report.push(format!(
            "{name}: vs reference processor max {max_tv} mean {mean_tv:.4}; vs PIL max {max_pil} mean {mean_pil:.4}"
        ));
        // Lossless formats: the resamplers agree to 1 LSB (torchvision vs Pillow). JPEG adds the
        // decoders' difference (zune-jpeg vs libjpeg-turbo: ±1-2 LSB, more on the last rows of an
        // image whose height is not a multiple of the 16-row chroma block): bounded on average.
        if file.ends_with(".jpg") {
            assert!(mean_tv <= 0.5 && max_tv <= 16.0, "{}", report.last().unwrap());
        } else {
            assert!(max_tv <= 1.0 && max_pil <= 1.0, "{}", report.last().unwrap());
        }
        if let Some(pv) = f.pre.get(&format!("image/{name}/pixel_values")) {
            // Normalise + patchify, compared directly on the reference's own uint8 image.
            let exact = image_input(&name);
            let e = exact
                .pixel_values
                .to_f32()
                .iter()
                .zip(&pv.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(e < 1e-5, "{name}: pixel_values layout/normalisation differs by {e}");
            report.push(format!("{name}: pixel_values max {e:.1e}"));
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// pixel_values back to the uint8 image (the inverse of normalise + patchify), as f32 values.
fn unpatchify(pv: &[f32], grid: [usize; 3], cfg: &ImageConfig) -> Vec<f32> {
    let (gh, gw) = (grid[1], grid[2]);
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let row_len = 3 * tp * p * p;
    let (hh, ww) = (gh * p, gw * p);
    let mut out = vec![0f32; hh * ww * 3];
    for (n, row) in pv.chunks(row_len).enumerate() {
        let (mw, rest) = (n % m, n / m);
        let (mh, rest) = (rest % m, rest / m);
        let (bw, bh) = (rest % (gw / m), rest / (gw / m));
        let (pr, pc) = (bh * m + mh, bw * m + mw);
        for c in 0..3 {
            for ph in 0..p {
                for pw in 0..p {
                    let v = row[c * tp * p * p + ph * p + pw];
                    let u = ((v * cfg.image_std[c] + cfg.image_mean[c]) * 255.0).round();
                    out[((pr * p + ph) * ww + pc * p + pw) * 3 + c] = u;
                }
            }
        }
    }
    out
}
