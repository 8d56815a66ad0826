//! `jv4._jv4`: the native half of the `jv4` Python package. It turns Python inputs into
//! [`jv4::Request`]s, runs [`jv4::Engine::embed`] with the GIL released, and hands the results
//! back as `bytearray`s that the Python half views as NumPy arrays without a further copy
//! (`numpy.frombuffer`). Keeping NumPy out of the native module keeps the wheel on the stable ABI
//! and independent of the NumPy version installed.
//!
//! Errors are raised as the classes of `jv4._errors` (one per [`jv4::Error`] kind); per-input
//! failures come back as exception instances beside their index, so that one bad input never
//! costs the rest of a batch.

use std::path::PathBuf;
use std::time::Duration;

use jv4::{
    Chunking, Device, DeviceState, Embedding, Engine, EngineOptions, Error, OutputKind, PromptName, Request,
    Task,
};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString};

/// The `jv4._errors` class for an engine error.
fn error_class(e: &Error) -> &'static str {
    match e {
        Error::Input(_) => "InputError",
        Error::Tokenizer(_) => "TokenizerError",
        Error::Io { .. } => "IoError",
        Error::Config { .. } | Error::Checkpoint { .. } | Error::Tensor { .. } => "ModelError",
        Error::OutOfMemory { .. } => "OutOfMemoryError",
        Error::NoGpu(_) => "NoGpuError",
        Error::Cuda { .. } | Error::Kernel { .. } | Error::Blas(_) | Error::DeviceLost(_) => "DeviceError",
        Error::NonFinite(_) => "NonFiniteError",
        _ => "InternalError",
    }
}

/// An instance of `jv4._errors.<class>` with this message.
fn exception(py: Python<'_>, class: &str, msg: String) -> PyResult<Py<PyAny>> {
    let cls = py.import("jv4._errors")?.getattr(class)?;
    Ok(cls.call1((msg,))?.unbind())
}

/// `jv4._errors.<class>(msg)` as an error to raise.
fn raised(py: Python<'_>, class: &str, msg: String) -> PyErr {
    match exception(py, class, msg) {
        Ok(obj) => PyErr::from_value(obj.into_bound(py)),
        Err(import_failed) => import_failed,
    }
}

/// The Python exception for an engine error.
fn to_py(py: Python<'_>, e: &Error) -> PyErr {
    match exception(py, error_class(e), e.to_string()) {
        Ok(obj) => PyErr::from_value(obj.into_bound(py)),
        Err(import_failed) => import_failed,
    }
}

fn input_error(py: Python<'_>, msg: String) -> PyErr {
    to_py(py, &Error::Input(msg))
}

/// The option strings that apply to a whole call.
fn parse<T: std::str::FromStr<Err = Error>>(py: Python<'_>, s: &str) -> PyResult<T> {
    s.parse().map_err(|e| to_py(py, &e))
}

/// A `bytearray` of `len` bytes filled by `fill` (the one copy out of the engine's vectors).
fn bytearray<'py>(
    py: Python<'py>,
    len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> PyResult<Bound<'py, PyByteArray>> {
    PyByteArray::new_with(py, len, |buf| {
        fill(buf);
        Ok(())
    })
}

/// Native-endian f32 rows into a `bytearray`; a `None` row becomes `width` NaNs (a failed input).
fn f32_rows<'py, 'a>(
    py: Python<'py>,
    rows: impl Iterator<Item = Option<&'a [f32]>> + Clone,
    width: usize,
) -> PyResult<Bound<'py, PyByteArray>> {
    let n: usize = rows.clone().map(|r| r.map_or(width, <[f32]>::len)).sum();
    bytearray(py, n * 4, |buf| {
        let mut at = 0;
        let mut put = |x: f32| {
            buf[at..at + 4].copy_from_slice(&x.to_ne_bytes());
            at += 4;
        };
        for r in rows {
            match r {
                Some(r) => r.iter().for_each(|&x| put(x)),
                None => (0..width).for_each(|_| put(f32::NAN)),
            }
        }
    })
}

/// Native-endian i64 values into a `bytearray`.
fn i64s<'py>(py: Python<'py>, v: &[i64]) -> PyResult<Bound<'py, PyByteArray>> {
    bytearray(py, v.len() * 8, |buf| {
        for (dst, x) in buf.chunks_exact_mut(8).zip(v) {
            dst.copy_from_slice(&x.to_ne_bytes());
        }
    })
}

