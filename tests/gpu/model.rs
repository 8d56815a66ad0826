//! The text path end to end on the GPU, on the tiny fixture model (tests/fixtures/README.md):
//! layer by layer against the CPU forward (the model's wiring must not exist twice unchecked),
//! and the outputs against the PyTorch fp32 reference with the thresholds.

use std::path::PathBuf;

use crate::harness::{e, Ctx};
use jv4::cuda::{DeviceAllocator, DEFAULT_PAGE_SIZE};
use jv4::model::batch::{ImageInput, PackedBatch};
use jv4::model::checkpoint::Checkpoint;
use jv4::model::cpu::CpuModel;
use jv4::model::gpu::{GpuModel, LoraMode};
use jv4::model::Task;
use jv4::reference::cosine as cos;
use serde_json::Value;

/// The fixtures: `$JV4_FIXTURES` (the packed suite sets it), else the source tree's.
pub fn fixtures() -> PathBuf {
    std::env::var_os("JV4_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (x as f64 - y as f64).powi(2);
        n += (y as f64).powi(2);
    }
    (d / n.max(1e-300)).sqrt()
}

struct Tiny {
    ckpt: Checkpoint,
    meta: Value,
    refs: std::collections::HashMap<String, Vec<f32>>,
}

fn tiny() -> Result<Tiny, String> {
    let dir = fixtures().join("tiny");
    let ckpt = Checkpoint::open(&dir.join("model")).map_err(e)?;
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).map_err(e)?).map_err(e)?;
    let bytes = std::fs::read(dir.join("reference.safetensors")).map_err(e)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(e)?;
    let refs = st
        .tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(k, v)| {
            (k, v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        })
        .collect();
    Ok(Tiny { ckpt, meta, refs })
}

fn texts(t: &Tiny) -> Vec<(Vec<u32>, Task)> {
    t.meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            let ids = x["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            (ids, x["task"].as_str().unwrap().parse().unwrap())
        })
        .collect()
}

pub fn text_forward_matches_cpu_layer_by_layer(ctx: &mut Ctx) -> Result<(), String> {
    let t = tiny()?;
    let (model, _) = GpuModel::load(&ctx.gpu, &t.ckpt).map_err(e)?;
    let mut mem = DeviceAllocator::new(&ctx.gpu, 2 << 30, DEFAULT_PAGE_SIZE).map_err(e)?;
    let cpu = CpuModel::from_checkpoint(&t.ckpt).map_err(e)?;
    // A packed batch mixing all three tasks and lengths 1..200.
    let all = texts(&t);
    let mut batch = PackedBatch::new(&t.ckpt.config);
    for (ids, task) in &all {
        batch.push_text(ids, *task).map_err(e)?;
    }
    batch.want_multi = true;
    let mut gtrace = Vec::new();
    let mut ctrace = Vec::new();
    let gout = model.forward_traced(&ctx.gpu, &mut mem, &batch, &mut gtrace).map_err(e)?;
    let cout = cpu.forward_traced(&batch, Some(&mut ctrace)).map_err(e)?;
    if gtrace.len() != ctrace.len() {
        return Err(format!("{} GPU checkpoints vs {} CPU", gtrace.len(), ctrace.len()));
    }
    // bf16 storage of every activation on the GPU against f32 on the CPU: a few 1e-3 relative
    // per layer; a wiring mistake is of order 1.
    let mut line = Vec::new();
    for (i, (g, c)) in gtrace.iter().zip(&ctrace).enumerate() {
        let r = rel(g, c);
        line.push(format!("{r:.1e}"));
        if r > 2e-2 {
            return Err(format!("checkpoint {i} (0 = embeddings, last = final norm): rel err {r:.3e}"));
        }
    }
    println!("  GPU vs CPU per checkpoint: {}", line.join(" "));
    let hid = t.ckpt.config.text.hidden_size;
    for k in 0..batch.sequences() {
        let g = &gout.single[k * hid..(k + 1) * hid];
        let cs = cos(g, &cout.single[k * hid..(k + 1) * hid]);
        if cs < 0.9999 {
            return Err(format!("text {k}: single-vector cos vs CPU {cs:.6}"));
        }
    }
    Ok(())
}

/// Both preparations of the task adapters (merged weights, stacked LoRA) against the fp32
/// reference; in each, a mixed-task batch gives bit-for-bit the vectors of its requests alone.
pub fn text_outputs_match_fp32_reference(ctx: &mut Ctx) -> Result<(), String> {
    for mode in [LoraMode::Merged, LoraMode::Stacked] {
        text_outputs_in_mode(ctx, mode).map_err(|m| format!("{mode:?}: {m}"))?;
    }
    Ok(())
}

