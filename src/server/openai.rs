//! `POST /v1/embeddings`: the OpenAI embeddings API, with the jina API's extensions on the same
//! route (docs/SERVER.md lists every field).
//!
//! `input` is a string, a list of strings, a list of token ids, a list of lists of token ids, or a
//! list mixing strings, token-id lists, `{"text": ...}` and `{"image": "<base64 or data URL>"}`.
//! The answer is `{"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
//! "model", "usage": {"prompt_tokens", "total_tokens"}}`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::{check_truncation, embed, json_response, read_body, ApiError, Shared, Style};
use crate::engine::jsonl::base64_decode;
use crate::engine::output::{base64_encode, quantize, EmbeddingType, Quantized};
use crate::engine::{Chunking, Limits, MultiVector, OutputKind, PromptName, Request};
use crate::model::Task;

/// The task names of the route: `task` picks the adapter and the prompt.
pub(crate) const TASKS: [(&str, Task, PromptName); 5] = [
    ("retrieval.query", Task::Retrieval, PromptName::Query),
    ("retrieval.passage", Task::Retrieval, PromptName::Passage),
    ("text-matching", Task::TextMatching, PromptName::Query),
    ("code.query", Task::Code, PromptName::Query),
    ("code.passage", Task::Code, PromptName::Passage),
];

/// The adapter and prompt of a task name (also the engine's plain names, with the query prompt).
pub(crate) fn parse_task(s: &str) -> Result<(Task, PromptName), ApiError> {
    if let Some(&(_, t, p)) = TASKS.iter().find(|(n, _, _)| *n == s) {
        return Ok((t, p));
    }
    match s.parse::<Task>() {
        Ok(t) => Ok((t, PromptName::Query)),
        Err(_) => Err(ApiError::bad(format!(
            "task {s:?} is unknown: expected one of retrieval.query, retrieval.passage, text-matching, \
             code.query, code.passage"
        ))),
    }
}

/// One input as sent.
#[derive(Clone, Debug)]
pub(crate) enum Item {
    Text(String),
    Tokens(Vec<u32>),
    Image(Vec<u8>),
}

/// The items of `field` (see the module documentation), within the per-request caps.
pub(crate) fn parse_inputs(v: Option<&Value>, field: &str, sh: &Shared) -> Result<Vec<Item>, ApiError> {
    let limits = sh.engine.limits();
    let v = v.ok_or_else(|| ApiError::bad(format!("missing \"{field}\"")))?;
    let items = match v {
        Value::String(s) => vec![text(s, field, limits)?],
        Value::Array(a) if a.is_empty() => return Err(ApiError::bad(format!("\"{field}\" is an empty list"))),
        Value::Array(a) if a.iter().all(Value::is_number) => vec![Item::Tokens(token_ids(a, field)?)],
        Value::Array(a) => {
            if a.len() > sh.opts.max_inputs {
                return Err(ApiError::too_large(format!(
                    "{} inputs, over the limit of {} per request (max_inputs)",
                    a.len(),
                    sh.opts.max_inputs
                )));
            }
            a.iter()
                .enumerate()
                .map(|(i, x)| item(x, &format!("{field}[{i}]"), limits))
                .collect::<Result<Vec<_>, _>>()?
        }
        _ => {
            return Err(ApiError::bad(format!(
                "\"{field}\" must be a string, a list of strings, a list of token ids or a list of lists of token ids"
            )))
        }
    };
    Ok(items)
}

fn item(x: &Value, at: &str, limits: &Limits) -> Result<Item, ApiError> {
    match x {
        Value::String(s) => text(s, at, limits),
        Value::Array(ids) => Ok(Item::Tokens(token_ids(ids, at)?)),
        Value::Object(o) => match (o.get("text"), o.get("image")) {
            (Some(Value::String(s)), None) => text(s, &format!("{at}.text"), limits),
            (None, Some(Value::String(s))) => image(s, &format!("{at}.image"), limits),
            (Some(_), Some(_)) => Err(ApiError::bad(format!("{at}: give \"text\" or \"image\", not both"))),
            (Some(_), None) => Err(ApiError::bad(format!("{at}.text must be a string"))),
            (None, Some(_)) => {
                Err(ApiError::bad(format!("{at}.image must be a base64 string or a data URL")))
            }
            (None, None) => Err(ApiError::bad(format!("{at}: an object input needs \"text\" or \"image\""))),
        },
        _ => Err(ApiError::bad(format!(
            "{at}: expected a string, a list of token ids, {{\"text\": ...}} or {{\"image\": ...}}"
        ))),
    }
}