/// `[0, n0, n0+n1, ...]`.
fn offsets(counts: impl Iterator<Item = usize>) -> Vec<i64> {
    let mut v = vec![0i64];
    for c in counts {
        v.push(v.last().unwrap() + c as i64);
    }
    v
}

/// Byte offset of character `i` of `s` (`i` = the length: the end), or `None` past the end.
fn char_to_byte(s: &str, i: usize) -> Option<usize> {
    s.char_indices().map(|(b, _)| b).chain(std::iter::once(s.len())).nth(i)
}

/// Character index of byte offset `b` of `s` (characters that start before it).
fn byte_to_char(s: &str, b: usize) -> usize {
    s.char_indices().take_while(|&(i, _)| i < b).count()
}

/// Late chunking as given from Python: a chunk size for every text, or per text a list of
/// `(start, end)` character spans (or `None`: no chunking for that text).
enum ChunkArg {
    Size(usize),
    Spans(Vec<Option<Vec<(usize, usize)>>>),
}

fn chunk_arg(py: Python<'_>, arg: &Bound<'_, PyAny>, n: usize) -> PyResult<ChunkArg> {
    if let Ok(k) = arg.extract::<i64>() {
        return match usize::try_from(k) {
            Ok(k) => Ok(ChunkArg::Size(k)),
            Err(_) => Err(input_error(py, format!("late_chunking={k}: a chunk size must not be negative"))),
        };
    }
    let per_text: Vec<Bound<'_, PyAny>> = arg.extract().map_err(|_| {
        input_error(py, "late_chunking must be a chunk size in tokens (int) or, per text, a list of (start, end) character spans".into())
    })?;
    if per_text.len() != n {
        return Err(input_error(
            py,
            format!("late_chunking has {} span lists for {n} texts: give one per text", per_text.len()),
        ));
    }
    let mut out = Vec::with_capacity(n);
    for (i, s) in per_text.iter().enumerate() {
        if s.is_none() {
            out.push(None);
            continue;
        }
        let spans: Vec<(i64, i64)> = s.extract().map_err(|_| {
            input_error(py, format!("late_chunking[{i}] must be a list of (start, end) integer pairs"))
        })?;
        let mut v = Vec::with_capacity(spans.len());
        for (a, b) in spans {
            match (usize::try_from(a), usize::try_from(b)) {
                (Ok(a), Ok(b)) => v.push((a, b)),
                _ => return Err(input_error(py, format!("late_chunking[{i}]: span ({a}, {b}) is negative"))),
            }
        }
        out.push(Some(v));
    }
    Ok(ChunkArg::Spans(out))
}

/// `device=` as given from Python: one device (`"cpu"`, `"cuda"`, `"cuda:N"`, or `"all"`: every
/// GPU), or a list of them (one worker and one copy of the model each). Kinds and duplicates are
/// checked by the engine.
fn device_list(py: Python<'_>, arg: &Bound<'_, PyAny>) -> PyResult<Vec<Device>> {
    if let Ok(s) = arg.cast::<PyString>() {
        let s = s.to_cow()?;
        if s.trim() == "all" {
            return Device::parse_list("all").map_err(|e| to_py(py, &e));
        }
        return Ok(vec![parse(py, &s)?]);
    }
    let items: Vec<Bound<'_, PyAny>> = match arg.extract() {
        Ok(v) if !arg.is_instance_of::<PyBytes>() => v,
        _ => {
            return Err(raised(
                py,
                "InputTypeError",
                format!(
                    "device has type {}: expected a str such as \"cuda:0\" or a list of them",
                    type_name(arg)
                ),
            ))
        }
    };
    if items.is_empty() {
        return Err(input_error(
            py,
            "device=[] lists no device: give at least one, e.g. [\"cuda:0\"]".into(),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, d)| match d.cast::<PyString>() {
            Ok(s) => s.to_cow()?.parse().map_err(|e: Error| {
                let why = match e {
                    Error::Input(m) => m,
                    e => e.to_string(),
                };
                input_error(py, format!("device[{i}]: {why}"))
            }),
            Err(_) => Err(raised(
                py,
                "InputTypeError",
                format!("device[{i}] has type {}, expected str (\"cpu\" or \"cuda:N\")", type_name(d)),
            )),
        })
        .collect()
}

