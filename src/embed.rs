//! The `jv4 embed` command: JSON lines in, JSON lines (or .npy / .npz) out. Every line is
//! answered; a line that cannot be read, parsed or embedded gets `{"id", "error"}` and the others
//! go on. The vectors are written in the type and encoding asked for ([`jv4::engine::output`]).

use std::io::{BufReader, Read, Write};
use std::path::Path;

use jv4::engine::jsonl::{parse_line, Defaults, Line};
use jv4::engine::output::{npy_bytes, npy_rows, npz_bytes, quantize, EmbeddingType, Quantized};
use jv4::engine::{Embedding, Engine, MultiVector, Request};
use jv4::{Error, Result};
use serde_json::{json, Value};

/// Requests are embedded in chunks of this many lines, so a large file streams.
const CHUNK: usize = 1024;

/// The kind of output file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// JSON lines.
    Jsonl,
    /// One `[lines, width]` matrix of the single vectors.
    Npy,
    /// The multi-vectors as `data` `[rows, width]` and `offsets` `[lines + 1]` (int64: line `i`'s
    /// rows are `data[offsets[i]..offsets[i + 1]]`), plus `single` `[lines, width]` when both
    /// outputs are asked for.
    Npz,
}

/// How vectors are written.
#[derive(Clone, Copy, Debug)]
pub struct Format {
    pub file: FileKind,
    /// JSONL only: each vector as one base64 string of its little-endian bytes.
    pub base64: bool,
    pub ty: EmbeddingType,
}

/// What a .npy / .npz collects until the end.
#[derive(Default)]
struct Arrays {
    single: Vec<Quantized>,
    multi: Vec<u8>,
    multi_width: Option<usize>,
    offsets: Vec<i64>,
}

pub fn run(
    engine: &Engine,
    d: &Defaults,
    input: Option<&Path>,
    output: Option<&Path>,
    fmt: Format,
) -> Result<()> {
    let npy = fmt.file != FileKind::Jsonl;
    let (reader, total): (Box<dyn Read>, Option<u64>) = match input {
        Some(p) => {
            let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
            let len = f.metadata().map(|m| m.len()).ok();
            (Box::new(f), len)
        }
        None => (Box::new(std::io::stdin().lock()), None),
    };
    let mut out: Box<dyn Write> = match output.filter(|_| !npy) {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).map_err(|e| Error::io(p, e))?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut reader = BufReader::new(reader);
    let mut consumed = 0u64;
    let (mut n, mut failed) = (0usize, 0usize);
    let mut arrays = Arrays { offsets: vec![0], ..Arrays::default() };
    let mut lost: Option<Error> = None; // a DeviceLost ends the run with its own exit code
    let mut broken = false; // a read error ends the input (reading again would repeat it)
    loop {
        let mut chunk = Vec::with_capacity(CHUNK);
        while !broken && chunk.len() < CHUNK {
            let mut buf = Vec::new();
            match jv4::engine::limits::read_line(&mut reader, &mut buf, d.limits.max_line_bytes) {
                Ok(0) => break,
                Ok(k) => {
                    consumed += k as u64;
                    while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
                        buf.pop();
                    }
                    n += 1;
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        continue; // blank lines are not requests
                    }
                    chunk.push(parse_line(n, Ok(buf), d));
                }
                Err(e) => {
                    n += 1;
                    chunk.push(parse_line(n, Err(e), d));
                    broken = true;
                }
            }
        }
        if chunk.is_empty() {
            break;
        }
        let reqs: Vec<Request> = chunk
            .iter()
            .filter_map(|l| if let Line::Ok(_, r) = l { Some(r.clone()) } else { None })
            .collect();
        let mut results = engine.embed(&reqs).into_iter();
        for line in chunk {
            let (id, result) = match line {
                Line::Ok(id, _) => {
                    let r = results.next().expect("one result per request");
                    if let Err(e @ Error::DeviceLost(_)) = &r {
                        lost.get_or_insert_with(|| e.clone());
                    }
                    (id, r.map_err(|e| e.to_string()))
                }
                Line::Err(id, msg) => (id, Err(msg)),
            };
            let result = match result {
                Ok(e) if npy && e.chunks.is_some() => {
                    Err("late-chunked results need a .jsonl output (a .npy / .npz holds one vector per line)"
                        .into())
                }
                r => r,
            };
            match result {
                Ok(emb) => {
                    if emb.dropped > 0 {
                        eprintln!(
                            "warning: {id}: truncated to {} tokens ({} dropped)",
                            emb.tokens, emb.dropped
                        );
                    }
                    if npy {
                        collect(&mut arrays, &emb, fmt.ty);
                    } else {
                        writeln!(out, "{}", to_json(&id, &emb, fmt)).map_err(|e| Error::io("output", e))?;
                    }
                }
                Err(msg) => {
                    failed += 1;
                    eprintln!("error: {id}: {msg}");
                    if !npy {
                        writeln!(out, "{}", json!({"id": id, "error": msg}))
                            .map_err(|e| Error::io("output", e))?;
                    }
                }
            }
        }
        if let Some(total) = total {
            eprint!("\r{:>3}% {n} lines", consumed * 100 / total.max(1));
        }
    }
    if total.is_some() {
        eprintln!();
    }
    out.flush().map_err(|e| Error::io("output", e))?;
    if let Some(e) = lost {
        return Err(e);
    }
    if npy {
        let path = output.expect("npy implies --output");
        if failed > 0 {
            return Err(Error::Input(format!(
                "{failed} of {n} lines failed; no {} written (rows would not line up)",
                path.display()
            )));
        }
        let bytes = match fmt.file {
            FileKind::Npz => npz(&arrays, fmt.ty, d.output.single())?,
            _ => npy_rows(&arrays.single, fmt.ty)
                .map_err(|e| Error::Input(format!("{}: {e}; nothing written", path.display())))?,
        };
        std::fs::write(path, bytes).map_err(|e| Error::io(path, e))?;
    }
    if failed > 0 {
        return Err(Error::Input(format!("{failed} of {n} lines failed (their errors are in the output)")));
    }
    Ok(())
}

