//! Late chunking, one body for both backends: `tests/chunking.rs` runs them on the CPU backend (in
//! CI), the GPU suite on CUDA. The chunk vectors are checked against the reference pooling
//! ([`jv4::reference::mean_pool_l2`]) of the same token spans of the CPU forward's final-norm
//! states (bitwise on the CPU, by cosine on the GPU), and against themselves in other batches.
#![allow(dead_code)]

use jv4::engine::{plan_chunks, plan_macro_chunks};
use jv4::model::batch::PackedBatch;
use jv4::model::checkpoint::Checkpoint;
use jv4::model::cpu::CpuModel;
use jv4::reference;
use jv4::{Chunking, Device, Embedding, Error, OutputKind, PromptName, Request, Task, Truncation};

use super::engine_cases::Model;

const DOC: &str = "Late chunking embeds a whole document in one pass. Then every chunk is pooled \
     from the states of its own tokens, which have seen the text before them. Ein Satz auf Deutsch \
     über Katzen. 日本語の文もあります。 And a last sentence with an emoji 🙂 at the end.";

fn cos(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-300)
}

/// Bitwise when `exact`, else a cosine of at least `min_cos`.
fn close_to(what: &str, got: &[f32], want: &[f32], exact: bool, min_cos: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, want {}", got.len(), want.len()));
    }
    if exact {
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            return Err(format!("{what}: value {i} is {} , the reference {}", got[i], want[i]));
        }
        return Ok(());
    }
    let c = cos(got, want);
    if c < min_cos {
        return Err(format!("{what}: cos {c:.6} to the reference (want ≥ {min_cos})"));
    }
    Ok(())
}

fn close(what: &str, got: &[f32], want: &[f32], exact: bool) -> Result<(), String> {
    close_to(what, got, want, exact, 0.999)
}

fn chunked(r: &jv4::Result<Embedding>) -> Result<(Embedding, Vec<jv4::Chunk>), String> {
    let e = r.clone().map_err(|e| format!("unexpected error: {e}"))?;
    let c = e.chunks.clone().ok_or("no chunks in a late-chunked result")?;
    Ok((e, c))
}

