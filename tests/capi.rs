//! The C ABI (src/capi.rs) on the CPU backend with a synthetic tiny model: the extern functions
//! called directly from Rust, the header kept current, every export behind the panic guard, and
//! examples/embed.c compiled with the system C compiler against libjv4.so and run.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr;

use jv4::capi::*;
use jv4::model::synth::{write_checkpoint, Preset, SynthSpec};
use jv4::model::Dtype;

fn model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec { seed: 5, preset: Preset::Tiny, adapter_dtype: Dtype::BF16 };
    write_checkpoint(dir.path(), &spec).unwrap();
    dir
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// The code and message of an error handle, which is freed.
fn take(err: *mut jv4_error) -> (jv4_status, String) {
    // SAFETY: the ABI accepts any handle value; the message is copied before the free.
    unsafe {
        let code = jv4_error_code(err);
        let msg = CStr::from_ptr(jv4_error_message(err)).to_string_lossy().into_owned();
        jv4_error_free(err);
        (code, msg)
    }
}

fn open_with(opts: &jv4_engine_options) -> Result<*mut jv4_engine, (jv4_status, String)> {
    let (mut engine, mut err) = (ptr::null_mut(), ptr::null_mut());
    // SAFETY: `opts` is a valid struct whose strings outlive the call; the outs are writable.
    let code = unsafe { jv4_engine_open(opts, &mut engine, &mut err) };
    if code == jv4_status::JV4_OK {
        assert!(err.is_null() && !engine.is_null());
        Ok(engine)
    } else {
        assert!(engine.is_null(), "a failed open returned a handle");
        let (c2, msg) = take(err);
        assert_eq!(code, c2);
        Err((code, msg))
    }
}

fn open(dir: &Path) -> *mut jv4_engine {
    let d = c(dir.to_str().unwrap());
    let cpu = c("cpu");
    let opts = jv4_engine_options {
        model_dir: d.as_ptr(),
        device: cpu.as_ptr(),
        preprocess_threads: 2,
        ..Default::default()
    };
    open_with(&opts).unwrap()
}

/// Embeds and returns the result handle, or the call's failure.
fn embed(engine: *const jv4_engine, reqs: &[jv4_request]) -> Result<*mut jv4_result, (jv4_status, String)> {
    let (mut res, mut err) = (ptr::null_mut(), ptr::null_mut());
    // SAFETY: `reqs` are valid requests whose pointers outlive the call; the outs are writable.
    let code = unsafe { jv4_embed(engine, reqs.as_ptr(), reqs.len(), &mut res, &mut err) };
    if code == jv4_status::JV4_OK {
        Ok(res)
    } else {
        assert!(res.is_null());
        Err(take(err))
    }
}

/// One request's outcome, copied out of the views.
#[derive(Debug, PartialEq)]
struct Outcome {
    status: jv4_status,
    message: String,
    single: Vec<f32>,
    multi: Vec<f32>,
    multi_dim: usize,
    tokens: usize,
    dropped: usize,
    chunks: Vec<ChunkOut>,
}

#[derive(Debug, PartialEq)]
struct ChunkOut {
    single: Vec<f32>,
    multi_rows: usize,
    tokens: (usize, usize),
    chars: (usize, usize),
}

/// # Safety
/// `p` is NULL with `len` 0, or points to `len` floats.
unsafe fn floats(p: *const f32, len: usize) -> Vec<f32> {
    if p.is_null() {
        assert_eq!(len, 0, "a NULL view with a length");
        return Vec::new();
    }
    // SAFETY: by the caller's contract.
    unsafe { std::slice::from_raw_parts(p, len) }.to_vec()
}

fn outcomes(res: *const jv4_result) -> Vec<Outcome> {
    let mut n = 0;
    // SAFETY: `n` is writable; any handle value is accepted.
    assert_eq!(unsafe { jv4_result_count(res, &mut n, ptr::null_mut()) }, jv4_status::JV4_OK);
    (0..n)
        .map(|i| {
            let mut v = std::mem::MaybeUninit::<jv4_embedding_view>::uninit();
            // SAFETY: `v` is writable; on JV4_OK it is initialised and its views are live
            // until the result is freed (after this function).
            unsafe {
                assert_eq!(jv4_result_get(res, i, v.as_mut_ptr(), ptr::null_mut()), jv4_status::JV4_OK);
                let v = v.assume_init();
                let chunks = (0..v.chunks_len)
                    .map(|k| {
                        let mut cv = std::mem::MaybeUninit::<jv4_chunk_view>::uninit();
                        assert_eq!(
                            jv4_result_chunk(res, i, k, cv.as_mut_ptr(), ptr::null_mut()),
                            jv4_status::JV4_OK
                        );
                        let cv = cv.assume_init();
                        ChunkOut {
                            single: floats(cv.single, cv.single_len),
                            multi_rows: cv.multi_rows,
                            tokens: (cv.token_start, cv.token_end),
                            chars: (cv.char_start, cv.char_end),
                        }
                    })
                    .collect();
                Outcome {
                    status: v.status,
                    message: if v.message.is_null() {
                        String::new()
                    } else {
                        CStr::from_ptr(v.message).to_string_lossy().into_owned()
                    },
                    single: floats(v.single, v.single_len),
                    multi: floats(v.multi, v.multi_rows * v.multi_dim),
                    multi_dim: v.multi_dim,
                    tokens: v.tokens,
                    dropped: v.dropped,
                    chunks,
                }
            }
        })
        .collect()
}