fn text_outputs_in_mode(ctx: &mut Ctx, mode: LoraMode) -> Result<(), String> {
    let t = tiny()?;
    let (model, _) = GpuModel::load_with(&ctx.gpu, &t.ckpt, mode).map_err(e)?;
    if model.lora_mode() != mode {
        return Err(format!("asked for {mode:?}, loaded {:?}", model.lora_mode()));
    }
    let mut mem = DeviceAllocator::new(&ctx.gpu, 2 << 30, DEFAULT_PAGE_SIZE).map_err(e)?;
    let pd = t.ckpt.config.multi_vector_projector_dim;
    // Merged weights round W + B·A to bf16: about twice stacked's 1 − cos against fp32 (measured
    // on the full model, benches/NOTES.md); this tiny model's text 1 sits at 0.99990 merged.
    let min_single = if mode == LoraMode::Merged { 0.9998 } else { 0.9999 };
    let (mut worst_single, mut worst_multi) = (1f64, 1f64);
    let mut alone = Vec::new();
    for (i, (ids, task)) in texts(&t).iter().enumerate() {
        let mut batch = PackedBatch::new(&t.ckpt.config);
        batch.push_text(ids, *task).map_err(e)?;
        batch.want_multi = true;
        let out = model.forward(&ctx.gpu, &mut mem, &batch).map_err(e)?;
        let single = &t.refs[&format!("text/{i}/single/fp32")];
        let multi = &t.refs[&format!("text/{i}/multi/fp32")];
        let cs = cos(&out.single, single);
        let got = out.multi.unwrap();
        let rows = got.len() / pd;
        let mc =
            (0..rows).map(|r| cos(&got[r * pd..(r + 1) * pd], &multi[r * pd..(r + 1) * pd])).sum::<f64>()
                / rows as f64;
        if cs < min_single || mc < 0.999 {
            return Err(format!(
                "text {i}: single cos {cs:.6} (≥ {min_single}), multi mean cos {mc:.6} (≥ 0.999)"
            ));
        }
        worst_single = worst_single.min(cs);
        worst_multi = worst_multi.min(mc);
        alone.push((out.single, got));
    }
    // The mixed-task batch: same vectors as the separate requests.
    let members: Vec<usize> =
        t.meta["mixed_batch"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let all = texts(&t);
    let mut batch = PackedBatch::new(&t.ckpt.config);
    for &j in &members {
        batch.push_text(&all[j].0, all[j].1).map_err(e)?;
    }
    batch.want_multi = true;
    let out = model.forward(&ctx.gpu, &mut mem, &batch).map_err(e)?;
    let hid = t.ckpt.config.text.hidden_size;
    let mut max_diff = 0f32;
    let mut row0 = 0;
    for (k, &j) in members.iter().enumerate() {
        let packed = &out.single[k * hid..(k + 1) * hid];
        max_diff = packed.iter().zip(&alone[j].0).map(|(a, b)| (a - b).abs()).fold(max_diff, f32::max);
        let rows = all[j].0.len() * pd;
        let multi = &out.multi.as_ref().unwrap()[row0..row0 + rows];
        row0 += rows;
        if packed.iter().zip(&alone[j].0).any(|(a, b)| a.to_bits() != b.to_bits())
            || multi.iter().zip(&alone[j].1).any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(format!(
                "mixed batch, text {j}: not bitwise equal to the text alone (max |diff| {max_diff:.2e})"
            ));
        }
        let cs = cos(packed, &t.refs[&format!("mixed/{j}/single/fp32")]);
        if cs < min_single {
            return Err(format!("mixed batch, text {j}: single cos {cs:.6}"));
        }
    }
    let s = mem.stats();
    if s.in_use != 0 || s.live_allocations != 0 {
        return Err(format!("the forwards' arenas left blocks behind: {s:?}"));
    }
    println!(
        "  {mode:?}: worst single cos {worst_single:.6}, worst multi mean cos {worst_multi:.6}; mixed batch vs alone bitwise equal"
    );
    Ok(())
}

/// A fixture image ready for the model: name, ids, task, grid, patch rows.
type FixtureImage = (String, Vec<u32>, Task, jv4::model::plan::GridThw, Vec<f32>);

