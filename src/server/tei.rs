//! `POST /embed` and `POST /embed_all` in the text-embeddings-inference shape: `{"inputs": string
//! | [string] | token ids, "normalize"?, "prompt_name"?, "truncate"?}` (plus `"task"` and
//! `"dimensions"`, as on `/v1/embeddings`). `/embed` answers `[[f32]]` (one pooled vector per
//! input); `/embed_all` answers `[[[f32]]]` (per input, the multi-vector rows: one 128-wide,
//! L2-normalised row per token). Errors: `{"error", "error_type"}`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::openai::{dims, field, multi_json, parse_inputs, parse_task, request, vector_json, Encoding};
use super::{check_truncation, embed, json_response, read_body, ApiError, Shared, Style};
use crate::engine::output::EmbeddingType;
use crate::engine::{OutputKind, PromptName};
use crate::model::Task;

/// `POST /embed`.
pub(crate) async fn embed_single(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    respond(run(&sh, &headers, body, OutputKind::Single).await)
}

/// `POST /embed_all`.
pub(crate) async fn embed_all(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    respond(run(&sh, &headers, body, OutputKind::Multi).await)
}

fn respond(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(|e| e.into_response(Style::Tei))
}

async fn run(
    sh: &Arc<Shared>,
    headers: &HeaderMap,
    body: Body,
    output: OutputKind,
) -> Result<Response, ApiError> {
    let body = read_body(sh, headers, body).await?;
    if !body.is_object() {
        return Err(ApiError::bad("the body must be a JSON object"));
    }
    if field(&body, "normalize", "true or false", Value::as_bool)? == Some(false) {
        return Err(ApiError::bad(
            "\"normalize\": false is not supported: jina-embeddings-v4's vectors are always L2-normalised",
        ));
    }
    let (mut task, mut prompt) = (Task::Retrieval, PromptName::Query);
    if let Some(t) = field(&body, "task", "a string", Value::as_str)? {
        (task, prompt) = parse_task(t)?;
    }
    if let Some(p) = field(&body, "prompt_name", "a string", Value::as_str)? {
        prompt = p.parse().map_err(|_| {
            ApiError::bad(format!("\"prompt_name\" {p:?} is unknown: expected query or passage"))
        })?;
    }
    let dims = dims(&body, "dimensions", sh)?;
    let truncate = field(&body, "truncate", "true or false", Value::as_bool)?.unwrap_or(false);
    let items = parse_inputs(body.get("inputs"), "inputs", sh)?;
    let reqs = items.into_iter().map(|it| request(it, task, prompt, output, dims)).collect();
    let results = embed(sh, reqs).await?;
    check_truncation(sh, truncate, &results)?;
    let enc = Encoding { ty: EmbeddingType::Float, base64: false };
    let mut out = String::from("[");
    for (i, e) in results.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match (&e.single, &e.multi) {
            (_, Some(m)) if output.multi() => multi_json(m, enc, &mut out),
            (Some(v), _) => vector_json(v, enc, &mut out),
            _ => out.push_str("[]"),
        }
    }
    out.push(']');
    Ok(json_response(StatusCode::OK, out))
}