fn free_result(res: *mut jv4_result) {
    // SAFETY: any handle value is accepted.
    unsafe { jv4_result_free(res) }
}

fn free_engine(e: *mut jv4_engine) {
    // SAFETY: any handle value is accepted.
    unsafe { jv4_engine_free(e) }
}

fn text(t: &CStr) -> jv4_request {
    jv4_request { text: t.as_ptr(), ..Default::default() }
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images").join(name)
}

/// Matches what the Rust API returns for the same requests, bit for bit (one CPU backend).
#[test]
fn embeds_like_the_rust_api() {
    use jv4::{Engine, EngineOptions, OutputKind, PromptName, Request, Task};
    let m = model();
    let engine = open(m.path());
    let (q, p, code) = (c("how do I sort a list?"), c("Use sorted(xs)."), c("fn main() {}"));
    let (passage, codetask, tm) = (c("passage"), c("code"), c("text-matching"));
    let img = c(fixture("grad_224x224.png").to_str().unwrap());
    let bytes = std::fs::read(fixture("rgba_90x90.png")).unwrap();
    let ids = [5u32, 6, 7, 8];
    let reqs = [
        text(&q),
        jv4_request { prompt: passage.as_ptr(), output: JV4_OUTPUT_BOTH, ..text(&p) },
        jv4_request { task: codetask.as_ptr(), dims: 64, ..text(&code) },
        jv4_request { task: tm.as_ptr(), output: JV4_OUTPUT_MULTI, ..text(&q) },
        jv4_request {
            kind: JV4_INPUT_TOKENS,
            token_ids: ids.as_ptr(),
            token_ids_len: ids.len(),
            ..Default::default()
        },
        jv4_request { kind: JV4_INPUT_IMAGE_PATH, text: img.as_ptr(), dims: 128, ..Default::default() },
        jv4_request {
            kind: JV4_INPUT_IMAGE_BYTES,
            bytes: bytes.as_ptr(),
            bytes_len: bytes.len(),
            ..Default::default()
        },
    ];
    let res = embed(engine, &reqs).unwrap();
    let got = outcomes(res);
    free_result(res);
    free_engine(engine);

    let rust = Engine::open(
        m.path(),
        EngineOptions { device: jv4::Device::Cpu, preprocess_threads: 2, ..Default::default() },
    )
    .unwrap();
    let want = rust.embed(&[
        Request::text("how do I sort a list?"),
        Request::text("Use sorted(xs).").prompt(PromptName::Passage).output(OutputKind::Both),
        Request::text("fn main() {}").task(Task::Code).dims(64),
        Request::text("how do I sort a list?").task(Task::TextMatching).output(OutputKind::Multi),
        Request::tokens(ids.to_vec()),
        Request::image_path(fixture("grad_224x224.png")).dims(128),
        Request::image_bytes(bytes.clone()),
    ]);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let w = w.as_ref().unwrap();
        assert_eq!(g.status, jv4_status::JV4_OK, "request {i}: {}", g.message);
        assert_eq!(g.single, w.single.clone().unwrap_or_default(), "request {i}");
        assert_eq!(g.multi, w.multi.as_ref().map(|m| m.data.clone()).unwrap_or_default(), "request {i}");
        assert_eq!((g.tokens, g.dropped), (w.tokens, w.dropped), "request {i}");
        assert!(g.chunks.is_empty());
        if !g.single.is_empty() {
            assert!((norm(&g.single) - 1.0).abs() < 1e-4, "request {i}");
        }
    }
    assert_eq!(got[2].single.len(), 64);
    assert_eq!(got[5].single.len(), 128);
    assert_eq!(got[1].multi.len(), got[1].tokens * got[1].multi_dim);
    assert!(got[3].single.is_empty() && !got[3].multi.is_empty());
}