/// One input after conversion: a request, or why it cannot be one.
type Converted = Result<Request, (&'static str, String)>;

/// What `embed` was asked for, applied to each request.
struct Opts {
    task: Task,
    prompt: PromptName,
    output: OutputKind,
    dims: Option<usize>,
    max_pixels: Option<usize>,
}

impl Opts {
    fn apply(&self, mut r: Request) -> Request {
        r = r.task(self.task).prompt(self.prompt).output(self.output);
        if let Some(d) = self.dims {
            r = r.dims(d);
        }
        if let Some(m) = self.max_pixels.filter(|_| r.is_image()) {
            r = r.max_pixels(m);
        }
        r
    }
}

fn type_name(x: &Bound<'_, PyAny>) -> String {
    x.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

fn text_request(i: usize, x: &Bound<'_, PyAny>, chunks: Option<&ChunkArg>) -> Converted {
    let s = x
        .cast::<PyString>()
        .map_err(|_| ("InputTypeError", format!("texts[{i}] has type {}, expected str", type_name(x))))?;
    let text: String = s
        .to_cow()
        .map_err(|e| ("InputError", format!("texts[{i}] is not valid UTF-8 (lone surrogate?): {e}")))?
        .into_owned();
    let chunking = match chunks {
        None => None,
        Some(ChunkArg::Size(k)) => Some(Chunking::Tokens(*k)),
        Some(ChunkArg::Spans(per_text)) => match &per_text[i] {
            None => None,
            Some(spans) => {
                let mut bytes = Vec::with_capacity(spans.len());
                let n_chars = text.chars().count();
                for &(a, b) in spans {
                    match (char_to_byte(&text, a), char_to_byte(&text, b)) {
                        (Some(a), Some(b)) => bytes.push((a, b)),
                        _ => {
                            return Err((
                                "InputError",
                                format!("late_chunking[{i}]: span ({a}, {b}) is outside the text ({n_chars} characters)"),
                            ))
                        }
                    }
                }
                Some(Chunking::Spans(bytes))
            }
        },
    };
    let r = Request::text(text);
    Ok(match chunking {
        Some(c) => r.late_chunking(c),
        None => r,
    })
}

fn image_request(i: usize, x: &Bound<'_, PyAny>) -> Converted {
    if let Ok(b) = x.cast::<PyBytes>() {
        return Ok(Request::image_bytes(b.as_bytes()));
    }
    if let Ok(b) = x.cast::<PyByteArray>() {
        return Ok(Request::image_bytes(b.to_vec()));
    }
    if let Ok(s) = x.cast::<PyString>() {
        let p =
            s.to_cow().map_err(|e| ("InputError", format!("images[{i}]: path is not valid UTF-8: {e}")))?;
        return Ok(Request::image_path(p.into_owned()));
    }
    Err((
        "InputTypeError",
        format!("images[{i}] has type {}, expected a file path, bytes or a PIL image", type_name(x)),
    ))
}

/// A model on a device (see `jv4.Engine`, the Python class that wraps it).
#[pyclass(frozen, module = "jv4._jv4", name = "Engine")]
struct PyEngine {
    engine: Engine,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (
        model_dir, device = None, *, max_batch_tokens = 16384, max_batch_patches = 16384,
        mem_budget = None, max_length = None, strict = false, preprocess_threads = None,
        batch_wait_ms = 0, tokenizer = None, late_chunk_overlap = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model_dir: PathBuf,
        device: Option<&Bound<'_, PyAny>>,
        max_batch_tokens: usize,
        max_batch_patches: usize,
        mem_budget: Option<&Bound<'_, PyAny>>,
        max_length: Option<usize>,
        strict: bool,
        preprocess_threads: Option<usize>,
        batch_wait_ms: u64,
        tokenizer: Option<PathBuf>,
        late_chunk_overlap: Option<usize>,
    ) -> PyResult<Self> {
        let devices = match device {
            Some(d) => device_list(py, d)?,
            None => vec![Device::Cuda(0)],
        };
        let mem_budget = match mem_budget {
            None => None,
            Some(m) => match m.extract::<u64>() {
                Ok(b) => Some(b),
                Err(_) => {
                    let s: String = m.extract().map_err(|_| {
                        input_error(
                            py,
                            "mem_budget must be a number of bytes or a size such as \"20GiB\"".into(),
                        )
                    })?;
                    Some(jv4::parse_bytes(&s).map_err(|e| to_py(py, &e))?)
                }
            },
        };
        let mut opts = EngineOptions {
            device: devices[0],
            devices: if devices.len() > 1 { devices } else { Vec::new() },
            max_batch_tokens,
            max_batch_patches,
            mem_budget,
            batch_wait: Duration::from_millis(batch_wait_ms),
            tokenizer,
            ..EngineOptions::default()
        };
        if let Some(m) = max_length {
            opts.truncation.max_length = m;
        }
        opts.truncation.strict = strict;
        if let Some(w) = late_chunk_overlap {
            opts.late_chunk_overlap = w;
        }
        if let Some(t) = preprocess_threads {
            opts.preprocess_threads = t.max(1);
        }
        // Loading takes seconds (GPU upload): other Python threads run meanwhile.
        let engine = py.detach(|| Engine::open(&model_dir, opts)).map_err(|e| to_py(py, &e))?;
        Ok(PyEngine { engine })
    }

    /// `cpu` or `cuda:N` (the first device, when there are several).
    #[getter]
    fn device(&self) -> String {
        self.engine.device().to_string()
    }

    /// Per device, in the order given: `(device, describe, lost, forwards, sequences, tokens)`
    /// (`lost`: why it was taken out of the rotation, or `None`).
    fn devices(&self) -> Vec<(String, String, Option<String>, u64, u64, u64)> {
        self.engine
            .devices()
            .into_iter()
            .map(|DeviceState { device, describe, lost, stats }| {
                (device.to_string(), describe, lost, stats.forwards, stats.sequences, stats.tokens)
            })
            .collect()
    }

    /// The device in words.
    #[getter]
    fn describe(&self) -> String {
        self.engine.describe().to_string()
    }

    /// Width of a full single vector.
    #[getter]
    fn hidden_size(&self) -> usize {
        self.engine.config().text.hidden_size
    }

    /// Matryoshka widths a single vector may be truncated to.
    #[getter]
    fn matryoshka_dims(&self) -> Vec<usize> {
        self.engine.config().matryoshka_dims.clone()
    }

    /// Width of a multi-vector row.
    #[getter]
    fn multi_dim(&self) -> usize {
        self.engine.config().multi_vector_projector_dim
    }

    /// `(forwards, sequences, tokens)` so far.
    fn stats(&self) -> (u64, u64, u64) {
        let s = self.engine.stats();
        (s.forwards, s.sequences, s.tokens)
    }

    /// Embeds `inputs` (`kind` "text": str; "image": path str, bytes or bytearray). Never raises
    /// for a bad input: its error comes back in `errors`. Raises for a bad option of the call.
    #[pyo3(signature = (
        inputs, kind, task = "retrieval", prompt_name = "query", output = "single",
        dims = None, max_pixels = None, late_chunking = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        inputs: &Bound<'py, PyAny>,
        kind: &str,
        task: &str,
        prompt_name: &str,
        output: &str,
        dims: Option<i64>,
        max_pixels: Option<usize>,
        late_chunking: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let items: Vec<Bound<'py, PyAny>> = inputs.extract().map_err(|_| {
            input_error(py, format!("expected a list of inputs, got a {}", type_name(inputs)))
        })?;
        let cfg = self.engine.config();
        let output = match output {
            "single" => OutputKind::Single,
            "multi" => OutputKind::Multi,
            "both" => OutputKind::Both,
            o => return Err(input_error(py, format!("output {o:?}: expected single, multi or both"))),
        };
        let dims = match dims {
            None => None,
            Some(d) => match usize::try_from(d).ok().filter(|d| cfg.matryoshka_dims.contains(d)) {
                Some(d) => Some(d),
                None => {
                    return Err(input_error(
                        py,
                        format!(
                            "truncate_dim={d} is not one of the Matryoshka sizes {:?}",
                            cfg.matryoshka_dims
                        ),
                    ))
                }
            },
        };
        let opts = Opts { task: parse(py, task)?, prompt: parse(py, prompt_name)?, output, dims, max_pixels };
        let chunks = match late_chunking {
            Some(c) if !c.is_none() => {
                if kind != "text" {
                    return Err(input_error(py, "late chunking applies to texts only".into()));
                }
                Some(chunk_arg(py, c, items.len())?)
            }
            _ => None,
        };
        let converted: Vec<Converted> = match kind {
            "text" => items.iter().enumerate().map(|(i, x)| text_request(i, x, chunks.as_ref())).collect(),
            "image" => items.iter().enumerate().map(|(i, x)| image_request(i, x)).collect(),
            k => return Err(input_error(py, format!("kind {k:?}: expected text or image"))),
        };
        let reqs: Vec<Request> =
            converted.iter().filter_map(|c| c.as_ref().ok()).map(|r| opts.apply(r.clone())).collect();
        let texts: Vec<Option<String>> = converted
            .iter()
            .map(|c| match c {
                Ok(Request { input: jv4::Input::Text(t), chunking: Some(_), .. }) => Some(t.clone()),
                _ => None,
            })
            .collect();
        // The engine's work (tokenizing, decoding, forwards) runs without the GIL.
        let engine = &self.engine;
        let mut served = py.detach(|| engine.embed(&reqs)).into_iter();
        let results: Vec<Result<Embedding, PyErr>> = converted
            .into_iter()
            .map(|c| match c {
                Ok(_) => served.next().expect("one result per request").map_err(|e| to_py(py, &e)),
                Err((class, msg)) => Err(exception(py, class, msg)
                    .map(|o| PyErr::from_value(o.into_bound(py)))
                    .unwrap_or_else(|e| e)),
            })
            .collect();
        pack(
            py,
            &results,
            &texts,
            cfg.multi_vector_projector_dim,
            dims.unwrap_or(cfg.text.hidden_size),
            output,
        )
    }
}