/// Chunks by token count and by spans, at full width and a Matryoshka width, with multi-vectors:
/// each chunk's single vector is the reference pooling of its tokens' final-norm states of one CPU
/// forward over the whole prefixed text; its multi rows are the whole text's rows of its tokens;
/// its token and byte ranges are consistent with the tokenizer.
pub fn chunks_equal_the_reference_pooling(device: Device) -> Result<(), String> {
    let m = Model::new()?;
    let engine = m.engine(device, |_| {})?;
    let (task, prompt) = (Task::Retrieval, PromptName::Passage);
    let sentence_ends: Vec<usize> = DOC.match_indices(". ").map(|(i, _)| i + 1).collect();
    let mut spans = vec![(0, sentence_ends[0])];
    for w in sentence_ends.windows(2) {
        spans.push((w[0] + 1, w[1]));
    }
    spans.push((sentence_ends[sentence_ends.len() - 1] + 1, DOC.len()));
    let reqs = [
        Request::text(DOC)
            .task(task)
            .prompt(prompt)
            .output(OutputKind::Both)
            .late_chunking(Chunking::Tokens(7)),
        Request::text(DOC).task(task).prompt(prompt).dims(128).late_chunking(Chunking::Spans(spans.clone())),
    ];
    let out = engine.embed(&reqs);

    // The oracle: the CPU forward of the prefixed text alone, its final-norm states.
    let enc = engine.tokenizer().encode_with_offsets(task, prompt, DOC).map_err(|e| e.to_string())?;
    let ckpt = Checkpoint::open(m.path()).map_err(|e| e.to_string())?;
    let cpu = CpuModel::from_checkpoint(&ckpt).map_err(|e| e.to_string())?;
    let mut batch = PackedBatch::new(&ckpt.config);
    batch.push_text(&enc.ids, task).map_err(|e| e.to_string())?;
    batch.want_multi = true;
    let mut trace = Vec::new();
    let whole = cpu.forward_traced(&batch, Some(&mut trace)).map_err(|e| e.to_string())?;
    let h = trace.last().ok_or("no trace")?;
    let hid = ckpt.config.text.hidden_size;
    let pd = ckpt.config.multi_vector_projector_dim;
    let exact = device == Device::Cpu;

    for (r, (req, res)) in reqs.iter().zip(&out).enumerate() {
        let (e, chunks) = chunked(res)?;
        if e.tokens != enc.ids.len() || e.dropped != 0 {
            return Err(format!(
                "request {r}: {} tokens ({} dropped), want {}",
                e.tokens,
                e.dropped,
                enc.ids.len()
            ));
        }
        // Chunks cover the text's tokens in order; the prefix belongs to none.
        let first = enc.first_text_token;
        if first == 0 || chunks.first().map(|c| c.tokens.start) != Some(first) {
            return Err(format!(
                "request {r}: the first chunk does not start at the first text token {first}"
            ));
        }
        if chunks.last().map(|c| c.tokens.end) != Some(enc.ids.len()) {
            return Err(format!("request {r}: the chunks do not reach the end"));
        }
        let want_n = match &req.chunking {
            Some(Chunking::Tokens(k)) => (enc.ids.len() - first).div_ceil(*k),
            Some(Chunking::Spans(s)) => s.len(),
            None => unreachable!(),
        };
        if chunks.len() != want_n {
            return Err(format!("request {r}: {} chunks, want {want_n}", chunks.len()));
        }
        for (i, c) in chunks.iter().enumerate() {
            let what = format!("request {r} chunk {i} {:?}", c.tokens);
            if let Some(Chunking::Spans(s)) = &req.chunking {
                if (c.chars.start, c.chars.end) != s[i] {
                    return Err(format!("{what}: chars {:?}, want {:?}", c.chars, s[i]));
                }
            }
            // Every token of the chunk touches its bytes.
            for t in c.tokens.clone() {
                let (a, b) = enc.offsets[t];
                if !(a < c.chars.end && b > c.chars.start) {
                    return Err(format!(
                        "{what}: token {t} at bytes {a}..{b} is outside chars {:?}",
                        c.chars
                    ));
                }
            }
            let pooled = reference::mean_pool_l2(h, hid, &[(c.tokens.start, c.tokens.end)]);
            let want = match req.dims {
                Some(d) => reference::matryoshka(&pooled, d),
                None => pooled,
            };
            close(&what, c.single.as_deref().ok_or("no chunk single vector")?, &want, exact)?;
            match (&c.multi, req.output.multi()) {
                (Some(mv), true) => {
                    let cpu_multi = whole.multi.as_ref().ok_or("no multi from the oracle")?;
                    if mv.rows() != c.tokens.len() || mv.dim != pd {
                        return Err(format!("{what}: {} multi rows of {}", mv.rows(), mv.dim));
                    }
                    let mine = &e.multi.as_ref().ok_or("no whole-text multi")?.data;
                    if mv.data[..] != mine[c.tokens.start * pd..c.tokens.end * pd] {
                        return Err(format!("{what}: multi rows differ from the whole text's"));
                    }
                    for (k, t) in c.tokens.clone().enumerate() {
                        // One bf16 row against the f32 oracle: looser than a pooled vector.
                        close_to(
                            &format!("{what} multi row {k}"),
                            mv.row(k),
                            &cpu_multi[t * pd..(t + 1) * pd],
                            exact,
                            0.99,
                        )?;
                    }
                }
                (None, false) => {}
                _ => return Err(format!("{what}: multi present when not asked or missing when asked")),
            }
        }
        // The whole text's vector is still returned.
        let full = reference::mean_pool_l2(h, hid, &[(0, enc.ids.len())]);
        let full = match req.dims {
            Some(d) => reference::matryoshka(&full, d),
            None => full,
        };
        close(
            &format!("request {r} whole text"),
            e.single.as_deref().ok_or("no whole single")?,
            &full,
            exact,
        )?;
    }
    Ok(())
}

/// A chunked request's results do not depend on its batch: alone, and packed with other texts
/// (before and after it), the chunk vectors are bitwise equal on the CPU (by cosine on the GPU).
pub fn chunk_vectors_are_independent_of_the_batch(device: Device) -> Result<(), String> {
    let m = Model::new()?;
    let engine = m.engine(device, |_| {})?;
    let req = Request::text(DOC)
        .prompt(PromptName::Passage)
        .output(OutputKind::Both)
        .late_chunking(Chunking::Tokens(5));
    let alone = engine.embed(std::slice::from_ref(&req));
    let (_, a) = chunked(&alone[0])?;
    let mixed = engine.embed(&[
        Request::text("something before it").task(Task::Code),
        Request::text("a second chunked text, short")
            .late_chunking(Chunking::Tokens(2))
            .output(OutputKind::Both),
        req.clone(),
        Request::text("and something after it").output(OutputKind::Multi),
    ]);
    let (_, b) = chunked(&mixed[2])?;
    let (_, other) = chunked(&mixed[1])?;
    if other.is_empty() {
        return Err("the other chunked text has no chunks".into());
    }
    if a.len() != b.len() {
        return Err(format!("{} chunks alone, {} in a batch", a.len(), b.len()));
    }
    let exact = device == Device::Cpu;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if (&x.tokens, &x.chars) != (&y.tokens, &y.chars) {
            return Err(format!("chunk {i}: ranges differ"));
        }
        close(
            &format!("chunk {i} single"),
            y.single.as_deref().unwrap_or(&[]),
            x.single.as_deref().unwrap_or(&[1.0]),
            exact,
        )?;
        let (xm, ym) = (x.multi.as_ref().ok_or("no multi")?, y.multi.as_ref().ok_or("no multi")?);
        close(&format!("chunk {i} multi"), &ym.data, &xm.data, exact)?;
    }
    Ok(())
}