/// Every bad request fails alone with a message naming what is wrong; the good ones are the
/// same as when embedded on their own.
#[test]
fn bad_requests_fail_alone() {
    let m = model();
    let engine = open(m.path());
    let good = c("a good text");
    let (classification, loud, bad_utf8) =
        (c("classification"), c("LOUD"), CString::new(b"caf\xe9!".to_vec()).unwrap());
    let hello = c("hello world");
    let ids = [1u32, 2];
    let overlap = [jv4_span { start: 0, end: 5 }, jv4_span { start: 3, end: 8 }];
    let outside = [jv4_span { start: 6, end: 40 }];
    let backwards = [jv4_span { start: 6, end: 11 }, jv4_span { start: 0, end: 5 }];
    let cases: Vec<(jv4_request, jv4_status, &str)> = vec![
        (
            jv4_request { task: classification.as_ptr(), ..text(&good) },
            jv4_status::JV4_ERR_INPUT,
            "classification",
        ),
        (jv4_request { prompt: loud.as_ptr(), ..text(&good) }, jv4_status::JV4_ERR_INPUT, "LOUD"),
        (jv4_request { dims: 100, ..text(&good) }, jv4_status::JV4_ERR_INPUT, "dims 100"),
        (jv4_request { dims: 4096, ..text(&good) }, jv4_status::JV4_ERR_INPUT, "Matryoshka"),
        (text(&bad_utf8), jv4_status::JV4_ERR_INPUT, "text is not valid UTF-8"),
        (
            jv4_request { task: bad_utf8.as_ptr(), ..text(&good) },
            jv4_status::JV4_ERR_INPUT,
            "task is not valid UTF-8",
        ),
        (jv4_request::default(), jv4_status::JV4_ERR_NULL_POINTER, "text is NULL"),
        (jv4_request { kind: 9, ..text(&good) }, jv4_status::JV4_ERR_INVALID_ARGUMENT, "kind 9"),
        (jv4_request { output: 3, ..text(&good) }, jv4_status::JV4_ERR_INVALID_ARGUMENT, "output 3"),
        (jv4_request { chunking: 7, ..text(&good) }, jv4_status::JV4_ERR_INVALID_ARGUMENT, "chunking 7"),
        (
            jv4_request { kind: JV4_INPUT_TOKENS, ..Default::default() },
            jv4_status::JV4_ERR_NULL_POINTER,
            "token_ids",
        ),
        (
            jv4_request {
                kind: JV4_INPUT_TOKENS,
                token_ids: ids.as_ptr(),
                token_ids_len: usize::MAX,
                ..Default::default()
            },
            jv4_status::JV4_ERR_INVALID_ARGUMENT,
            "larger than any array",
        ),
        (
            jv4_request { kind: JV4_INPUT_IMAGE_BYTES, bytes_len: 10, ..Default::default() },
            jv4_status::JV4_ERR_NULL_POINTER,
            "bytes",
        ),
        (
            jv4_request {
                kind: JV4_INPUT_IMAGE_BYTES,
                bytes: good.as_ptr().cast(),
                bytes_len: 5,
                ..Default::default()
            },
            jv4_status::JV4_ERR_INPUT,
            "",
        ),
        (
            jv4_request { kind: JV4_INPUT_IMAGE_PATH, text: good.as_ptr(), ..Default::default() },
            jv4_status::JV4_ERR_IO,
            "a good text",
        ),
        (
            jv4_request { chunking: JV4_CHUNKING_TOKENS, ..text(&hello) },
            jv4_status::JV4_ERR_INPUT,
            "chunk_tokens must be at least 1",
        ),
        (jv4_request { chunking: JV4_CHUNKING_SPANS, ..text(&hello) }, jv4_status::JV4_ERR_INPUT, "no spans"),
        (
            jv4_request {
                chunking: JV4_CHUNKING_SPANS,
                spans: overlap.as_ptr(),
                spans_len: 2,
                ..text(&hello)
            },
            jv4_status::JV4_ERR_INPUT,
            "span 1 [3, 8) overlaps",
        ),
        (
            jv4_request {
                chunking: JV4_CHUNKING_SPANS,
                spans: backwards.as_ptr(),
                spans_len: 2,
                ..text(&hello)
            },
            jv4_status::JV4_ERR_INPUT,
            "overlaps or comes before",
        ),
        (
            jv4_request {
                chunking: JV4_CHUNKING_SPANS,
                spans: outside.as_ptr(),
                spans_len: 1,
                ..text(&hello)
            },
            jv4_status::JV4_ERR_INPUT,
            "outside the text (11 bytes)",
        ),
        (
            jv4_request { chunking: JV4_CHUNKING_SPANS, spans_len: 1, ..text(&hello) },
            jv4_status::JV4_ERR_NULL_POINTER,
            "spans",
        ),
        (
            jv4_request {
                kind: JV4_INPUT_TOKENS,
                token_ids: ids.as_ptr(),
                token_ids_len: 2,
                chunking: JV4_CHUNKING_SPANS,
                spans: overlap.as_ptr(),
                spans_len: 1,
                ..Default::default()
            },
            jv4_status::JV4_ERR_INPUT,
            "needs a text input",
        ),
    ];
    // Good requests around and between the bad ones.
    let mut reqs = vec![text(&good)];
    for (r, _, _) in &cases {
        reqs.push(*r);
        reqs.push(text(&good));
    }
    let res = embed(engine, &reqs).unwrap();
    let got = outcomes(res);
    free_result(res);
    let alone = embed(engine, &[text(&good)]).unwrap();
    let want = outcomes(alone).remove(0);
    free_result(alone);
    assert_eq!(want.status, jv4_status::JV4_OK);
    assert_eq!(got.len(), 2 * cases.len() + 1);
    for (k, g) in got.iter().enumerate() {
        if k % 2 == 0 {
            assert_eq!(g, &want, "good request {k}");
            continue;
        }
        let (_, code, needle) = &cases[k / 2];
        assert_eq!(g.status, *code, "case {}: {}", k / 2, g.message);
        assert!(
            g.message.contains(needle) && !g.message.is_empty(),
            "case {}: {:?} lacks {needle:?}",
            k / 2,
            g.message
        );
        assert!(g.single.is_empty() && g.multi.is_empty() && g.chunks.is_empty());
    }
    free_engine(engine);
}

