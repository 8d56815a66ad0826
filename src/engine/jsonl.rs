//! The JSON-lines request format of `jv4 embed`: `{"text": ..., "id"?, "task"?, "prompt_name"?,
//! "dims"?}` per line, or `{"image": "<path>" | "image_base64": "...", "id"?, "task"?, "dims"?,
//! "max_pixels"?}` for an image. A text may ask for late chunking with `"late_chunking":
//! {"chunk_size": N}` (chunks of N tokens) or `{"spans": [[start, end], ...]}` (byte ranges of the
//! text). Parsing never fails as a whole: each line is a request or an error of its
//! own, so one bad line never takes down the rest of a file.

use serde_json::{json, Value};

use crate::engine::{Chunking, Input, OutputKind, PromptName, Request};
use crate::model::Task;

/// Values for lines that do not set their own.
pub struct Defaults {
    /// Task of lines without "task".
    pub task: Task,
    /// Prompt of lines without "prompt_name".
    pub prompt: PromptName,
    /// Outputs of every line.
    pub output: OutputKind,
    /// Matryoshka width of lines without "dims".
    pub dims: Option<usize>,
    /// Size limits of a line and of its base64 string.
    pub limits: crate::engine::Limits,
}

/// One parsed input line: its id and request, or its id and what is wrong with it.
#[derive(Debug)]
pub enum Line {
    /// A request to embed.
    Ok(Value, Request),
    /// A line that cannot be served, with the message for its output line.
    Err(Value, String),
}

/// Parses input line `n` (1-based; its number is the id when the line has none). Never fails:
/// a bad line becomes [`Line::Err`] so that the other lines are still served.
pub fn parse_line(n: usize, raw: std::io::Result<Vec<u8>>, d: &Defaults) -> Line {
    let line_id = json!(n);
    let bytes = match raw {
        Ok(b) => b,
        Err(e) => return Line::Err(line_id, format!("line {n}: read error: {e}")),
    };
    if bytes.len() > d.limits.max_line_bytes {
        let max = d.limits.max_line_bytes;
        return Line::Err(
            line_id,
            format!("line {n}: longer than the limit of {max} bytes (max_line_bytes)"),
        );
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return Line::Err(line_id, format!("line {n}: not valid UTF-8 ({e})")),
    };
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return Line::Err(line_id, format!("line {n}: not a JSON object: {e}")),
    };
    let id = v.get("id").cloned().unwrap_or(line_id.clone());
    if let Value::Number(num) = &id {
        // serde_json holds numbers as u64, i64 or f64: an id it would print differently (past
        // 64-bit integers, or a float not in shortest form such as `1.50` or `1e3`) is refused
        // rather than echoed changed, since the host matches results by it.
        let raw = top_level_raw(&text, "id");
        if raw.is_some_and(|r| r != num.to_string()) {
            return Line::Err(
                line_id,
                format!(
                    "line {n}: numeric id {} cannot be echoed exactly (it is not a 64-bit integer or \
                     a float in shortest form); send it as a string",
                    raw.unwrap_or_default()
                ),
            );
        }
    }
    let image = match (v.get("image"), v.get("image_base64")) {
        (None, None) => None,
        (Some(p), None) => match p.as_str() {
            Some(p) => Some(Input::ImagePath(p.into())),
            None => return Line::Err(id, format!("line {n}: \"image\" must be a file path")),
        },
        (None, Some(b)) => match b.as_str().map(|s| d.limits.check_base64(s).and_then(|()| base64_decode(s)))
        {
            Some(Ok(bytes)) => Some(Input::ImageBytes(bytes)),
            Some(Err(e)) => return Line::Err(id, format!("line {n}: image_base64: {e}")),
            None => return Line::Err(id, format!("line {n}: \"image_base64\" must be a string")),
        },
        (Some(_), Some(_)) => {
            return Line::Err(id, format!("line {n}: give \"image\" or \"image_base64\", not both"))
        }
    };
    let text = v.get("text").and_then(Value::as_str);
    let chunking = match v.get("late_chunking").map(parse_chunking) {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(c))) => Some(c),
        Some(Err(e)) => return Line::Err(id, format!("line {n}: late_chunking: {e}")),
    };
    if chunking.is_some() && image.is_some() {
        return Line::Err(id, format!("line {n}: late_chunking applies to texts only"));
    }
    if image.is_none() && text.is_none() {
        return Line::Err(id, format!("line {n}: no \"text\" string (or \"image\" / \"image_base64\")"));
    }
    let task = match v.get("task").and_then(Value::as_str).map(str::parse::<Task>) {
        None => d.task,
        Some(Ok(t)) => t,
        Some(Err(e)) => return Line::Err(id, format!("line {n}: {e}")),
    };
    let prompt = match v.get("prompt_name").and_then(Value::as_str).map(str::parse::<PromptName>) {
        None => d.prompt,
        Some(Ok(p)) => p,
        Some(Err(e)) => return Line::Err(id, format!("line {n}: {e}")),
    };
    let dims = match v.get("dims") {
        None => d.dims,
        Some(x) => match x.as_u64() {
            Some(v) => Some(v as usize),
            None => return Line::Err(id, format!("line {n}: dims must be a number")),
        },
    };
    if let Some(input) = image {
        let max_pixels = match v.get("max_pixels") {
            None => None,
            Some(x) => match x.as_u64() {
                Some(m) => Some(m as usize),
                None => return Line::Err(id, format!("line {n}: max_pixels must be a number")),
            },
        };
        return Line::Ok(
            id,
            Request { input, task, prompt, output: d.output, dims, max_pixels, chunking: None },
        );
    }
    let t = text.unwrap_or_default();
    Line::Ok(
        id,
        Request {
            input: Input::Text(t.to_string()),
            task,
            prompt,
            output: d.output,
            dims,
            max_pixels: None,
            chunking,
        },
    )
}