/// The results as a dict of `bytearray`s and counts (the layout `jv4/__init__.py` reads).
fn pack<'py>(
    py: Python<'py>,
    results: &[Result<Embedding, PyErr>],
    texts: &[Option<String>],
    multi_dim: usize,
    width: usize,
    output: OutputKind,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let ok = |i: usize| results[i].as_ref().ok();
    let n = results.len();
    d.set_item("n", n)?;
    d.set_item("dim", width)?;
    d.set_item("multi_dim", multi_dim)?;
    if output.single() {
        let rows = (0..n).map(|i| ok(i).and_then(|e| e.single.as_deref()));
        d.set_item("single", f32_rows(py, rows, width)?)?;
    }
    if output.multi() {
        let rows = (0..n).map(|i| ok(i).and_then(|e| e.multi.as_ref()).map(|m| m.data.as_slice()));
        d.set_item("multi_data", f32_rows(py, rows.clone(), 0)?)?;
        d.set_item("multi_offsets", i64s(py, &offsets(rows.map(|r| r.map_or(0, |r| r.len() / multi_dim))))?)?;
    }
    let tokens: Vec<i64> = (0..n).map(|i| ok(i).map_or(0, |e| e.tokens as i64)).collect();
    let dropped: Vec<i64> = (0..n).map(|i| ok(i).map_or(0, |e| e.dropped as i64)).collect();
    d.set_item("tokens", i64s(py, &tokens)?)?;
    d.set_item("dropped", i64s(py, &dropped)?)?;
    let errors = PyList::empty(py);
    for (i, r) in results.iter().enumerate() {
        if let Err(e) = r {
            errors.append((i, e.value(py)))?;
        }
    }
    d.set_item("errors", errors)?;
    if texts.iter().any(Option::is_some) {
        let chunks: Vec<&[jv4::Chunk]> =
            (0..n).map(|i| ok(i).and_then(|e| e.chunks.as_deref()).unwrap_or(&[])).collect();
        let all = || chunks.iter().copied().flatten();
        d.set_item("chunk_offsets", i64s(py, &offsets(chunks.iter().map(|c| c.len())))?)?;
        let (mut tok, mut chars) = (Vec::new(), Vec::new());
        for (i, cs) in chunks.iter().enumerate() {
            for c in cs.iter() {
                tok.extend([c.tokens.start as i64, c.tokens.end as i64]);
                let t = texts[i].as_deref().unwrap_or("");
                chars.extend([byte_to_char(t, c.chars.start) as i64, byte_to_char(t, c.chars.end) as i64]);
            }
        }
        d.set_item("chunk_tokens", i64s(py, &tok)?)?;
        d.set_item("chunk_chars", i64s(py, &chars)?)?;
        if output.single() {
            d.set_item("chunk_single", f32_rows(py, all().map(|c| c.single.as_deref()), width)?)?;
        }
        if output.multi() {
            let rows = all().map(|c| c.multi.as_ref().map(|m| m.data.as_slice()));
            d.set_item("chunk_multi_data", f32_rows(py, rows.clone(), 0)?)?;
            d.set_item(
                "chunk_multi_offsets",
                i64s(py, &offsets(rows.map(|r| r.map_or(0, |r| r.len() / multi_dim))))?,
            )?;
        }
    }
    Ok(d)
}