/// Late chunking through the ABI: until the engine pools chunks, such a request fails alone with
/// an input error; once it does, the chunks must tile the text as asked, unit vectors at the
/// request's width.
#[test]
fn late_chunking_requests_fail_alone_or_give_chunks() {
    let m = model();
    let engine = open(m.path());
    let t = "The first sentence. The second one is here. And a third.";
    let tc = c(t);
    let spans = [
        jv4_span { start: 0, end: 19 },
        jv4_span { start: 20, end: 43 },
        jv4_span { start: 44, end: t.len() },
    ];
    let reqs = [
        text(&tc),
        jv4_request { chunking: JV4_CHUNKING_TOKENS, chunk_tokens: 4, output: JV4_OUTPUT_BOTH, ..text(&tc) },
        jv4_request {
            chunking: JV4_CHUNKING_SPANS,
            spans: spans.as_ptr(),
            spans_len: spans.len(),
            dims: 64,
            ..text(&tc)
        },
        text(&tc),
    ];
    let res = embed(engine, &reqs).unwrap();
    let got = outcomes(res);
    free_result(res);
    free_engine(engine);
    assert_eq!(got[0].status, jv4_status::JV4_OK);
    assert_eq!(got[0], got[3], "the plain requests around the chunked ones");
    let (by_tokens, by_spans) = (&got[1], &got[2]);
    for g in [by_tokens, by_spans] {
        if g.status != jv4_status::JV4_OK {
            assert_eq!(g.status, jv4_status::JV4_ERR_INPUT, "{}", g.message);
            assert!(!g.message.is_empty() && g.chunks.is_empty() && g.single.is_empty());
            continue;
        }
        assert!(!g.chunks.is_empty());
        for ch in &g.chunks {
            assert!((norm(&ch.single) - 1.0).abs() < 1e-4);
            assert!(ch.tokens.0 < ch.tokens.1 && ch.tokens.1 <= g.tokens);
            assert!(ch.chars.0 < ch.chars.1 && ch.chars.1 <= t.len());
        }
    }
    if by_tokens.status == jv4_status::JV4_OK {
        for (a, b) in by_tokens.chunks.iter().zip(&by_tokens.chunks[1..]) {
            assert_eq!(a.tokens.1, b.tokens.0, "token chunks are consecutive");
        }
        for ch in &by_tokens.chunks {
            assert!(ch.tokens.1 - ch.tokens.0 <= 4 && ch.multi_rows == ch.tokens.1 - ch.tokens.0);
            assert_eq!(ch.single.len(), got[0].single.len());
        }
    }
    if by_spans.status == jv4_status::JV4_OK {
        let chars: Vec<_> = by_spans.chunks.iter().map(|c| c.chars).collect();
        assert_eq!(chars, spans.iter().map(|s| (s.start, s.end)).collect::<Vec<_>>());
        assert!(by_spans.chunks.iter().all(|c| c.single.len() == 64 && c.multi_rows == 0));
    }
}