/// `{"chunk_size": N}` or `{"spans": [[s, e], ...]}` (`null`: none). The values are checked
/// against the text when the request is prepared (a chunk size of 0, spans outside the text…).
fn parse_chunking(v: &Value) -> Result<Option<Chunking>, String> {
    if v.is_null() {
        return Ok(None);
    }
    let o = v.as_object().ok_or("must be an object {\"chunk_size\": N} or {\"spans\": [[s, e], ...]}")?;
    match (o.get("chunk_size"), o.get("spans")) {
        (Some(n), None) => n
            .as_u64()
            .map(|n| Some(Chunking::Tokens(n as usize)))
            .ok_or_else(|| "chunk_size must be a number".into()),
        (None, Some(spans)) => {
            let bad = || "spans must be a list of [start, end] byte offsets".to_string();
            let list = spans.as_array().ok_or_else(bad)?;
            let mut out = Vec::with_capacity(list.len());
            for s in list {
                match s.as_array().map(Vec::as_slice) {
                    Some([a, b]) => match (a.as_u64(), b.as_u64()) {
                        (Some(a), Some(b)) => out.push((a as usize, b as usize)),
                        _ => return Err(bad()),
                    },
                    _ => return Err(bad()),
                }
            }
            Ok(Some(Chunking::Spans(out)))
        }
        (Some(_), Some(_)) => Err("give \"chunk_size\" or \"spans\", not both".into()),
        (None, None) => Err("needs \"chunk_size\" or \"spans\"".into()),
    }
}