fn text(s: &str, at: &str, limits: &Limits) -> Result<Item, ApiError> {
    if s.len() > limits.max_text_bytes {
        return Err(ApiError::too_large(format!(
            "{at}: text of {} bytes is over the limit of {} bytes (max_text_bytes)",
            s.len(),
            limits.max_text_bytes
        )));
    }
    Ok(Item::Text(s.to_string()))
}

fn token_ids(a: &[Value], at: &str) -> Result<Vec<u32>, ApiError> {
    if a.is_empty() {
        return Err(ApiError::bad(format!("{at}: an empty list of token ids")));
    }
    a.iter()
        .enumerate()
        .map(|(j, x)| {
            x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                ApiError::bad(format!("{at}[{j}]: token ids are integers from 0 to 4294967295, got {x}"))
            })
        })
        .collect()
}

fn image(s: &str, at: &str, limits: &Limits) -> Result<Item, ApiError> {
    if s.starts_with("http://") || s.starts_with("https://") {
        return Err(ApiError::bad(format!(
            "{at}: image URLs are not fetched by jv4 serve; send the image's bytes as base64 or a data URL"
        )));
    }
    let b64 = match s.strip_prefix("data:") {
        Some(rest) => match rest.split_once(";base64,") {
            Some((_, b)) => b,
            None => return Err(ApiError::bad(format!("{at}: a data URL must be data:<type>;base64,<data>"))),
        },
        None => s,
    };
    limits.check_base64(b64).map_err(|e| ApiError::too_large(format!("{at}: {e}")))?;
    let bytes = base64_decode(b64).map_err(|e| ApiError::bad(format!("{at}: not base64: {e}")))?;
    limits.check_image_bytes(&bytes).map_err(|e| ApiError::too_large(format!("{at}: {e}")))?;
    Ok(Item::Image(bytes))
}

/// The engine request of an item.
pub(crate) fn request(
    item: Item,
    task: Task,
    prompt: PromptName,
    output: OutputKind,
    dims: Option<usize>,
) -> Request {
    let r = match item {
        Item::Text(s) => Request::text(s),
        Item::Tokens(ids) => Request::tokens(ids),
        Item::Image(b) => Request::image_bytes(b),
    };
    let r = r.task(task).prompt(prompt).output(output);
    match dims {
        Some(d) => r.dims(d),
        None => r,
    }
}

/// An optional field of a type, or a 400 naming it.
pub(crate) fn field<'a, T>(
    body: &'a Value,
    name: &str,
    what: &str,
    get: impl Fn(&'a Value) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            get(v).map(Some).ok_or_else(|| ApiError::bad(format!("\"{name}\" must be {what}, got {v}")))
        }
    }
}

/// The Matryoshka width asked for (`None`: full width), checked against the model's sizes.
pub(crate) fn dims(body: &Value, name: &str, sh: &Shared) -> Result<Option<usize>, ApiError> {
    let Some(d) = field(body, name, "a positive integer", Value::as_u64)? else {
        return Ok(None);
    };
    let cfg = sh.engine.config();
    if d as usize == cfg.text.hidden_size {
        return Ok(None);
    }
    if !cfg.matryoshka_dims.contains(&(d as usize)) {
        return Err(ApiError::bad(format!(
            "\"{name}\" {d} is not one of the model's Matryoshka sizes {:?}",
            cfg.matryoshka_dims
        )));
    }
    Ok(Some(d as usize))
}

/// How vectors are written: the element type and whether as base64.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Encoding {
    pub ty: EmbeddingType,
    pub base64: bool,
}

/// One vector's JSON: an array of numbers, or with base64 one string of its little-endian bytes.
pub(crate) fn vector_json(v: &[f32], enc: Encoding, out: &mut String) {
    let q = quantize(v, enc.ty);
    if enc.base64 {
        out.push('"');
        out.push_str(&base64_encode(&q.to_le_bytes()));
        out.push('"');
        return;
    }
    let s = match &q {
        Quantized::F32(x) => serde_json::to_string(x),
        Quantized::I8(x) => serde_json::to_string(x),
        Quantized::U8(x) => serde_json::to_string(x),
    };
    out.push_str(&s.expect("numbers serialize"));
}

/// A multi-vector's JSON: an array of rows, or with base64 one string of all rows' bytes (row
/// after row; a row is `width` values of the type).
pub(crate) fn multi_json(m: &MultiVector, enc: Encoding, out: &mut String) {
    if enc.base64 {
        let bytes: Vec<u8> = (0..m.rows()).flat_map(|r| quantize(m.row(r), enc.ty).to_le_bytes()).collect();
        out.push('"');
        out.push_str(&base64_encode(&bytes));
        out.push('"');
        return;
    }
    out.push('[');
    for r in 0..m.rows() {
        if r > 0 {
            out.push(',');
        }
        vector_json(m.row(r), enc, out);
    }
    out.push(']');
}