/// NULL pointers, bad sizes, freed and foreign handles: each call fails with a status and a
/// message (never a crash), and freeing twice or freeing NULL is a no-op.
#[test]
fn null_pointers_bad_sizes_and_dead_handles_are_errors() {
    use jv4_status::*;
    let m = model();
    let d = c(m.path().to_str().unwrap());
    let cpu = c("cpu");
    let base = jv4_engine_options {
        model_dir: d.as_ptr(),
        device: cpu.as_ptr(),
        preprocess_threads: 2,
        ..Default::default()
    };

    // jv4_engine_open.
    let mut err = ptr::null_mut();
    let mut e = ptr::null_mut();
    // SAFETY: every pointer is NULL or valid; NULL ones are what is tested.
    unsafe {
        assert_eq!(jv4_engine_open(ptr::null(), &mut e, &mut err), JV4_ERR_NULL_POINTER);
        assert!(take(err).1.contains("opts is NULL"));
        assert_eq!(jv4_engine_open(&base, ptr::null_mut(), &mut err), JV4_ERR_NULL_POINTER);
        assert!(take(err).1.contains("out is NULL"));
        // A NULL `err` still gives the code.
        assert_eq!(jv4_engine_open(ptr::null(), &mut e, ptr::null_mut()), JV4_ERR_NULL_POINTER);
    }
    let no_dir = jv4_engine_options { model_dir: ptr::null(), ..base };
    assert_eq!(open_with(&no_dir).unwrap_err().0, JV4_ERR_NULL_POINTER);
    let bad_utf8 = CString::new(b"/tmp/\xff".to_vec()).unwrap();
    let e1 = open_with(&jv4_engine_options { model_dir: bad_utf8.as_ptr(), ..base }).unwrap_err();
    assert_eq!(e1.0, JV4_ERR_INPUT);
    assert!(e1.1.contains("model_dir is not valid UTF-8"), "{}", e1.1);
    let tpu = c("tpu:1");
    let e2 = open_with(&jv4_engine_options { device: tpu.as_ptr(), ..base }).unwrap_err();
    assert!(e2.0 == JV4_ERR_INPUT && e2.1.contains("tpu:1"), "{e2:?}");
    let missing = c("/nonexistent/jv4-model");
    let e3 = open_with(&jv4_engine_options { model_dir: missing.as_ptr(), ..base }).unwrap_err();
    assert!(e3.1.contains("/nonexistent/jv4-model"), "{e3:?}");
    let bad_tok = c("/nonexistent/tokenizer.json");
    let e4 = open_with(&jv4_engine_options { tokenizer: bad_tok.as_ptr(), ..base }).unwrap_err();
    assert!(e4.1.contains("tokenizer"), "{e4:?}");

    let engine = open_with(&base).unwrap();
    let t = c("text");
    let reqs = [text(&t), text(&t)];
    let mut res = ptr::null_mut();
    let (mut single, mut multi) = (0usize, 0usize);
    // SAFETY: as above: valid or deliberately NULL / dangling-by-value pointers, never read.
    unsafe {
        assert_eq!(jv4_engine_dims(engine, &mut single, &mut multi, ptr::null_mut()), JV4_OK);
        assert_eq!((single, multi), (256, 128));
        assert_eq!(jv4_engine_dims(engine, ptr::null_mut(), &mut multi, &mut err), JV4_ERR_NULL_POINTER);
        assert!(take(err).1.contains("single_dim is NULL"));
        // jv4_embed: NULL engine, NULL out, NULL requests with n > 0, n too large.
        assert_eq!(jv4_embed(ptr::null(), reqs.as_ptr(), 2, &mut res, &mut err), JV4_ERR_NULL_POINTER);
        assert!(take(err).1.contains("jv4_engine is NULL"));
        assert_eq!(jv4_embed(engine, reqs.as_ptr(), 2, ptr::null_mut(), &mut err), JV4_ERR_NULL_POINTER);
        take(err);
        assert_eq!(jv4_embed(engine, ptr::null(), 2, &mut res, &mut err), JV4_ERR_NULL_POINTER);
        assert!(take(err).1.contains("requests (with length 2) is NULL"));
        assert_eq!(
            jv4_embed(engine, reqs.as_ptr(), usize::MAX / 2, &mut res, &mut err),
            JV4_ERR_INVALID_ARGUMENT
        );
        assert!(take(err).1.contains("larger than any array"));
        // No requests: an empty result.
        assert_eq!(jv4_embed(engine, ptr::null(), 0, &mut res, &mut err), JV4_OK);
        assert!(err.is_null());
        assert!(outcomes(res).is_empty());
        jv4_result_free(res);

        // A handle of the wrong kind, and a value that was never a handle.
        assert_eq!(jv4_embed(res.cast(), reqs.as_ptr(), 2, &mut res, &mut err), JV4_ERR_BAD_HANDLE);
        take(err);
        let mut n = 0;
        assert_eq!(jv4_result_count(engine.cast(), &mut n, &mut err), JV4_ERR_BAD_HANDLE);
        assert!(take(err).1.contains("is a jv4_engine, not a jv4_result"));
        let forged = ptr::without_provenance::<jv4_result>(0xdead_bee0);
        assert_eq!(jv4_result_count(forged, &mut n, &mut err), JV4_ERR_BAD_HANDLE);
        assert!(take(err).1.contains("not a live jv4_result"));
        jv4_result_free(forged.cast_mut()); // a no-op
        jv4_engine_free(forged.cast_mut().cast()); // a no-op

        // Result accessors: NULL out, index past the end, chunk of an unchunked request.
        assert_eq!(jv4_embed(engine, reqs.as_ptr(), 2, &mut res, &mut err), JV4_OK);
        assert_eq!(jv4_result_count(res, ptr::null_mut(), &mut err), JV4_ERR_NULL_POINTER);
        take(err);
        assert_eq!(jv4_result_get(res, 0, ptr::null_mut(), &mut err), JV4_ERR_NULL_POINTER);
        take(err);
        let mut v = std::mem::MaybeUninit::<jv4_embedding_view>::uninit();
        assert_eq!(jv4_result_get(res, 2, v.as_mut_ptr(), &mut err), JV4_ERR_INVALID_ARGUMENT);
        assert!(take(err).1.contains("index 2: the result holds 2"));
        let mut cv = std::mem::MaybeUninit::<jv4_chunk_view>::uninit();
        assert_eq!(jv4_result_chunk(res, 0, 0, cv.as_mut_ptr(), &mut err), JV4_ERR_INVALID_ARGUMENT);
        assert!(take(err).1.contains("chunk 0: request 0 has 0 chunks"));
        assert_eq!(jv4_result_chunk(res, 0, 0, ptr::null_mut(), &mut err), JV4_ERR_NULL_POINTER);
        take(err);

        // Freed: reported, never dereferenced; freeing again and freeing NULL are no-ops.
        jv4_result_free(res);
        jv4_result_free(res);
        jv4_result_free(ptr::null_mut());
        assert_eq!(jv4_result_get(res, 0, v.as_mut_ptr(), &mut err), JV4_ERR_BAD_HANDLE);
        let (_, msg) = take(err);
        assert!(msg.contains("not a live jv4_result (already freed"), "{msg}");
        jv4_engine_free(engine);
        jv4_engine_free(engine);
        jv4_engine_free(ptr::null_mut());
        assert_eq!(jv4_embed(engine, reqs.as_ptr(), 2, &mut res, &mut err), JV4_ERR_BAD_HANDLE);
        assert!(res.is_null());
        assert!(take(err).1.contains("not a live jv4_engine"));

        // Error handles: NULL and freed ones have static messages.
        assert_eq!(jv4_error_code(ptr::null()), JV4_OK);
        assert!(CStr::from_ptr(jv4_error_message(ptr::null())).to_str().unwrap().contains("no error"));
        assert_eq!(jv4_embed(engine, reqs.as_ptr(), 2, &mut res, &mut err), JV4_ERR_BAD_HANDLE);
        jv4_error_free(err);
        jv4_error_free(err);
        jv4_error_free(ptr::null_mut());
        assert_eq!(jv4_error_code(err), JV4_ERR_BAD_HANDLE);
        assert!(CStr::from_ptr(jv4_error_message(err)).to_str().unwrap().contains("not a live jv4_error"));
        assert!(CStr::from_ptr(jv4_version()).to_str().unwrap() == env!("CARGO_PKG_VERSION"));
    }
}