/// Bad chunking fails alone with a message naming what is wrong; the other requests are served.
pub fn bad_chunking_fails_alone(device: Device) -> Result<(), String> {
    let m = Model::new()?;
    let engine = m.engine(device, |o| o.truncation = jv4::Truncation::new(64))?;
    let long = "word ".repeat(200);
    let bad: Vec<(Request, &str)> = vec![
        (Request::text("abc").late_chunking(Chunking::Tokens(0)), "chunk_size"),
        (Request::text("abc").late_chunking(Chunking::Spans(vec![(0, 9)])), "outside the text"),
        (Request::text("abcdef").late_chunking(Chunking::Spans(vec![(0, 3), (2, 5)])), "overlaps"),
        (Request::text("abcdef").late_chunking(Chunking::Spans(vec![(3, 5), (0, 2)])), "overlaps"),
        (Request::text("abcdef").late_chunking(Chunking::Spans(vec![(2, 2)])), "empty"),
        (Request::text("é").late_chunking(Chunking::Spans(vec![(0, 1)])), "character boundaries"),
        // Long late chunking serves a text over max_length, but not one chunk longer than a forward.
        (
            Request::text(long.clone()).late_chunking(Chunking::Spans(vec![(0, long.len())])),
            "one forward holds",
        ),
        (Request::tokens(vec![1u32, 2, 3]).late_chunking(Chunking::Tokens(1)), "texts only"),
    ];
    let good = Request::text("a good chunked text").late_chunking(Chunking::Spans(vec![(0, 6), (7, 19)]));
    let mut reqs: Vec<Request> = bad.iter().map(|(r, _)| r.clone()).collect();
    reqs.push(good.clone());
    let out = engine.embed(&reqs);
    for (k, (_, needle)) in bad.iter().enumerate() {
        match &out[k] {
            Err(e @ Error::Input(_)) if e.to_string().contains(needle) => {}
            Err(e) => return Err(format!("bad request {k}: error {e:?} does not mention {needle:?}")),
            Ok(_) => return Err(format!("bad request {k} ({needle}) was embedded")),
        }
    }
    let (_, chunks) = chunked(&out[bad.len()])?;
    let alone = engine.embed(&[good]);
    let (_, want) = chunked(&alone[0])?;
    if chunks.len() != 2 || (device == Device::Cpu && chunks != want) {
        return Err("the good chunked request differs beside bad ones".into());
    }
    Ok(())
}