/// Adds a line's vectors to the arrays of a .npy / .npz.
fn collect(a: &mut Arrays, e: &Embedding, ty: EmbeddingType) {
    if let Some(s) = &e.single {
        a.single.push(quantize(s, ty));
    }
    if let Some(m) = &e.multi {
        for r in 0..m.rows() {
            a.multi.extend(quantize(m.row(r), ty).to_le_bytes());
        }
        a.multi_width = Some(ty.width(m.dim));
        let last = *a.offsets.last().expect("offsets start at 0");
        a.offsets.push(last + m.rows() as i64);
    }
}

fn npz(a: &Arrays, ty: EmbeddingType, with_single: bool) -> Result<Vec<u8>> {
    let width = a.multi_width.unwrap_or(0);
    let rows = *a.offsets.last().expect("offsets start at 0") as usize;
    let offsets: Vec<u8> = a.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    let mut members = vec![
        ("data", npy_bytes(ty.npy_descr(), &[rows, width], &a.multi)),
        ("offsets", npy_bytes("<i8", &[a.offsets.len()], &offsets)),
    ];
    if with_single {
        members.push(("single", npy_rows(&a.single, ty)?));
    }
    npz_bytes(&members)
}

/// A vector in the requested type and encoding.
fn vector(v: &[f32], fmt: Format) -> Value {
    quantize(v, fmt.ty).to_json(fmt.base64)
}

fn rows(m: &MultiVector, fmt: Format) -> Value {
    Value::Array((0..m.rows()).map(|r| vector(m.row(r), fmt)).collect())
}

fn to_json(id: &Value, e: &Embedding, fmt: Format) -> Value {
    let mut v = json!({"id": id});
    if let Some(s) = &e.single {
        v["embedding"] = vector(s, fmt);
    }
    if let Some(m) = &e.multi {
        v["multi_vector"] = rows(m, fmt);
    }
    if let Some(chunks) = &e.chunks {
        let list: Vec<Value> = chunks
            .iter()
            .map(|c| {
                let mut o = json!({
                    "tokens": [c.tokens.start, c.tokens.end],
                    "chars": [c.chars.start, c.chars.end],
                });
                if let Some(s) = &c.single {
                    o["embedding"] = vector(s, fmt);
                }
                if let Some(m) = &c.multi {
                    o["multi_vector"] = rows(m, fmt);
                }
                o
            })
            .collect();
        v["chunks"] = Value::Array(list);
    }
    v
}