/// The caller-buffer variant: the size check comes before any work, rows match the result
/// handle's vectors bit for bit, and a request that cannot fill its row fails alone (NaN row).
#[test]
fn embed_into_checks_the_buffer_and_fails_rows_alone() {
    use jv4_status::*;
    let m = model();
    let engine = open(m.path());
    let (a, b) = (c("first"), c("second"));
    let bad_task = c("nope");
    let reqs = [
        text(&a),
        jv4_request { dims: 64, ..text(&b) },
        jv4_request { task: bad_task.as_ptr(), ..text(&a) },
        jv4_request { output: JV4_OUTPUT_MULTI, ..text(&b) },
        text(&b),
    ];
    let res = embed(engine, &reqs).unwrap();
    let want = outcomes(res);
    free_result(res);
    let dim = 256;
    let mut buf = vec![7.0f32; reqs.len() * dim];
    let mut st = [JV4_ERR_PANIC; 5];
    let mut err = ptr::null_mut();
    // SAFETY: `buf` holds the length passed (or more), `st` holds `n` codes, `reqs` are valid.
    unsafe {
        assert_eq!(
            jv4_embed_into(
                engine,
                reqs.as_ptr(),
                5,
                dim,
                buf.as_mut_ptr(),
                buf.len() - 1,
                st.as_mut_ptr(),
                &mut err
            ),
            JV4_ERR_BUFFER_TOO_SMALL
        );
        assert!(take(err).1.contains("out holds 1279 floats; 5 requests x 256 need 1280"));
        assert!(
            buf.iter().all(|&x| x == 7.0) && st.iter().all(|&s| s == JV4_ERR_PANIC),
            "written before the check"
        );
        assert_eq!(
            jv4_embed_into(
                engine,
                reqs.as_ptr(),
                5,
                usize::MAX,
                buf.as_mut_ptr(),
                buf.len(),
                ptr::null_mut(),
                &mut err
            ),
            JV4_ERR_INVALID_ARGUMENT
        );
        assert!(take(err).1.contains("overflows"));
        assert_eq!(
            jv4_embed_into(
                engine,
                reqs.as_ptr(),
                5,
                0,
                buf.as_mut_ptr(),
                buf.len(),
                ptr::null_mut(),
                &mut err
            ),
            JV4_ERR_INVALID_ARGUMENT
        );
        take(err);
        assert_eq!(
            jv4_embed_into(
                engine,
                reqs.as_ptr(),
                5,
                dim,
                ptr::null_mut(),
                buf.len(),
                ptr::null_mut(),
                &mut err
            ),
            JV4_ERR_NULL_POINTER
        );
        take(err);
        let code = jv4_embed_into(
            engine,
            reqs.as_ptr(),
            5,
            dim,
            buf.as_mut_ptr(),
            buf.len(),
            st.as_mut_ptr(),
            &mut err,
        );
        assert_eq!(code, JV4_ERR_INVALID_ARGUMENT, "the first failure is request 1's width");
        let (_, msg) = take(err);
        assert!(
            msg.contains("request 1 of 5")
                && msg.contains("64 values")
                && msg.contains("3 of 5 requests failed"),
            "{msg}"
        );
        // Only good requests of the full width, no statuses array: JV4_OK.
        let two = [reqs[0], reqs[4]];
        let mut buf2 = vec![0.0f32; 2 * dim];
        assert_eq!(
            jv4_embed_into(
                engine,
                two.as_ptr(),
                2,
                dim,
                buf2.as_mut_ptr(),
                buf2.len(),
                ptr::null_mut(),
                &mut err
            ),
            JV4_OK
        );
        assert!(err.is_null());
        assert_eq!(&buf2[..dim], &want[0].single[..]);
        assert_eq!(&buf2[dim..], &want[4].single[..]);
    }
    assert_eq!(st, [JV4_OK, JV4_ERR_INVALID_ARGUMENT, JV4_ERR_INPUT, JV4_ERR_INVALID_ARGUMENT, JV4_OK]);
    assert_eq!(&buf[..dim], &want[0].single[..]);
    assert_eq!(&buf[4 * dim..], &want[4].single[..]);
    for row in [1, 2, 3] {
        assert!(buf[row * dim..(row + 1) * dim].iter().all(|x| x.is_nan()), "row {row}");
    }
    free_engine(engine);
}