/// The fixture images as the reference resized them, through our normalise + patchify (the
/// resampler's ±1 LSB stays out of the model comparison), with their ids and tasks.
fn fixture_images(t: &Tiny) -> Result<Vec<FixtureImage>, String> {
    use jv4::engine::image::{preprocess, ImageConfig, RgbImage8};
    let dir = fixtures();
    let bytes = std::fs::read(dir.join("tiny/preprocess.safetensors")).map_err(e)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(e)?;
    let spec: Value =
        serde_json::from_slice(&std::fs::read(dir.join("images/images.json")).map_err(e)?).map_err(e)?;
    let mut out = Vec::new();
    for entry in t.meta["images"].as_array().unwrap().iter().filter(|x| x["embed"].as_bool().unwrap_or(true))
    {
        let file = entry["file"].as_str().unwrap();
        let name = file.rsplit_once('.').unwrap().0.to_string();
        let resized = st.tensor(&format!("image/{name}/resized")).map_err(e)?;
        let (h, w) = (resized.shape()[0], resized.shape()[1]);
        let img = RgbImage8 { width: w, height: h, data: resized.data().to_vec() };
        let mut cfg = ImageConfig::default();
        if let Some(mp) = spec["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["file"] == file)
            .and_then(|i| i["max_pixels"].as_u64())
        {
            cfg.max_pixels = mp as usize;
        }
        let p = preprocess(&img, &cfg).map_err(e)?;
        let grid = jv4::model::plan::GridThw { t: p.grid_thw[0], h: p.grid_thw[1], w: p.grid_thw[2] };
        let ids = entry["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        out.push((name, ids, entry["task"].as_str().unwrap().parse().unwrap(), grid, p.pixel_values));
    }
    Ok(out)
}

pub fn image_outputs_match_fp32_reference(ctx: &mut Ctx) -> Result<(), String> {
    let t = tiny()?;
    let (model, _) = GpuModel::load(&ctx.gpu, &t.ckpt).map_err(e)?;
    let mut mem = DeviceAllocator::new(&ctx.gpu, 2 << 30, DEFAULT_PAGE_SIZE).map_err(e)?;
    let cpu = CpuModel::from_checkpoint(&t.ckpt).map_err(e)?;
    let pd = t.ckpt.config.multi_vector_projector_dim;
    let hid = t.ckpt.config.text.hidden_size;
    let images = fixture_images(&t)?;
    let mut line = Vec::new();
    for (name, ids, task, grid, pv) in &images {
        // The vision tower alone, against the rows transformers spliced in.
        let mut b = PackedBatch::new(&t.ckpt.config);
        b.push(ids, *task, vec![ImageInput::new(*grid, pv.clone())]).map_err(e)?;
        b.want_multi = true;
        let vis: Vec<f32> = {
            let arena = mem.arena();
            let vis = model.vision(&ctx.gpu, &arena, &b).map_err(e)?;
            ctx.gpu.download(&vis.view()).map_err(e)?.iter().map(|v| v.to_f32()).collect()
        };
        let r = |kind: &str, mode: &str| t.refs.get(&format!("image/{name}/{kind}/{mode}"));
        let missing = |kind: &str| format!("{name}: no {kind}/fp32 reference");
        let min_row_cos = |a: &[f32], b: &[f32]| {
            (0..b.len() / hid)
                .map(|r| cos(&a[r * hid..(r + 1) * hid], &b[r * hid..(r + 1) * hid]))
                .fold(1f64, f64::min)
        };
        let mean_row_cos = |a: &[f32], b: &[f32]| {
            let rows = a.len() / pd;
            (0..rows).map(|r| cos(&a[r * pd..(r + 1) * pd], &b[r * pd..(r + 1) * pd])).sum::<f64>()
                / rows as f64
        };
        let vref = r("vision", "fp32").ok_or_else(|| missing("vision"))?;
        let vcos = min_row_cos(&vis, vref);
        // The whole sequence: single vector over the vision span, multi-vector over all tokens.
        let out = model.forward(&ctx.gpu, &mut mem, &b).map_err(e)?;
        let sref = r("single", "fp32").ok_or_else(|| missing("single"))?;
        let single = cos(&out.single, sref);
        let got = out.multi.unwrap();
        let mref = r("multi", "fp32").ok_or_else(|| missing("multi"))?;
        let mc = mean_row_cos(&got, mref);
        // And the CPU forward of the same input (the wiring is checked twice).
        let c = cpu.forward(&b).map_err(e)?;
        let vs_cpu = cos(&out.single, &c.single);
        // PyTorch bf16's own distance to fp32 (the refs' `/bf16` run), printed beside ours; not a
        // threshold (measured first).
        let torch = match (r("vision", "bf16"), r("single", "bf16"), r("multi", "bf16")) {
            (Some(v16), Some(s16), Some(m16)) => format!(
                " (torch bf16: vision {:.5}, single {:.6}, multi {:.6})",
                min_row_cos(v16, vref),
                cos(s16, sref),
                mean_row_cos(m16, mref)
            ),
            _ => " (no torch bf16 reference)".to_string(),
        };
        line.push(format!(
            "{name}: vision min row cos {vcos:.5}, single {single:.6}, multi {mc:.6}{torch}, vs CPU {vs_cpu:.6}"
        ));
        if vcos < 0.99 || single < 0.999 || mc < 0.99 || vs_cpu < 0.999 {
            return Err(line.join("; "));
        }
    }
    let s = mem.stats();
    if s.in_use != 0 || s.live_allocations != 0 {
        return Err(format!("the forwards' arenas left blocks behind: {s:?}"));
    }
    for l in line {
        println!("  {l}");
    }
    Ok(())
}

/// The graphed forward (`model::gpu::graph`) against the eager one, in both LoRA modes: every
/// vector bitwise equal, at capture and at replay, for batches of several buckets (1 to 500
/// tokens, one to many sequences, mixed tasks, with and without multi-vectors), a second batch
/// of the same bucket with other inputs (the replay reads the new inputs), and a batch over the
/// graph limit (eager). The counters show which forwards were captured and which replayed.
pub fn graph_forward_equals_eager_bitwise(ctx: &mut Ctx) -> Result<(), String> {
    use jv4::model::gpu::{Graphs, GRAPH_MAX_TOKENS};
    let t = tiny()?;
    let all = texts(&t);
    let cfg = &t.ckpt.config;
    // Batches as lists of (text index, truncated length); lengths chosen to hit several buckets.
    type Texts = Vec<(Vec<u32>, Task)>;
    let pick = |n: usize, from: usize, len: usize| -> Texts {
        (0..n)
            .map(|k| {
                let (ids, task) = &all[(from + k) % all.len()];
                let mut ids = ids.clone();
                ids.resize(len.max(1), ids[0]);
                (ids, *task)
            })
            .collect()
    };
    let batches: Vec<(Texts, bool)> = vec![
        (pick(1, 0, 1), false),
        (pick(1, 1, 16), true),
        (pick(1, 2, 16), true), // same bucket as the last: a replay on other inputs
        (pick(3, 0, 17), true),
        (pick(5, 1, 20), false),
        (pick(2, 2, 100), true),
        (pick(7, 0, 70), true),
        (pick(1, 3, 500), true),
        (pick(3, 1, 200), false), // 600 tokens: over the graph limit, eager
        (pick(1, 1, 16), true),   // replay of the second batch's graph
    ];
    for mode in [LoraMode::Stacked, LoraMode::Merged] {
        let (model, _) = GpuModel::load_with(&ctx.gpu, &t.ckpt, mode).map_err(e)?;
        let mut mem = DeviceAllocator::new(&ctx.gpu, 2 << 30, DEFAULT_PAGE_SIZE).map_err(e)?;
        let mut graphs = Graphs::new(&ctx.gpu).map_err(e)?;
        for (bi, (texts, want_multi)) in batches.iter().enumerate() {
            let mut batch = PackedBatch::new(cfg);
            for (ids, task) in texts {
                // Merged weights run a graph for one task only: make most batches one task.
                let task = if mode == LoraMode::Merged && bi % 3 != 0 { Task::Retrieval } else { *task };
                batch.push_text(ids, task).map_err(e)?;
            }
            batch.want_multi = *want_multi;
            let eager = model.forward(&ctx.gpu, &mut mem, &batch).map_err(e)?;
            for round in 0..2 {
                let before = graphs.stats();
                let g = model.forward_graphed(&ctx.gpu, &mut mem, &mut graphs, &batch).map_err(e)?;
                let after = graphs.stats();
                let what = format!("{mode:?} batch {bi} ({} tokens) round {round}", batch.tokens());
                let same = |a: &[f32], b: &[f32]| {
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                };
                if !same(&g.single, &eager.single) || !same(&g.chunk_single, &eager.chunk_single) {
                    return Err(format!("{what}: single vectors differ from the eager forward"));
                }
                match (&g.multi, &eager.multi) {
                    (Some(a), Some(b)) if same(a, b) => {}
                    (None, None) => {}
                    _ => return Err(format!("{what}: multi-vector rows differ from the eager forward")),
                }
                if after.fallbacks != 0 {
                    return Err(format!("{what}: a graph failed and the forward ran eagerly: {after:?}"));
                }
                let graphed = batch.tokens() <= GRAPH_MAX_TOKENS
                    && (mode == LoraMode::Stacked
                        || batch.row_task().iter().all(|&r| r == batch.row_task()[0]));
                let ran = (after.captures - before.captures) + (after.replays - before.replays);
                if ran != graphed as u64 {
                    return Err(format!(
                        "{what}: expected {} graph run, counters {before:?} -> {after:?}",
                        graphed as u8
                    ));
                }
                if graphed && round == 1 && after.replays != before.replays + 1 {
                    return Err(format!("{what}: the second run did not replay: {before:?} -> {after:?}"));
                }
            }
        }
        let s = graphs.stats();
        println!("  {mode:?}: {} batches bitwise equal to eager; graphs {s:?}", batches.len());
        if s.replays < s.captures {
            return Err(format!("{mode:?}: fewer replays than captures: {s:?}"));
        }
    }
    Ok(())
}