/// The handler.
pub(crate) async fn embeddings(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    match run(&sh, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(Style::OpenAi),
    }
}

async fn run(sh: &Arc<Shared>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let body = read_body(sh, headers, body).await?;
    if !body.is_object() {
        return Err(ApiError::bad("the body must be a JSON object"));
    }
    let model =
        field(&body, "model", "a string", Value::as_str)?.unwrap_or(&sh.opts.served_model_name).to_string();
    let (task, prompt) = match field(&body, "task", "a string", Value::as_str)? {
        Some(t) => parse_task(t)?,
        None => (Task::Retrieval, PromptName::Query),
    };
    let dims = dims(&body, "dimensions", sh)?;
    let base64 = match field(&body, "encoding_format", "a string", Value::as_str)? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(ApiError::bad(format!(
                "\"encoding_format\" {f:?} is unknown: expected float or base64"
            )))
        }
    };
    let enc = match field(&body, "embedding_type", "a string", Value::as_str)? {
        None | Some("float") => Encoding { ty: EmbeddingType::Float, base64 },
        Some("base64") => Encoding { ty: EmbeddingType::Float, base64: true },
        Some(t @ ("binary" | "ubinary")) => Encoding { ty: t.parse().expect("a known type"), base64 },
        Some(t) => {
            return Err(ApiError::bad(format!(
                "\"embedding_type\" {t:?} is unknown: expected float, base64, binary or ubinary"
            )))
        }
    };
    let multi = field(&body, "return_multivector", "true or false", Value::as_bool)?.unwrap_or(false);
    let late = field(&body, "late_chunking", "true or false", Value::as_bool)?.unwrap_or(false);
    let truncate = field(&body, "truncate", "true or false", Value::as_bool)?.unwrap_or(false);
    let output = if multi { OutputKind::Multi } else { OutputKind::Single };
    let items = parse_inputs(body.get("input"), "input", sh)?;
    let n = items.len();

    let reqs: Vec<Request> = if late {
        // One forward over the inputs joined by single spaces; each input is a chunk of it.
        let mut joined = String::new();
        let mut spans = Vec::with_capacity(n);
        for (i, it) in items.into_iter().enumerate() {
            let Item::Text(s) = it else {
                return Err(ApiError::bad(format!("input[{i}]: late_chunking takes texts only")));
            };
            if i > 0 {
                joined.push(' ');
            }
            spans.push((joined.len(), joined.len() + s.len()));
            joined.push_str(&s);
        }
        let limits = sh.engine.limits();
        if joined.len() > limits.max_text_bytes {
            return Err(ApiError::too_large(format!(
                "the joined late-chunking text of {} bytes is over the limit of {} bytes (max_text_bytes)",
                joined.len(),
                limits.max_text_bytes
            )));
        }
        vec![request(Item::Text(joined), task, prompt, output, dims).late_chunking(Chunking::Spans(spans))]
    } else {
        items.into_iter().map(|it| request(it, task, prompt, output, dims)).collect()
    };
    let results = embed(sh, reqs).await?;
    check_truncation(sh, truncate, &results)?;
    let tokens: usize = results.iter().map(|e| e.tokens).sum();
    let mut out = String::with_capacity(64 + n * 16);
    out.push_str(r#"{"object":"list","data":["#);
    let mut k = 0usize;
    let mut push = |single: Option<&Vec<f32>>, m: Option<&MultiVector>, out: &mut String| {
        if k > 0 {
            out.push(',');
        }
        out.push_str(&format!(r#"{{"object":"embedding","index":{k},"embedding":"#));
        match (m, single) {
            (Some(m), _) => multi_json(m, enc, out),
            (None, Some(v)) => vector_json(v, enc, out),
            (None, None) => out.push_str("[]"),
        }
        out.push('}');
        k += 1;
    };
    for e in &results {
        match &e.chunks {
            Some(chunks) => {
                for c in chunks {
                    push(c.single.as_ref(), c.multi.as_ref(), &mut out);
                }
            }
            None => push(e.single.as_ref(), e.multi.as_ref(), &mut out),
        }
    }
    out.push_str(&format!(
        r#"],"model":{},"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}"#,
        Value::from(model)
    ));
    Ok(json_response(StatusCode::OK, out))
}