/// One engine handle used from several threads at once (and a result freed on another thread than
/// the one that made it): every thread gets the vectors a lone call gets.
#[test]
fn one_engine_handle_serves_many_threads() {
    let m = model();
    let engine = open(m.path());
    let texts: Vec<CString> = (0..6).map(|i| c(&format!("text number {i} for the threads test"))).collect();
    let reqs: Vec<jv4_request> = texts.iter().map(|t| text(t)).collect();
    let res = embed(engine, &reqs).unwrap();
    let want = outcomes(res);
    free_result(res);
    // Raw pointers are not Send; a handle's value is all the ABI needs (it is an id, not an
    // address), and each thread makes its own requests from the shared texts.
    let e = engine.addr();
    let texts = &texts;
    let results: Vec<usize> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(move || {
                    let engine = ptr::without_provenance::<jv4_engine>(e);
                    let reqs: Vec<jv4_request> = texts.iter().map(|t| text(t)).collect();
                    (0..3).map(|_| embed(engine, &reqs).unwrap().addr()).collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.len(), 12);
    for r in results {
        let res = ptr::without_provenance_mut::<jv4_result>(r);
        assert_eq!(outcomes(res), want);
        free_result(res);
    }
    free_engine(engine);
}

// ---------------------------------------------------------------------------------------------
// Build-level checks.

/// include/jv4.h is what cbindgen makes of src/capi.rs today.
#[test]
fn header_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).unwrap();
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/capi.rs"))
        .generate()
        .expect("cbindgen cannot parse src/capi.rs")
        .write(&mut out);
    let path = root.join("include/jv4.h");
    let current = std::fs::read(&path).unwrap_or_default();
    if current != out {
        if std::env::var_os("JV4_BLESS").is_some() {
            std::fs::write(&path, &out).unwrap();
            eprintln!("wrote {}", path.display());
        } else {
            panic!(
                "include/jv4.h is out of date with src/capi.rs; regenerate it with\n  \
                 JV4_BLESS=1 cargo test --release --test capi header_is_current\nand commit it"
            );
        }
    }
}