/// Long late chunking (a text over `max_length`, here a small one): each chunk's single vector is
/// the reference pooling of its tokens in a separate CPU forward of the macro-chunk that owns it
/// (the prompt prefix, then the macro-chunk's text tokens); the whole text's multi rows are the
/// owning macro-chunks' rows; token and byte ranges are those of the whole prompted text; and the
/// result does not depend on the batch.
pub fn long_chunks_equal_the_reference_pooling(device: Device) -> Result<(), String> {
    let (limit, overlap) = (64, 8);
    let m = Model::new()?;
    let engine = m.engine(device, |o| {
        o.truncation = Truncation::new(limit);
        o.late_chunk_overlap = overlap;
    })?;
    let text = format!("{DOC} {DOC}");
    let sentence_ends: Vec<usize> = text.match_indices(". ").map(|(i, _)| i + 1).collect();
    let mut spans = vec![(0, sentence_ends[0])];
    for w in sentence_ends.windows(2) {
        spans.push((w[0] + 1, w[1]));
    }
    let reqs = [
        Request::text(text.clone())
            .prompt(PromptName::Passage)
            .output(OutputKind::Both)
            .late_chunking(Chunking::Tokens(5)),
        Request::text(text.clone()).task(Task::Code).dims(128).late_chunking(Chunking::Spans(spans)),
    ];
    let out = engine.embed(&reqs);
    let ckpt = Checkpoint::open(m.path()).map_err(|e| e.to_string())?;
    let cpu = CpuModel::from_checkpoint(&ckpt).map_err(|e| e.to_string())?;
    let hid = ckpt.config.text.hidden_size;
    let pd = ckpt.config.multi_vector_projector_dim;
    let exact = device == Device::Cpu;
    for (r, (req, res)) in reqs.iter().zip(&out).enumerate() {
        let (e, chunks) = chunked(res)?;
        let enc =
            engine.tokenizer().encode_with_offsets(req.task, req.prompt, &text).map_err(|e| e.to_string())?;
        let n = enc.ids.len();
        let p = enc.first_text_token;
        let want_chunks =
            plan_chunks(&enc, &text, req.chunking.as_ref().unwrap()).map_err(|e| e.to_string())?;
        let plan = plan_macro_chunks(n, p, &want_chunks, limit, overlap).map_err(|e| e.to_string())?;
        if plan.len() < 3 {
            return Err(format!(
                "request {r}: {n} tokens make {} macro-chunks; the test wants 3 or more",
                plan.len()
            ));
        }
        if (e.tokens, e.dropped, chunks.len()) != (n, 0, want_chunks.len()) {
            return Err(format!(
                "request {r}: {} tokens, {} dropped, {} chunks; want {n}, 0, {}",
                e.tokens,
                e.dropped,
                chunks.len(),
                want_chunks.len()
            ));
        }
        let mut rows: Vec<f32> = Vec::new();
        for (k, mc) in plan.iter().enumerate() {
            // The oracle: this macro-chunk alone, prefix first.
            let mut ids = enc.ids[..p].to_vec();
            ids.extend_from_slice(&enc.ids[mc.body.clone()]);
            if ids.len() > limit {
                return Err(format!("request {r} macro-chunk {k}: {} tokens, over {limit}", ids.len()));
            }
            let mut batch = PackedBatch::new(&ckpt.config);
            batch.push_text(&ids, req.task).map_err(|e| e.to_string())?;
            batch.want_multi = true;
            let mut trace = Vec::new();
            let o = cpu.forward_traced(&batch, Some(&mut trace)).map_err(|e| e.to_string())?;
            let h = trace.last().ok_or("no trace")?;
            let om = o.multi.as_ref().ok_or("no oracle multi")?;
            rows.extend_from_slice(&om[mc.local(p, mc.owned.start) * pd..mc.local(p, mc.owned.end) * pd]);
            if k == 0 {
                let whole = reference::mean_pool_l2(h, hid, &[(0, ids.len())]);
                let whole = match req.dims {
                    Some(d) => reference::matryoshka(&whole, d),
                    None => whole,
                };
                let what = format!("request {r}: the whole-text vector (its first forward's)");
                close(&what, e.single.as_deref().ok_or("no whole single")?, &whole, exact)?;
            }
            for i in mc.chunks.clone() {
                let (c, want) = (&chunks[i], &want_chunks[i]);
                let what = format!("request {r} chunk {i} {:?} in macro-chunk {k} {:?}", c.tokens, mc.body);
                if (&c.tokens, &c.chars) != (&want.tokens, &want.chars) {
                    return Err(format!(
                        "{what}: ranges {:?} / {:?}, want {:?}",
                        c.tokens, c.chars, want.chars
                    ));
                }
                let (a, b) = (mc.local(p, c.tokens.start), mc.local(p, c.tokens.end));
                let pooled = reference::mean_pool_l2(h, hid, &[(a, b)]);
                let pooled = match req.dims {
                    Some(d) => reference::matryoshka(&pooled, d),
                    None => pooled,
                };
                close(&what, c.single.as_deref().ok_or("no chunk single vector")?, &pooled, exact)?;
                if let Some(mv) = &c.multi {
                    close_to(&format!("{what} multi"), &mv.data, &om[a * pd..b * pd], exact, 0.99)?;
                }
            }
        }
        if req.output.multi() {
            let mine = &e.multi.as_ref().ok_or("no whole-text multi")?.data;
            if mine.len() != n * pd {
                return Err(format!("request {r}: {} multi rows, want {n}", mine.len() / pd));
            }
            close_to(&format!("request {r} whole-text multi rows"), mine, &rows, exact, 0.99)?;
            for c in &chunks {
                if c.multi.as_ref().map(|m| &m.data[..])
                    != Some(&mine[c.tokens.start * pd..c.tokens.end * pd])
                {
                    return Err(format!(
                        "request {r} chunk {:?}: multi rows differ from the whole text's",
                        c.tokens
                    ));
                }
            }
        }
    }
    // The same request beside others (a short chunked text, a plain one): the same chunks.
    let mixed =
        engine.embed(&[Request::text("before it").task(Task::Code), reqs[1].clone(), Request::text("after")]);
    let (_, a) = chunked(&out[1])?;
    let (_, b) = chunked(&mixed[1])?;
    if a.len() != b.len() {
        return Err(format!("{} chunks alone, {} in a batch", a.len(), b.len()));
    }
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        close(
            &format!("chunk {i} in a batch"),
            y.single.as_deref().unwrap_or(&[]),
            x.single.as_deref().unwrap_or(&[1.0]),
            exact,
        )?;
    }
    Ok(())
}
