//! The `jv4 embed` command: JSON lines in, JSON lines (or .npy) out. Every line is answered; a
//! line that cannot be read, parsed or embedded gets `{"id", "error"}` and the others go on.

use std::io::{BufReader, Read, Write};
use std::path::Path;

use jv4::engine::jsonl::{parse_line, Defaults, Line};
use jv4::engine::{Embedding, Engine, Request};
use jv4::{Error, Result};
use serde_json::{json, Value};

/// Requests are embedded in chunks of this many lines, so a large file streams.
const CHUNK: usize = 1024;

pub fn run(
    engine: &Engine,
    d: &Defaults,
    input: Option<&Path>,
    output: Option<&Path>,
    npy: bool,
) -> Result<()> {
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
    let mut npy_rows: Vec<Vec<f32>> = Vec::new();
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
            match result {
                Ok(emb) => {
                    if emb.dropped > 0 {
                        eprintln!(
                            "warning: {id}: truncated to {} tokens ({} dropped)",
                            emb.tokens, emb.dropped
                        );
                    }
                    if npy {
                        npy_rows.push(emb.single.clone().unwrap_or_default());
                    } else {
                        writeln!(out, "{}", to_json(&id, &emb)).map_err(|e| Error::io("output", e))?;
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
                "{failed} of {n} lines failed; no .npy written (rows would not line up)"
            )));
        }
        write_npy(path, &npy_rows)?;
    }
    if failed > 0 {
        return Err(Error::Input(format!("{failed} of {n} lines failed (their errors are in the output)")));
    }
    Ok(())
}

fn to_json(id: &Value, e: &Embedding) -> Value {
    let mut v = json!({"id": id});
    if let Some(s) = &e.single {
        v["embedding"] = json!(s);
    }
    if let Some(m) = &e.multi {
        let rows: Vec<&[f32]> = m.data.chunks(m.dim.max(1)).collect();
        v["multi_vector"] = json!(rows);
    }
    v
}

/// A little-endian f32 `.npy` (format 1.0) of equal-length rows.
fn write_npy(path: &Path, rows: &[Vec<f32>]) -> Result<()> {
    let cols = rows.first().map_or(0, Vec::len);
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {cols}), }}", rows.len());
    // Pad so that magic (6) + version (2) + length (2) + header ends on a 64-byte boundary.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for r in rows {
        for v in r {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}