/// Every `#[no_mangle]` function of src/capi.rs is one call of `guard(` or `guard_or(` (its body
/// is nothing else), so no panic can unwind into (and abort) the host.
#[test]
fn every_export_runs_inside_the_panic_guard() {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/capi.rs")).unwrap();
    let mut names = Vec::new();
    for (at, _) in src.match_indices("\n#[no_mangle]\n") {
        let rest = &src[at + 1..];
        let fn_at = rest.find("fn ").unwrap();
        let name: String =
            rest[fn_at + 3..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        assert!(rest[..fn_at].contains("extern \"C\""), "{name} is not extern \"C\"");
        let open = fn_at + rest[fn_at..].find('{').unwrap();
        let close = open + matching(&rest[open..]);
        let body = rest[open + 1..close].trim();
        let call = ["guard(", "guard_or("].iter().find(|g| body.starts_with(**g));
        let call = call.unwrap_or_else(|| panic!("{name}: the body does not start with guard( or guard_or("));
        let paren = call.len() - 1;
        let end = paren + matching(&body[paren..]);
        assert_eq!(end + 1, body.len(), "{name}: the body has more than the guard call");
        names.push(name);
    }
    // The list the header exports, so that a function added without #[no_mangle] is noticed too.
    let header =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/jv4.h")).unwrap();
    // Every identifier `jv4_...` directly followed by `(`: the declared functions.
    let mut exported: Vec<String> = header
        .match_indices('(')
        .filter_map(|(at, _)| {
            let head = &header[..at];
            let start = head.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
            Some(head[start..].to_string()).filter(|w| w.starts_with("jv4_"))
        })
        .collect();
    exported.sort();
    exported.dedup();
    names.sort();
    assert_eq!(names, exported, "the #[no_mangle] functions vs the header's");
    assert!(names.len() >= 12, "{names:?}");
}

/// The offset of the bracket closing the one `s` starts with, skipping string literals.
fn matching(s: &str) -> usize {
    let (open, close) = match s.as_bytes()[0] {
        b'(' => (b'(', b')'),
        b'{' => (b'{', b'}'),
        b => panic!("not a bracket: {}", b as char),
    };
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, &b) in s.as_bytes().iter().enumerate() {
        if in_str {
            match b {
                _ if esc => esc = false,
                b'\\' => esc = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        if b == b'"' {
            in_str = true;
        } else if b == open {
            depth += 1;
        } else if b == close {
            depth -= 1;
            if depth == 0 {
                return i;
            }
        }
    }
    panic!("unbalanced brackets");
}

/// examples/embed.c, compiled with the system's C compiler against the cdylib of this build
/// (libjv4.so, made by the same `cargo test` build: the lib's crate types include cdylib) and run on a synthetic model: it checks its own output and exits non-zero on failure.
#[test]
fn c_example_compiles_and_passes() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if Command::new(&cc).arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        eprintln!("SKIPPED c_example_compiles_and_passes: no C compiler ({cc}) on this machine");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The test binary is target/<profile>/deps/capi-<hash>; the rustc run that built the rlib this
    // test links also wrote the cdylib next to it (deps/libjv4.so). `cargo build` copies it up to
    // target/<profile>, but `cargo test` does not, so deps/ is the current one.
    let exe = std::env::current_exe().unwrap();
    let lib_dir = exe.parent().unwrap().to_path_buf();
    let so = lib_dir.join(format!("{}jv4{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
    assert!(so.exists(), "{} is missing: it is built with the tests (crate-type cdylib)", so.display());
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("embed");
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("examples/embed.c"))
        .arg("-L")
        .arg(&lib_dir)
        .args(["-ljv4", "-lm", "-o"])
        .arg(&bin)
        .output()
        .unwrap();
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let m = model();
    let run = Command::new(&bin)
        .arg(m.path())
        .arg(fixture("grad_224x224.png"))
        .env("LD_LIBRARY_PATH", &lib_dir)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "embed.c failed ({}):\n{stdout}\n{stderr}", run.status);
    assert!(stdout.contains("all passed"), "{stdout}");
    assert!(stdout.contains(&format!("jv4 {}", env!("CARGO_PKG_VERSION"))), "{stdout}");
}
