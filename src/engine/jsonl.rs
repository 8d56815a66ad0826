//! The JSON-lines request format of `jv4 embed`: `{"text": ..., "id"?, "task"?, "prompt_name"?,
//! "dims"?}` per line. Parsing never fails as a whole: each line is a request or an error of its
//! own, so one bad line never takes down the rest of a file.

use serde_json::{json, Value};

use crate::engine::{OutputKind, PromptName, TextRequest};
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
}

/// One parsed input line: its id and request, or its id and what is wrong with it.
#[derive(Debug)]
pub enum Line {
    /// A request to embed.
    Ok(Value, TextRequest),
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
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return Line::Err(line_id, format!("line {n}: not valid UTF-8 ({e})")),
    };
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return Line::Err(line_id, format!("line {n}: not a JSON object: {e}")),
    };
    let id = v.get("id").cloned().unwrap_or(line_id);
    let Some(t) = v.get("text").and_then(Value::as_str) else {
        return Line::Err(id, format!("line {n}: no \"text\" string"));
    };
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
    Line::Ok(id, TextRequest { text: t.to_string(), task, prompt, output: d.output, dims })
}
