//! `jv4 embed` output formats on the CPU backend with a synthetic model: base64 holds exactly the
//! float values, the quantised types follow from the float vectors by the documented rules,
//! `.npy` / `.npz` hold the same values as the JSONL, a mixed-width `.npy` is refused, and late
//! chunking comes back as "chunks".

use std::path::Path;
use std::process::{Command, Output};

use jv4::engine::jsonl::base64_decode;
use serde_json::Value;

fn jv4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jv4")).args(args).output().expect("run jv4")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn embed(model: &Path, input: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["embed", "--model", model.to_str().unwrap(), "--device", "cpu"];
    args.extend(["--input", input.to_str().unwrap()]);
    args.extend(extra);
    let o = jv4(&args);
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
    o
}

fn lines(o: &Output) -> Vec<Value> {
    assert!(o.status.success(), "{}", text(o));
    o.stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// The data of a `.npy` after its header, and the header.
fn npy(bytes: &[u8]) -> (String, &[u8]) {
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let h = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    (String::from_utf8(bytes[10..10 + h].to_vec()).unwrap(), &bytes[10 + h..])
}

/// The members of a stored (uncompressed) zip, by name.
fn unzip(z: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    let u16_at = |i: usize| u16::from_le_bytes([z[i], z[i + 1]]) as usize;
    while z[at..at + 4] == [0x50, 0x4b, 0x03, 0x04] {
        assert_eq!(u16_at(at + 8), 0, "stored");
        let size = u32::from_le_bytes(z[at + 18..at + 22].try_into().unwrap()) as usize;
        let (name_len, extra) = (u16_at(at + 26), u16_at(at + 28));
        let name = String::from_utf8(z[at + 30..at + 30 + name_len].to_vec()).unwrap();
        let start = at + 30 + name_len + extra;
        out.push((name, z[start..start + size].to_vec()));
        at = start + size;
    }
    out
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn output_formats_hold_the_same_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    assert!(jv4(&["synth", "--out", model.to_str().unwrap()]).status.success());
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"a\", \"text\": \"the first text\"}\n{\"id\": \"b\", \"text\": \"a second, longer text here\"}\n",
    )
    .unwrap();

    let float = lines(&embed(&model, &input, &["--vector", "both"]));
    let single: Vec<Vec<f32>> = float.iter().map(|v| floats(&v["embedding"])).collect();
    let multi: Vec<Vec<Vec<f32>>> =
        float.iter().map(|v| v["multi_vector"].as_array().unwrap().iter().map(floats).collect()).collect();

    // base64: the same f32 bits, little-endian; multi rows one string each.
    let b64 = lines(&embed(&model, &input, &["--vector", "both", "--encoding", "base64"]));
    for (k, v) in b64.iter().enumerate() {
        let s = f32s(&base64_decode(v["embedding"].as_str().unwrap()).unwrap());
        assert_eq!(s, single[k], "line {k}");
        let rows = v["multi_vector"].as_array().unwrap();
        assert_eq!(rows.len(), multi[k].len());
        for (r, row) in rows.iter().enumerate() {
            assert_eq!(f32s(&base64_decode(row.as_str().unwrap()).unwrap()), multi[k][r]);
        }
    }

    // Quantised types from the float vectors: sign bits MSB first; binary = ubinary − 128;
    // int8 = trunc((x + 1) · 127.5 − 128).
    let ub = lines(&embed(&model, &input, &["--embedding-type", "ubinary"]));
    let bi = lines(&embed(&model, &input, &["--embedding-type", "binary"]));
    let i8s = lines(&embed(&model, &input, &["--embedding-type", "int8"]));
    for k in 0..2 {
        let want: Vec<i64> = single[k]
            .chunks(8)
            .map(|c| c.iter().enumerate().map(|(i, &x)| if x > 0.0 { 128 >> i } else { 0 }).sum())
            .collect();
        assert_eq!(ints(&ub[k]["embedding"]), want);
        assert_eq!(ints(&bi[k]["embedding"]), want.iter().map(|b| b - 128).collect::<Vec<_>>());
        let q = ints(&i8s[k]["embedding"]);
        for (x, q) in single[k].iter().zip(q) {
            let exact = (*x as f64 + 1.0) * 127.5 - 128.0;
            assert!((exact - q as f64).abs() < 1.0 && (-128..=127).contains(&q), "{x} → {q}");
        }
    }

    // .npy: the single vectors; .npz: data + offsets (+ single).
    let npy_path = dir.path().join("out.npy");
    let o = embed(&model, &input, &["--output", npy_path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let bytes = std::fs::read(&npy_path).unwrap();
    let (header, data) = npy(&bytes);
    let hid = single[0].len();
    assert!(header.contains("'<f4'") && header.contains(&format!("(2, {hid})")), "{header}");
    assert_eq!(f32s(data), single.concat());

    let npz_path = dir.path().join("out.npz");
    let o = embed(&model, &input, &["--vector", "both", "--output", npz_path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let members = unzip(&std::fs::read(&npz_path).unwrap());
    let names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["data.npy", "offsets.npy", "single.npy"]);
    let (h, d) = npy(&members[0].1);
    let rows = multi[0].len() + multi[1].len();
    assert!(h.contains(&format!("({rows}, 128)")), "{h}");
    assert_eq!(f32s(d), multi.concat().concat());
    let (h, d) = npy(&members[1].1);
    assert!(h.contains("'<i8'") && h.contains("(3,)"), "{h}");
    let offsets: Vec<i64> = d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(offsets, vec![0, multi[0].len() as i64, rows as i64]);
    assert_eq!(f32s(npy(&members[2].1).1), single.concat());

    let npz_bin = dir.path().join("bin.npz");
    let o = embed(
        &model,
        &input,
        &["--vector", "multi", "--embedding-type", "ubinary", "--output", npz_bin.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let members = unzip(&std::fs::read(&npz_bin).unwrap());
    let (h, d) = npy(&members[0].1);
    assert!(h.contains("'|u1'") && h.contains(&format!("({rows}, 16)")), "{h}");
    assert_eq!(d.len(), rows * 16);

    // Mixed widths in one .npy: an error, and no file.
    let mixed = dir.path().join("mixed.jsonl");
    std::fs::write(&mixed, "{\"text\": \"a\"}\n{\"text\": \"b\", \"dims\": 128}\n").unwrap();
    let bad = dir.path().join("mixed.npy");
    let o = embed(&model, &mixed, &["--output", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("row 1 has 128 values"), "{}", text(&o));
    assert!(!bad.exists());
    // Flags that do not fit the file.
    for (args, what) in [
        (vec!["--vector", "both", "--output", bad.to_str().unwrap()], ".npy holds single"),
        (vec!["--output", npz_path.to_str().unwrap()], ".npz holds multi"),
        (vec!["--encoding", "base64", "--output", bad.to_str().unwrap()], "base64"),
        (vec!["--embedding-type", "int4"], "unknown embedding type"),
    ] {
        let o = embed(&model, &input, &args);
        assert!(!o.status.success() && text(&o).contains(what), "{args:?}: {}", text(&o));
    }
}

#[test]
fn late_chunking_lines_come_back_with_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    assert!(jv4(&["synth", "--out", model.to_str().unwrap()]).status.success());
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        concat!(
            "{\"id\": 1, \"text\": \"One sentence. Another sentence.\", \"prompt_name\": \"passage\", ",
            "\"late_chunking\": {\"spans\": [[0, 13], [14, 31]]}}\n",
            "{\"id\": 2, \"text\": \"tokens in runs of three\", \"late_chunking\": {\"chunk_size\": 3}}\n",
            "{\"id\": 3, \"text\": \"bad\", \"late_chunking\": {\"chunk_size\": 0}}\n",
        ),
    )
    .unwrap();
    let o = embed(&model, &input, &["--vector", "both", "--dims", "128"]);
    assert_eq!(o.status.code(), Some(1), "one bad line\n{}", text(&o));
    let out: Vec<Value> = o
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let chunks = out[0]["chunks"].as_array().unwrap_or_else(|| panic!("{}", out[0]));
    assert_eq!(chunks.len(), 2);
    assert_eq!(ints(&chunks[0]["chars"]), [0, 13]);
    assert_eq!(ints(&chunks[1]["chars"]), [14, 31]);
    for c in chunks.iter().chain(out[1]["chunks"].as_array().unwrap()) {
        let e = floats(&c["embedding"]);
        assert_eq!(e.len(), 128);
        let norm: f64 = e.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{c}");
        let t = ints(&c["tokens"]);
        assert_eq!(c["multi_vector"].as_array().unwrap().len() as i64, t[1] - t[0]);
    }
    let runs = out[1]["chunks"].as_array().unwrap();
    assert!(
        runs.iter().all(|c| {
            let t = ints(&c["tokens"]);
            t[1] - t[0] <= 3
        }) && runs.len() >= 2
    );
    assert!(out[2]["error"].as_str().unwrap().contains("chunk_size"), "{}", out[2]);
    // A .npy cannot hold chunks: that line fails and nothing is written.
    let npy = dir.path().join("c.npy");
    let o = embed(&model, &input, &["--output", npy.to_str().unwrap()]);
    assert!(text(&o).contains("need a .jsonl output") && !npy.exists(), "{}", text(&o));
}

#[test]
fn long_late_chunking_lines_cover_the_whole_text() {
    // Over --max-length: overlapping macro-chunks (docs/MODEL.md §11); the chunks cover every token.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    assert!(jv4(&["synth", "--out", model.to_str().unwrap()]).status.success());
    let input = dir.path().join("in.jsonl");
    let body = "a long text in many words that one short forward cannot hold ".repeat(4);
    let line = serde_json::json!({"id": 1, "text": body, "late_chunking": {"chunk_size": 3}});
    std::fs::write(&input, format!("{line}\n")).unwrap();
    let o = embed(&model, &input, &["--max-length", "24", "--vector", "both"]);
    assert!(o.status.success() && !text(&o).contains("truncated"), "{}", text(&o));
    let out: Value = serde_json::from_slice(o.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let chunks = out["chunks"].as_array().unwrap_or_else(|| panic!("{out}"));
    let n = out["multi_vector"].as_array().unwrap().len() as i64;
    assert!(n > 48, "{n} tokens");
    let spans: Vec<Vec<i64>> = chunks.iter().map(|c| ints(&c["tokens"])).collect();
    assert!(spans.windows(2).all(|w| w[0][1] == w[1][0]) && spans.last().unwrap()[1] == n);
    assert_eq!(ints(&chunks.last().unwrap()["chars"])[1], body.len() as i64);
    for c in chunks {
        let norm: f64 = floats(&c["embedding"]).iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{c}");
    }
}