/// Writes a random tiny model folder (the checkpoint layout of the real model, a few MB) for
/// tests and examples.
#[pyfunction]
#[pyo3(signature = (out, seed = 0))]
fn _synth(py: Python<'_>, out: PathBuf, seed: u64) -> PyResult<()> {
    py.detach(|| jv4::diag::synth(&out, false, seed, false)).map_err(|e| to_py(py, &e))
}

/// The text benches' 256-document mix (`docs256` of `jv4-bench text`: document `i` has
/// `16 + (i * 7919) % 1009` tokens, passage prompt included) as texts: random plain words, cut with
/// the model folder's tokenizer at the token that reaches the length. For the throughput check
/// (tools/py_docs_bench.py).
#[pyfunction]
fn _docs256(py: Python<'_>, model_dir: PathBuf) -> PyResult<Vec<String>> {
    const WORDS: &[&str] = &[
        "the",
        "engine",
        "embeds",
        "documents",
        "and",
        "queries",
        "into",
        "vectors",
        "whose",
        "cosine",
        "measures",
        "how",
        "close",
        "their",
        "meanings",
        "are",
        "a",
        "search",
        "index",
        "keeps",
        "millions",
        "of",
        "them",
        "for",
        "retrieval",
        "over",
        "long",
        "texts",
        "images",
        "code",
        "tables",
        "numbers",
        "42",
        "1999",
        "Paris",
        "Berlin",
        "river",
        "mountain",
        "protein",
        "market",
        "theorem",
        "function",
        "returns",
        "value",
        "when",
        "called",
        "with",
        "arguments",
        "weather",
        "today",
        "is",
        "mild",
        "in",
    ];
    let tok = jv4::engine::TextTokenizer::from_model_dir(&model_dir).map_err(|e| to_py(py, &e))?;
    (0..256usize)
        .map(|i| {
            let want = 16 + (i * 7919) % 1009;
            let mut rng = jv4::rng::Rng::new(1000 + i as u64);
            let mut text = String::new();
            loop {
                while text.len() < want * 8 {
                    if !text.is_empty() {
                        text.push_str(if rng.below(12) == 0 { ". " } else { " " });
                    }
                    text.push_str(WORDS[rng.below(WORDS.len())]);
                }
                let enc = tok
                    .encode_with_offsets(Task::Retrieval, PromptName::Passage, &text)
                    .map_err(|e| to_py(py, &e))?;
                if enc.ids.len() >= want {
                    text.truncate(enc.offsets[want - 1].1);
                    return Ok(text);
                }
            }
        })
        .collect()
}