/// The raw text of the value of top-level key `key` in a JSON object that is known to parse (the
/// last one when the key repeats, as serde_json keeps), or `None`.
fn top_level_raw<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let b = text.as_bytes();
    let ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    // The end of the string starting at the quote `i`.
    let string_end = |mut i: usize| {
        i += 1;
        while i < b.len() && b[i] != b'"' {
            i += if b[i] == b'\\' { 2 } else { 1 };
        }
        i + 1
    };
    let mut i = ws(0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    let mut found = None;
    i += 1;
    loop {
        i = ws(i);
        if b.get(i) != Some(&b'"') {
            return found;
        }
        let k_end = string_end(i);
        let k: Option<String> = serde_json::from_str(text.get(i..k_end)?).ok();
        i = ws(k_end);
        if b.get(i) != Some(&b':') {
            return found;
        }
        let v_start = ws(i + 1);
        let mut j = v_start;
        let mut depth = 0usize;
        while j < b.len() {
            match b[j] {
                b'"' => {
                    j = string_end(j);
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth > 0 => depth -= 1,
                b',' | b'}' if depth == 0 => break,
                _ => {}
            }
            j += 1;
        }
        if k.as_deref() == Some(key) {
            found = Some(text.get(v_start..j)?.trim_end());
        }
        if b.get(j) != Some(&b',') {
            return found;
        }
        i = j + 1;
    }
}

/// Standard base64 (RFC 4648, `+/`, optional `=` padding, whitespace ignored).
pub fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    let mut padding = 0;
    for (i, c) in s.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => {
                padding += 1;
                continue;
            }
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return Err(format!("not base64: byte {c:#04x} at {i}")),
        };
        if padding > 0 {
            return Err(format!("not base64: data after '=' at {i}"));
        }
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if bits >= 6 || padding > 2 {
        return Err("not base64: truncated".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Line {
        let d = Defaults {
            task: Task::Retrieval,
            prompt: PromptName::Query,
            output: OutputKind::Single,
            dims: None,
            limits: Default::default(),
        };
        parse_line(1, Ok(line.as_bytes().to_vec()), &d)
    }

    #[test]
    fn late_chunking_fields_parse_and_bad_ones_are_line_errors() {
        match parse(r#"{"text": "abc", "late_chunking": {"chunk_size": 2}}"#) {
            Line::Ok(_, r) => assert_eq!(r.chunking, Some(Chunking::Tokens(2))),
            l => panic!("{l:?}"),
        }
        match parse(r#"{"text": "abcdef", "late_chunking": {"spans": [[0, 2], [3, 6]]}}"#) {
            Line::Ok(_, r) => assert_eq!(r.chunking, Some(Chunking::Spans(vec![(0, 2), (3, 6)]))),
            l => panic!("{l:?}"),
        }
        match parse(r#"{"text": "abc", "late_chunking": null}"#) {
            Line::Ok(_, r) => assert_eq!(r.chunking, None),
            l => panic!("{l:?}"),
        }
        for (line, what) in [
            (r#"{"text": "a", "late_chunking": 3}"#, "must be an object"),
            (r#"{"text": "a", "late_chunking": {}}"#, "needs"),
            (r#"{"text": "a", "late_chunking": {"chunk_size": -1}}"#, "chunk_size must be a number"),
            (r#"{"text": "a", "late_chunking": {"spans": [[0]]}}"#, "spans must be"),
            (r#"{"text": "a", "late_chunking": {"spans": [[0, 1]], "chunk_size": 1}}"#, "not both"),
            (r#"{"image": "x.png", "late_chunking": {"chunk_size": 1}}"#, "texts only"),
        ] {
            match parse(line) {
                Line::Err(_, msg) => assert!(msg.contains(what), "{line}: {msg}"),
                l => panic!("{line}: {l:?}"),
            }
        }
    }

    #[test]
    fn raw_top_level_values_are_found() {
        let t = r#"{"text": "a,\"id\": 1}", "x": {"id": [1, {"id": 2}]}, "id" : 1.50 , "y": 3}"#;
        assert_eq!(top_level_raw(t, "id"), Some("1.50"));
        assert_eq!(top_level_raw(r#"{"id":7}"#, "id"), Some("7"));
        assert_eq!(top_level_raw(r#"{"\u0069d":-0}"#, "id"), Some("-0"));
        assert_eq!(top_level_raw(r#"{"id":1,"id":2}"#, "id"), Some("2"));
        assert_eq!(top_level_raw(r#"{"text":"x"}"#, "id"), None);
    }

    #[test]
    fn base64_round_trips_and_rejects_junk() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVs\nbG8h").unwrap(), b"hello!");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("aGV*bG8=").is_err());
        assert!(base64_decode("a").is_err());
    }
}