/// `Engine::embed` timed from Rust on `texts` (passage prompt, single vectors, the requests built
/// from the strings on every pass, no Python object per input): the Rust engine's throughput that
/// tools/py_docs_bench.py compares `encode_document` with, on the same engine. Returns the tokens
/// of one pass and the seconds of each of `reps` passes.
#[pyfunction]
fn _time_embed(
    py: Python<'_>,
    engine: &Bound<'_, PyEngine>,
    texts: Vec<String>,
    reps: usize,
) -> PyResult<(usize, Vec<f64>)> {
    let engine = &engine.get().engine;
    let pass = || -> jv4::Result<usize> {
        let reqs: Vec<Request> =
            texts.iter().map(|t| Request::text(t.as_str()).prompt(PromptName::Passage)).collect();
        engine.embed(&reqs).into_iter().map(|r| r.map(|e| e.tokens)).sum()
    };
    py.detach(|| {
        let mut tokens = 0;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t0 = std::time::Instant::now();
            tokens = pass()?;
            times.push(t0.elapsed().as_secs_f64());
        }
        Ok((tokens, times))
    })
    .map_err(|e: Error| to_py(py, &e))
}

/// `jv4.fix_mmap_threshold()`: glibc's malloc keeps a long-running process's RSS flat under mixed
/// loads (`jv4::host_malloc`); whether it was set (False: not glibc, or the environment sets it).
#[pyfunction]
fn fix_mmap_threshold() -> bool {
    jv4::host_malloc::fix_mmap_threshold()
}

#[pymodule]
fn _jv4(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_function(wrap_pyfunction!(fix_mmap_threshold, m)?)?;
    m.add_function(wrap_pyfunction!(_synth, m)?)?;
    m.add_function(wrap_pyfunction!(_docs256, m)?)?;
    m.add_function(wrap_pyfunction!(_time_embed, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
