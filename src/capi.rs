//! The C ABI (`include/jv4.h`, generated from this file by cbindgen; see docs/C.md).
//!
//! Rules every exported function keeps:
//! - its whole body runs inside [`guard`] or [`guard_or`], which catch panics: a bug in the
//!   engine becomes `JV4_ERR_PANIC`, never an abort of the host (`tests/capi.rs` checks that every
//!   `#[no_mangle]` function here is written that way);
//! - a fallible call returns a [`jv4_status`] and, where the caller passes a non-NULL `err`, sets
//!   `*err` to an error handle (code + message) on failure and to NULL on success;
//! - handles are not addresses but ids in a registry (never reused), so a freed, foreign or NULL
//!   handle is reported as `JV4_ERR_BAD_HANDLE` / `JV4_ERR_NULL_POINTER`, never dereferenced, and
//!   freeing twice (or freeing NULL) does nothing;
//! - a bad request (unknown task, invalid UTF-8, bad dims, bad spans, ...) fails alone: the other
//!   requests of the batch are embedded.
//!
//! The names follow C conventions (`jv4_engine`, `JV4_OK`), as they appear in the header.
#![allow(non_camel_case_types)]

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use crate::{
    Chunk, Chunking, Device, Embedding, Engine, EngineOptions, Error, OutputKind, PromptName, Request, Task,
    Truncation,
};

/// What a call (or one request of a batch) came to. `JV4_OK` is 0; the codes from
/// `JV4_ERR_IO` on are the engine's error kinds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum jv4_status {
    /// Success.
    JV4_OK = 0,
    /// A pointer argument that must not be NULL was NULL.
    JV4_ERR_NULL_POINTER = 1,
    /// An argument is out of range: an unknown constant, a size too large, a zero width.
    JV4_ERR_INVALID_ARGUMENT = 2,
    /// A handle that is not live: already freed, or never returned by this library.
    JV4_ERR_BAD_HANDLE = 3,
    /// A caller-provided buffer is smaller than the call needs.
    JV4_ERR_BUFFER_TOO_SMALL = 4,
    /// A bug inside the library (a Rust panic, caught); the message says where.
    JV4_ERR_PANIC = 5,
    /// A file could not be read.
    JV4_ERR_IO = 10,
    /// A configuration file is missing a key or malformed.
    JV4_ERR_CONFIG = 11,
    /// A checkpoint file is malformed.
    JV4_ERR_CHECKPOINT = 12,
    /// A tensor of the checkpoint is missing or has the wrong shape or dtype.
    JV4_ERR_TENSOR = 13,
    /// The tokenizer could not be loaded or failed on an input.
    JV4_ERR_TOKENIZER = 14,
    /// A request is invalid (unknown task, invalid UTF-8, bad dims, bad spans, ...).
    JV4_ERR_INPUT = 15,
    /// The device memory budget cannot hold the work: split it and retry.
    JV4_ERR_OUT_OF_MEMORY = 16,
    /// No usable CUDA driver or GPU.
    JV4_ERR_NO_GPU = 17,
    /// A CUDA driver call failed.
    JV4_ERR_CUDA = 18,
    /// A kernel could not be loaded or launched.
    JV4_ERR_KERNEL = 19,
    /// A cuBLAS call failed.
    JV4_ERR_BLAS = 20,
    /// The forward produced NaN or infinite values for this request.
    JV4_ERR_NON_FINITE = 21,
    /// A broken invariant inside the engine.
    JV4_ERR_INTERNAL = 22,
    /// An op got operands of the wrong shape.
    JV4_ERR_SHAPE = 23,
    /// The device hit a sticky fault: this engine is lost; drop it and open a new one.
    JV4_ERR_DEVICE_LOST = 24,
}

use jv4_status::*;

/// Input kind of a `jv4_request`: a NUL-terminated UTF-8 text in `text`.
pub const JV4_INPUT_TEXT: u32 = 0;
/// Input kind: an encoded image file (JPEG, PNG, WebP, GIF, BMP, TIFF) in `bytes` / `bytes_len`.
pub const JV4_INPUT_IMAGE_BYTES: u32 = 1;
/// Input kind: the path of an image file in `text`.
pub const JV4_INPUT_IMAGE_PATH: u32 = 2;
/// Input kind: token ids in `token_ids` / `token_ids_len`, used as they are (prompt applied).
pub const JV4_INPUT_TOKENS: u32 = 3;

/// Outputs of a request: the pooled single vector only.
pub const JV4_OUTPUT_SINGLE: u32 = 0;
/// Outputs: the per-token multi-vectors only.
pub const JV4_OUTPUT_MULTI: u32 = 1;
/// Outputs: both, from the one forward.
pub const JV4_OUTPUT_BOTH: u32 = 2;

/// Late chunking of a request: none.
pub const JV4_CHUNKING_NONE: u32 = 0;
/// Late chunking: consecutive chunks of `chunk_tokens` tokens.
pub const JV4_CHUNKING_TOKENS: u32 = 1;
/// Late chunking: the `[start, end)` byte ranges of the text in `spans` / `spans_len`.
pub const JV4_CHUNKING_SPANS: u32 = 2;

/// An open engine (a model on a device). Thread-safe: any number of threads may call
/// `jv4_embed` on one handle at once.
pub struct jv4_engine {
    _opaque: [u8; 0],
}

/// The results of one `jv4_embed` call; every view read from it stays valid until
/// `jv4_result_free`.
pub struct jv4_result {
    _opaque: [u8; 0],
}

/// An error: a code and a message, valid until `jv4_error_free`.
pub struct jv4_error {
    _opaque: [u8; 0],
}

/// Options of `jv4_engine_open`. Zero / NULL means the default for every field but `model_dir`,
/// so `jv4_engine_options o = {0};` is a valid start.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct jv4_engine_options {
    /// The model folder (checkpoint, configs, `tokenizer.json`). Required.
    pub model_dir: *const c_char,
    /// `"cpu"`, `"cuda"` or `"cuda:N"`; NULL: `"cuda:0"`.
    pub device: *const c_char,
    /// A `tokenizer.json` to use instead of the model folder's; NULL: the folder's.
    pub tokenizer: *const c_char,
    /// Most tokens in one forward; 0: 16384.
    pub max_batch_tokens: usize,
    /// Most image patches in one forward; 0: 16384.
    pub max_batch_patches: usize,
    /// Activation memory budget in bytes; 0: `$JV4_MEM_BUDGET`, else 90% of the free memory.
    pub mem_budget: u64,
    /// Tokens kept per text, prompt included; 0: 32768 (the most).
    pub max_length: usize,
    /// Non-zero: an over-long text fails instead of being cut.
    pub strict: i32,
    /// CPU threads for image preprocessing; 0: the number of cores (at most 16).
    pub preprocess_threads: usize,
    /// How long a forward that is not full waits for requests from other threads, in ms.
    pub batch_wait_ms: u64,
}

/// A `[start, end)` byte range of a text, for late chunking by spans.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct jv4_span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// One thing to embed. Zero / NULL means the default for every field but the input, so
/// `jv4_request r = {0};` is a valid start.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct jv4_request {
    /// `JV4_INPUT_TEXT`, `JV4_INPUT_IMAGE_BYTES`, `JV4_INPUT_IMAGE_PATH` or `JV4_INPUT_TOKENS`.
    pub kind: u32,
    /// The NUL-terminated UTF-8 text (`JV4_INPUT_TEXT`) or image path (`JV4_INPUT_IMAGE_PATH`).
    pub text: *const c_char,
    /// The encoded image (`JV4_INPUT_IMAGE_BYTES`).
    pub bytes: *const u8,
    /// Length of `bytes`.
    pub bytes_len: usize,
    /// The token ids (`JV4_INPUT_TOKENS`).
    pub token_ids: *const u32,
    /// Number of `token_ids`.
    pub token_ids_len: usize,
    /// `"retrieval"`, `"text-matching"` or `"code"`; NULL: retrieval.
    pub task: *const c_char,
    /// `"query"` or `"passage"`; NULL: query.
    pub prompt: *const c_char,
    /// `JV4_OUTPUT_SINGLE`, `JV4_OUTPUT_MULTI` or `JV4_OUTPUT_BOTH`.
    pub output: u32,
    /// Matryoshka width of the single vector (one of the model's sizes); 0: full width.
    pub dims: usize,
    /// Resize ceiling of an image in pixels; 0: the model's.
    pub max_pixels: usize,
    /// `JV4_CHUNKING_NONE`, `JV4_CHUNKING_TOKENS` or `JV4_CHUNKING_SPANS`.
    pub chunking: u32,
    /// Tokens per chunk (`JV4_CHUNKING_TOKENS`), at least 1.
    pub chunk_tokens: usize,
    /// The chunks' byte ranges of the text, in order, not overlapping (`JV4_CHUNKING_SPANS`).
    pub spans: *const jv4_span,
    /// Number of `spans`.
    pub spans_len: usize,
}

/// One request's result, as views into a `jv4_result` (valid until `jv4_result_free`). A view
/// that is absent has a NULL pointer and length 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct jv4_embedding_view {
    /// `JV4_OK`, or why this request failed.
    pub status: jv4_status,
    /// NUL-terminated message of a failure; NULL when `status` is `JV4_OK`.
    pub message: *const c_char,
    /// The L2-normalised single vector.
    pub single: *const f32,
    /// Its length (the request's width).
    pub single_len: usize,
    /// The per-token vectors, `multi_rows` rows of `multi_dim` floats, row-major.
    pub multi: *const f32,
    /// Number of rows of `multi`.
    pub multi_rows: usize,
    /// Width of a row of `multi`.
    pub multi_dim: usize,
    /// Tokens embedded (prompt included).
    pub tokens: usize,
    /// Tokens cut off by truncation.
    pub dropped: usize,
    /// Number of late chunks (read each with `jv4_result_chunk`); 0 without late chunking.
    pub chunks_len: usize,
}

/// One late chunk of a request's result, as views (valid until `jv4_result_free`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct jv4_chunk_view {
    /// The chunk's L2-normalised single vector.
    pub single: *const f32,
    /// Its length.
    pub single_len: usize,
    /// The chunk's per-token vectors, row-major.
    pub multi: *const f32,
    /// Number of rows of `multi`.
    pub multi_rows: usize,
    /// Width of a row of `multi`.
    pub multi_dim: usize,
    /// First token position of the chunk in the embedded sequence (prompt included).
    pub token_start: usize,
    /// One past its last token position.
    pub token_end: usize,
    /// First byte of the chunk in the text.
    pub char_start: usize,
    /// One past its last byte.
    pub char_end: usize,
}

impl Default for jv4_engine_options {
    fn default() -> Self {
        jv4_engine_options {
            model_dir: ptr::null(),
            device: ptr::null(),
            tokenizer: ptr::null(),
            max_batch_tokens: 0,
            max_batch_patches: 0,
            mem_budget: 0,
            max_length: 0,
            strict: 0,
            preprocess_threads: 0,
            batch_wait_ms: 0,
        }
    }
}

impl Default for jv4_request {
    fn default() -> Self {
        jv4_request {
            kind: JV4_INPUT_TEXT,
            text: ptr::null(),
            bytes: ptr::null(),
            bytes_len: 0,
            token_ids: ptr::null(),
            token_ids_len: 0,
            task: ptr::null(),
            prompt: ptr::null(),
            output: JV4_OUTPUT_SINGLE,
            dims: 0,
            max_pixels: 0,
            chunking: JV4_CHUNKING_NONE,
            chunk_tokens: 0,
            spans: ptr::null(),
            spans_len: 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Failures and the panic guard.

/// A failure on its way to the caller: a code and a message.
#[derive(Debug)]
struct Fail {
    code: jv4_status,
    msg: String,
}

impl Fail {
    fn new(code: jv4_status, msg: impl Into<String>) -> Fail {
        Fail { code, msg: msg.into() }
    }
    fn null(what: &str) -> Fail {
        Fail::new(JV4_ERR_NULL_POINTER, format!("{what} is NULL"))
    }
    fn arg(msg: impl Into<String>) -> Fail {
        Fail::new(JV4_ERR_INVALID_ARGUMENT, msg)
    }
    fn input(msg: impl Into<String>) -> Fail {
        Fail::from(Error::Input(msg.into()))
    }
    fn panic(payload: Box<dyn std::any::Any + Send>) -> Fail {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Fail::new(JV4_ERR_PANIC, format!("internal error: the library panicked: {what}"))
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail { code: code_of(&e), msg: e.to_string() }
    }
}

/// The status code of an engine error's kind.
fn code_of(e: &Error) -> jv4_status {
    match e {
        Error::Io { .. } => JV4_ERR_IO,
        Error::Config { .. } => JV4_ERR_CONFIG,
        Error::Checkpoint { .. } => JV4_ERR_CHECKPOINT,
        Error::Tensor { .. } => JV4_ERR_TENSOR,
        Error::Tokenizer(_) => JV4_ERR_TOKENIZER,
        Error::Input(_) => JV4_ERR_INPUT,
        Error::OutOfMemory { .. } => JV4_ERR_OUT_OF_MEMORY,
        Error::NoGpu(_) => JV4_ERR_NO_GPU,
        Error::Cuda { .. } => JV4_ERR_CUDA,
        Error::Kernel { .. } => JV4_ERR_KERNEL,
        Error::Blas(_) => JV4_ERR_BLAS,
        Error::NonFinite(_) => JV4_ERR_NON_FINITE,
        // The C ABI has no way to cancel, so a cancelled request never reaches it.
        Error::Internal(_) | Error::Cancelled(_) => JV4_ERR_INTERNAL,
        Error::Shape { .. } => JV4_ERR_SHAPE,
        Error::DeviceLost(_) => JV4_ERR_DEVICE_LOST,
    }
}

/// A C string of `msg` (a NUL inside is written as `\0`, so nothing is cut).
fn c_string(msg: &str) -> CString {
    CString::new(msg.replace('\0', "\\0")).unwrap_or_default()
}

/// Runs a fallible exported function's body, catching panics; stores the failure in `*err`
/// (NULL on success) where `err` is not NULL, and returns its code.
fn guard(err: *mut *mut jv4_error, body: impl FnOnce() -> Result<(), Fail>) -> jv4_status {
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|p| Err(Fail::panic(p)));
    let (code, fail) = match outcome {
        Ok(()) => (JV4_OK, None),
        Err(f) => (f.code, Some(f)),
    };
    if !err.is_null() {
        // Registering cannot fail but for the allocator; keep even that inside a guard.
        let handle = fail.and_then(|f| catch_unwind(|| new_error(f)).ok()).unwrap_or(ptr::null_mut());
        // SAFETY: the caller passes NULL or a pointer valid for writing one `jv4_error *`.
        unsafe { err.write(handle) };
    }
    code
}

/// Runs an infallible exported function's body (a getter, a free), catching panics: a panic
/// gives `fallback`.
fn guard_or<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

// ---------------------------------------------------------------------------------------------
// The handle registry.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Engine,
    Result,
    Error,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Engine => "jv4_engine",
            Kind::Result => "jv4_result",
            Kind::Error => "jv4_error",
        }
    }
}

enum Entry {
    Engine(Engine),
    Result(Vec<Item>),
    Error { code: jv4_status, msg: CString },
}

impl Entry {
    fn kind(&self) -> Kind {
        match self {
            Entry::Engine(_) => Kind::Engine,
            Entry::Result(_) => Kind::Result,
            Entry::Error { .. } => Kind::Error,
        }
    }
}

/// One request's outcome inside a `jv4_result`.
struct Item {
    status: jv4_status,
    message: Option<CString>,
    embedding: Option<Embedding>,
}

/// Live handles by id. An id is never reused, so a stale handle is always recognised.
static HANDLES: LazyLock<Mutex<HashMap<usize, Entry>>> = LazyLock::new(Default::default);
/// The next id; a multiple of 16 so that handles look like aligned pointers in a debugger.
static NEXT_ID: AtomicUsize = AtomicUsize::new(16);

fn handles() -> MutexGuard<'static, HashMap<usize, Entry>> {
    // A panic while the lock was held cannot leave the map half-updated (insert and remove are
    // single calls), so a poisoned lock is still good.
    HANDLES.lock().unwrap_or_else(|e| e.into_inner())
}

fn register(entry: Entry) -> usize {
    let id = NEXT_ID.fetch_add(16, Ordering::Relaxed);
    handles().insert(id, entry);
    id
}

fn new_error(f: Fail) -> *mut jv4_error {
    ptr::without_provenance_mut(register(Entry::Error { code: f.code, msg: c_string(&f.msg) }))
}

/// Drops a live handle of this kind; anything else (NULL, freed, another kind) is left alone.
fn free_handle(id: usize, kind: Kind) {
    let removed = {
        let mut map = handles();
        match map.get(&id) {
            Some(e) if e.kind() == kind => map.remove(&id),
            _ => None,
        }
    };
    // Dropped outside the lock: the last engine handle joins its worker thread.
    drop(removed);
}

/// Runs `f` on the live handle `id` of this kind, under the registry's lock.
fn with_handle<R>(id: usize, kind: Kind, f: impl FnOnce(&Entry) -> Result<R, Fail>) -> Result<R, Fail> {
    if id == 0 {
        return Err(Fail::null(kind.name()));
    }
    let map = handles();
    match map.get(&id) {
        Some(e) if e.kind() == kind => f(e),
        Some(e) => Err(Fail::new(
            JV4_ERR_BAD_HANDLE,
            format!("handle {id:#x} is a {}, not a {}", e.kind().name(), kind.name()),
        )),
        None => Err(Fail::new(
            JV4_ERR_BAD_HANDLE,
            format!("handle {id:#x} is not a live {} (already freed, or not made by jv4)", kind.name()),
        )),
    }
}

fn engine_of(p: *const jv4_engine) -> Result<Engine, Fail> {
    with_handle(p.addr(), Kind::Engine, |e| match e {
        Entry::Engine(engine) => Ok(engine.clone()),
        _ => unreachable!("kind checked"),
    })
}

fn with_items<R>(p: *const jv4_result, f: impl FnOnce(&[Item]) -> Result<R, Fail>) -> Result<R, Fail> {
    with_handle(p.addr(), Kind::Result, |e| match e {
        Entry::Result(items) => f(items),
        _ => unreachable!("kind checked"),
    })
}

/// Request `i` of a result handle (an index past the end is an invalid argument).
fn with_item<R>(p: *const jv4_result, i: usize, f: impl FnOnce(&Item) -> Result<R, Fail>) -> Result<R, Fail> {
    with_items(p, |items| {
        let it =
            items.get(i).ok_or_else(|| Fail::arg(format!("index {i}: the result holds {}", items.len())))?;
        f(it)
    })
}

// ---------------------------------------------------------------------------------------------
// Reading the caller's memory.

/// A NUL-terminated UTF-8 string, or `None` for NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL, and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    std::str::from_utf8(bytes).map(Some).map_err(|e| {
        Fail::input(format!("{what} is not valid UTF-8 (bad byte at offset {})", e.valid_up_to()))
    })
}

/// A slice of `len` elements at `p` (NULL allowed when `len` is 0).
///
/// # Safety
/// Unless NULL, `p` points to `len` initialised elements that outlive `'a`.
unsafe fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T], Fail> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Fail::null(&format!("{what} (with length {len})")));
    }
    if len > isize::MAX as usize / size_of::<T>().max(1) {
        return Err(Fail::arg(format!("{what}: length {len} is larger than any array can be")));
    }
    if !p.is_aligned() {
        return Err(Fail::arg(format!("{what} is not aligned for its element type")));
    }
    // SAFETY: non-NULL, aligned, the size fits an isize, and the caller vouches for `len`
    // initialised elements that outlive the call.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A request of the caller's, checked and converted.
///
/// # Safety
/// The pointers in `r` follow the contract documented on [`jv4_request`].
unsafe fn to_request(r: &jv4_request) -> Result<Request, Fail> {
    let text = || -> Result<&str, Fail> {
        // SAFETY: `text` is NULL or NUL-terminated, by the contract.
        unsafe { opt_str(r.text, "text") }?.ok_or_else(|| Fail::null("text"))
    };
    let mut req = match r.kind {
        JV4_INPUT_TEXT => Request::text(text()?),
        JV4_INPUT_IMAGE_PATH => Request::image_path(text()?),
        JV4_INPUT_IMAGE_BYTES if r.bytes.is_null() => return Err(Fail::null("bytes")),
        // SAFETY: `bytes_len` bytes at `bytes`, by the contract.
        JV4_INPUT_IMAGE_BYTES => Request::image_bytes(unsafe { slice(r.bytes, r.bytes_len, "bytes") }?),
        JV4_INPUT_TOKENS if r.token_ids.is_null() => return Err(Fail::null("token_ids")),
        // SAFETY: `token_ids_len` ids at `token_ids`, by the contract.
        JV4_INPUT_TOKENS => Request::tokens(unsafe { slice(r.token_ids, r.token_ids_len, "token_ids") }?),
        k => return Err(Fail::arg(format!("kind {k} is not one of the JV4_INPUT_* constants"))),
    };
    // SAFETY: `task` is NULL or NUL-terminated, by the contract.
    if let Some(t) = unsafe { opt_str(r.task, "task") }? {
        req = req.task(t.parse::<Task>()?);
    }
    // SAFETY: `prompt` is NULL or NUL-terminated, by the contract.
    if let Some(p) = unsafe { opt_str(r.prompt, "prompt") }? {
        req = req.prompt(p.parse::<PromptName>()?);
    }
    req = req.output(match r.output {
        JV4_OUTPUT_SINGLE => OutputKind::Single,
        JV4_OUTPUT_MULTI => OutputKind::Multi,
        JV4_OUTPUT_BOTH => OutputKind::Both,
        o => return Err(Fail::arg(format!("output {o} is not one of the JV4_OUTPUT_* constants"))),
    });
    if r.dims != 0 {
        req = req.dims(r.dims);
    }
    if r.max_pixels != 0 {
        req = req.max_pixels(r.max_pixels);
    }
    match r.chunking {
        JV4_CHUNKING_NONE => {}
        JV4_CHUNKING_TOKENS => {
            if r.chunk_tokens == 0 {
                return Err(Fail::input("chunk_tokens must be at least 1 for JV4_CHUNKING_TOKENS"));
            }
            req = req.late_chunking(Chunking::Tokens(r.chunk_tokens));
        }
        JV4_CHUNKING_SPANS => {
            if r.kind != JV4_INPUT_TEXT {
                return Err(Fail::input(
                    "JV4_CHUNKING_SPANS needs a text input (spans are byte ranges of it)",
                ));
            }
            // SAFETY: `spans_len` spans at `spans`, by the contract.
            let spans = unsafe { slice(r.spans, r.spans_len, "spans") }?;
            check_spans(text()?, spans)?;
            req = req.late_chunking(Chunking::Spans(spans.iter().map(|s| (s.start, s.end)).collect()));
        }
        c => return Err(Fail::arg(format!("chunking {c} is not one of the JV4_CHUNKING_* constants"))),
    }
    Ok(req)
}

/// Spans must be non-empty byte ranges of the text on character boundaries, in order, not
/// overlapping, and there must be at least one.
fn check_spans(text: &str, spans: &[jv4_span]) -> Result<(), Fail> {
    if spans.is_empty() {
        return Err(Fail::input("JV4_CHUNKING_SPANS with no spans"));
    }
    let mut prev_end = 0;
    for (k, s) in spans.iter().enumerate() {
        let (a, b) = (s.start, s.end);
        if a >= b {
            return Err(Fail::input(format!("span {k} [{a}, {b}) is empty or reversed")));
        }
        if b > text.len() {
            return Err(Fail::input(format!(
                "span {k} [{a}, {b}) is outside the text ({} bytes)",
                text.len()
            )));
        }
        if !text.is_char_boundary(a) || !text.is_char_boundary(b) {
            return Err(Fail::input(format!("span {k} [{a}, {b}) cuts a UTF-8 character")));
        }
        if k > 0 && a < prev_end {
            return Err(Fail::input(format!(
                "span {k} [{a}, {b}) overlaps or comes before span {} (which ends at {prev_end})",
                k - 1
            )));
        }
        prev_end = b;
    }
    Ok(())
}

/// Converts the caller's requests, embeds the good ones in one call and returns every request's
/// outcome in order: a bad request fails alone.
///
/// # Safety
/// `reqs` follow the contract documented on [`jv4_request`].
unsafe fn run(engine: &Engine, reqs: &[jv4_request]) -> Vec<Result<Embedding, Fail>> {
    let mut out: Vec<Result<Embedding, Fail>> = Vec::with_capacity(reqs.len());
    let mut good = Vec::new();
    for r in reqs {
        // SAFETY: forwarded contract.
        match unsafe { to_request(r) } {
            Ok(req) => {
                good.push(req);
                out.push(Ok(Embedding::default()));
            }
            Err(f) => out.push(Err(f)),
        }
    }
    let mut results = engine.embed(&good).into_iter();
    for o in out.iter_mut().filter(|o| o.is_ok()) {
        *o = match results.next() {
            Some(r) => r.map_err(Fail::from),
            None => Err(Fail::new(JV4_ERR_INTERNAL, "the engine returned fewer results than requests")),
        };
    }
    out
}

/// Checks a non-NULL out-parameter and clears it.
///
/// # Safety
/// `p` is NULL or valid for writing one `T` pointer.
unsafe fn out_handle<T>(p: *mut *mut T, what: &str) -> Result<*mut *mut T, Fail> {
    if p.is_null() {
        return Err(Fail::null(what));
    }
    // SAFETY: non-NULL and writable by the caller's contract.
    unsafe { p.write(ptr::null_mut()) };
    Ok(p)
}

fn view<T>(v: Option<&[T]>) -> (*const T, usize) {
    v.map_or((ptr::null(), 0), |s| (s.as_ptr(), s.len()))
}

// ---------------------------------------------------------------------------------------------
// The exported functions.

/// The library's version, a static NUL-terminated string (never NULL).
#[no_mangle]
pub extern "C" fn jv4_version() -> *const c_char {
    guard_or(c"?".as_ptr(), || concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast())
}

/// The code of an error handle; `JV4_ERR_BAD_HANDLE` for a handle that is not a live error, and
/// `JV4_OK` for NULL (no error).
///
/// # Safety
/// None beyond passing a value returned by this library or NULL; any value is detected.
#[no_mangle]
pub unsafe extern "C" fn jv4_error_code(err: *const jv4_error) -> jv4_status {
    guard_or(JV4_ERR_PANIC, || {
        if err.is_null() {
            return JV4_OK;
        }
        with_handle(err.addr(), Kind::Error, |e| match e {
            Entry::Error { code, .. } => Ok(*code),
            _ => unreachable!("kind checked"),
        })
        .unwrap_or_else(|f| f.code)
    })
}

/// The NUL-terminated message of an error handle, valid until `jv4_error_free`. Never NULL: a
/// NULL or dead handle gives a static message saying so.
///
/// # Safety
/// None beyond passing a value returned by this library or NULL; any value is detected.
#[no_mangle]
pub unsafe extern "C" fn jv4_error_message(err: *const jv4_error) -> *const c_char {
    guard_or(c"internal error: the library panicked".as_ptr(), || {
        if err.is_null() {
            return c"no error (NULL jv4_error)".as_ptr();
        }
        with_handle(err.addr(), Kind::Error, |e| match e {
            // The CString's buffer lives in the registry until the handle is freed.
            Entry::Error { msg, .. } => Ok(msg.as_ptr()),
            _ => unreachable!("kind checked"),
        })
        .unwrap_or(c"not a live jv4_error (already freed, or not made by jv4)".as_ptr())
    })
}

/// Frees an error handle. NULL, or a handle already freed, is a no-op.
///
/// # Safety
/// None; any value is detected.
#[no_mangle]
pub unsafe extern "C" fn jv4_error_free(err: *mut jv4_error) {
    guard_or((), || free_handle(err.addr(), Kind::Error))
}

/// Opens an engine: loads the model in `opts->model_dir` onto `opts->device`. On success `*out`
/// is the handle (free it with `jv4_engine_free`); on failure `*out` is NULL.
///
/// # Safety
/// `opts` is NULL or points to a `jv4_engine_options` whose strings are NULL or NUL-terminated;
/// `out` is NULL or writable; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn jv4_engine_open(
    opts: *const jv4_engine_options,
    out: *mut *mut jv4_engine,
    err: *mut *mut jv4_error,
) -> jv4_status {
    guard(err, || {
        // SAFETY: NULL or writable, by the contract.
        let out = unsafe { out_handle(out, "out") }?;
        // SAFETY: NULL or a valid options struct, by the contract.
        let o = unsafe { opts.as_ref() }.ok_or_else(|| Fail::null("opts"))?;
        // SAFETY: the option strings are NULL or NUL-terminated, by the contract.
        let string = |p, what| unsafe { opt_str(p, what) };
        let dir = string(o.model_dir, "model_dir")?.ok_or_else(|| Fail::null("opts->model_dir"))?;
        let mut eo = EngineOptions::default();
        if let Some(d) = string(o.device, "device")? {
            eo.device = d.parse::<Device>()?;
        }
        eo.tokenizer = string(o.tokenizer, "tokenizer")?.map(PathBuf::from);
        if o.max_batch_tokens != 0 {
            eo.max_batch_tokens = o.max_batch_tokens;
        }
        if o.max_batch_patches != 0 {
            eo.max_batch_patches = o.max_batch_patches;
        }
        eo.mem_budget = (o.mem_budget != 0).then_some(o.mem_budget);
        let mut t = Truncation { strict: o.strict != 0, ..Truncation::default() };
        if o.max_length != 0 {
            t.max_length = o.max_length;
        }
        eo.truncation = t;
        if o.preprocess_threads != 0 {
            eo.preprocess_threads = o.preprocess_threads;
        }
        eo.batch_wait = Duration::from_millis(o.batch_wait_ms);
        let engine = Engine::open(std::path::Path::new(dir), eo)?;
        let id = register(Entry::Engine(engine));
        // SAFETY: checked non-NULL and writable above.
        unsafe { out.write(ptr::without_provenance_mut(id)) };
        Ok(())
    })
}

/// Frees an engine handle. Calls already running on other threads finish first; NULL, or a
/// handle already freed, is a no-op.
///
/// # Safety
/// None; any value is detected.
#[no_mangle]
pub unsafe extern "C" fn jv4_engine_free(engine: *mut jv4_engine) {
    guard_or((), || free_handle(engine.addr(), Kind::Engine))
}

/// The engine's full single-vector width and multi-vector row width.
///
/// # Safety
/// `single_dim` and `multi_dim` are NULL or writable; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn jv4_engine_dims(
    engine: *const jv4_engine,
    single_dim: *mut usize,
    multi_dim: *mut usize,
    err: *mut *mut jv4_error,
) -> jv4_status {
    guard(err, || {
        let engine = engine_of(engine)?;
        if single_dim.is_null() || multi_dim.is_null() {
            return Err(Fail::null(if single_dim.is_null() { "single_dim" } else { "multi_dim" }));
        }
        let cfg = engine.config();
        // SAFETY: both checked non-NULL; writable by the contract.
        unsafe {
            single_dim.write(cfg.text.hidden_size);
            multi_dim.write(cfg.multi_vector_projector_dim);
        }
        Ok(())
    })
}

/// Embeds `n` requests. On `JV4_OK`, `*out` is a result handle holding every request's outcome
/// in order (a bad request fails alone: read each one's status with `jv4_result_get`); free it
/// with `jv4_result_free`. A call-level failure (NULL or dead engine, NULL requests) leaves
/// `*out` NULL. Thread-safe: any number of threads may call this on one engine at once.
///
/// # Safety
/// `requests` is NULL (with `n` 0) or points to `n` requests following the contract of
/// `jv4_request`; `out` is NULL or writable; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn jv4_embed(
    engine: *const jv4_engine,
    requests: *const jv4_request,
    n: usize,
    out: *mut *mut jv4_result,
    err: *mut *mut jv4_error,
) -> jv4_status {
    guard(err, || {
        // SAFETY: NULL or writable, by the contract.
        let out = unsafe { out_handle(out, "out") }?;
        let engine = engine_of(engine)?;
        // SAFETY: `n` requests at `requests`, by the contract.
        let reqs = unsafe { slice(requests, n, "requests") }?;
        // SAFETY: the requests follow the contract.
        let outcomes = unsafe { run(&engine, reqs) };
        let items = outcomes
            .into_iter()
            .map(|o| match o {
                Ok(e) => Item { status: JV4_OK, message: None, embedding: Some(e) },
                Err(f) => Item { status: f.code, message: Some(c_string(&f.msg)), embedding: None },
            })
            .collect();
        let id = register(Entry::Result(items));
        // SAFETY: checked non-NULL and writable above.
        unsafe { out.write(ptr::without_provenance_mut(id)) };
        Ok(())
    })
}

/// Embeds `n` requests and writes their single vectors into `out`, row `i` (of `dim` floats) for
/// request `i`. `out_len` is the buffer's length in floats and must be at least `n * dim`
/// (checked before any work: `JV4_ERR_BUFFER_TOO_SMALL`). Each request must give a single vector
/// of exactly `dim` values (its `dims`, or the full width). A failed request's row is filled with
/// NaN; `statuses` (NULL, or room for `n` codes) receives every request's code. Returns `JV4_OK`
/// when all succeeded, else the first failure's code with `*err` naming the request.
///
/// # Safety
/// `requests` as for `jv4_embed`; `out` is NULL or writable for `out_len` floats; `statuses` is
/// NULL or writable for `n` codes; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn jv4_embed_into(
    engine: *const jv4_engine,
    requests: *const jv4_request,
    n: usize,
    dim: usize,
    out: *mut f32,
    out_len: usize,
    statuses: *mut jv4_status,
    err: *mut *mut jv4_error,
) -> jv4_status {
    guard(err, || {
        let engine = engine_of(engine)?;
        if dim == 0 {
            return Err(Fail::arg("dim must be at least 1"));
        }
        let need = n.checked_mul(dim).ok_or_else(|| Fail::arg(format!("{n} requests x {dim} overflows")))?;
        if out_len < need {
            return Err(Fail::new(
                JV4_ERR_BUFFER_TOO_SMALL,
                format!("out holds {out_len} floats; {n} requests x {dim} need {need}"),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        if !out.is_aligned() || (!statuses.is_null() && !statuses.is_aligned()) {
            return Err(Fail::arg("out or statuses is not aligned"));
        }
        // SAFETY: `n` requests at `requests`, by the contract.
        let reqs = unsafe { slice(requests, n, "requests") }?;
        // SAFETY: non-NULL, aligned, writable for `out_len >= need` floats by the contract.
        let rows = unsafe { std::slice::from_raw_parts_mut(out, need) };
        // SAFETY: the requests follow the contract.
        let outcomes = unsafe { run(&engine, reqs) };
        let mut first: Option<(usize, Fail)> = None;
        let mut failed = 0;
        for (i, (o, row)) in outcomes.into_iter().zip(rows.chunks_exact_mut(dim)).enumerate() {
            let written = o.and_then(|e| match e.single {
                Some(v) if v.len() == dim => {
                    row.copy_from_slice(&v);
                    Ok(())
                }
                Some(v) => {
                    Err(Fail::arg(format!("its vector has {} values, the rows of out {dim}", v.len())))
                }
                None => Err(Fail::arg("it asks for no single vector (output is JV4_OUTPUT_MULTI)")),
            });
            let code = match written {
                Ok(()) => JV4_OK,
                Err(f) => {
                    row.fill(f32::NAN);
                    failed += 1;
                    let code = f.code;
                    first.get_or_insert((i, f));
                    code
                }
            };
            if !statuses.is_null() {
                // SAFETY: non-NULL, aligned, writable for `n` codes by the contract; i < n.
                unsafe { statuses.add(i).write(code) };
            }
        }
        match first {
            None => Ok(()),
            Some((i, f)) => Err(Fail::new(
                f.code,
                format!("request {i} of {n}: {} ({failed} of {n} requests failed)", f.msg),
            )),
        }
    })
}

/// The number of requests in a result.
///
/// # Safety
/// `n` is NULL or writable; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn jv4_result_count(
    result: *const jv4_result,
    n: *mut usize,
    err: *mut *mut jv4_error,
) -> jv4_status {
    guard(err, || {
        let count = with_items(result, |items| Ok(items.len()))?;
        if n.is_null() {
            return Err(Fail::null("n"));
        }
        // SAFETY: non-NULL and writable by the contract.
        unsafe { n.write(count) };
        Ok(())
    })
}

/// Request `i`'s outcome as views into the result (valid until `jv4_result_free`). A request
/// that failed still gives `JV4_OK` here: its failure is in `out->status` / `out->message`.
///
/// # Safety
/// `out` is NULL or writable; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn jv4_result_get(
    result: *const jv4_result,
    i: usize,
    out: *mut jv4_embedding_view,
    err: *mut *mut jv4_error,
) -> jv4_status {
    guard(err, || {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let v = with_item(result, i, |it| {
            let e = it.embedding.as_ref();
            let (single, single_len) = view(e.and_then(|e| e.single.as_deref()));
            let m = e.and_then(|e| e.multi.as_ref());
            let (multi, _) = view(m.map(|m| m.data.as_slice()));
            Ok(jv4_embedding_view {
                status: it.status,
                message: it.message.as_ref().map_or(ptr::null(), |m| m.as_ptr()),
                single,
                single_len,
                multi,
                multi_rows: m.map_or(0, |m| m.rows()),
                multi_dim: m.map_or(0, |m| m.dim),
                tokens: e.map_or(0, |e| e.tokens),
                dropped: e.map_or(0, |e| e.dropped),
                chunks_len: e.and_then(|e| e.chunks.as_ref()).map_or(0, Vec::len),
            })
        })?;
        // SAFETY: non-NULL and writable by the contract.
        unsafe { out.write(v) };
        Ok(())
    })
}

/// Chunk `k` of request `i`'s late-chunked result, as views (valid until `jv4_result_free`).
///
/// # Safety
/// `out` is NULL or writable; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn jv4_result_chunk(
    result: *const jv4_result,
    i: usize,
    k: usize,
    out: *mut jv4_chunk_view,
    err: *mut *mut jv4_error,
) -> jv4_status {
    guard(err, || {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let v = with_item(result, i, |it| {
            let chunks: &[Chunk] = it.embedding.as_ref().and_then(|e| e.chunks.as_deref()).unwrap_or(&[]);
            let c = chunks
                .get(k)
                .ok_or_else(|| Fail::arg(format!("chunk {k}: request {i} has {} chunks", chunks.len())))?;
            let (single, single_len) = view(c.single.as_deref());
            let (multi, _) = view(c.multi.as_ref().map(|m| m.data.as_slice()));
            Ok(jv4_chunk_view {
                single,
                single_len,
                multi,
                multi_rows: c.multi.as_ref().map_or(0, |m| m.rows()),
                multi_dim: c.multi.as_ref().map_or(0, |m| m.dim),
                token_start: c.tokens.start,
                token_end: c.tokens.end,
                char_start: c.chars.start,
                char_end: c.chars.end,
            })
        })?;
        // SAFETY: non-NULL and writable by the contract.
        unsafe { out.write(v) };
        Ok(())
    })
}

/// Frees a result and every view read from it. NULL, or a handle already freed, is a no-op.
///
/// # Safety
/// None; any value is detected. Views read from the result must not be used after this.
#[no_mangle]
pub unsafe extern "C" fn jv4_result_free(result: *mut jv4_result) {
    guard_or((), || free_handle(result.addr(), Kind::Result))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_turns_a_panic_into_a_status_and_a_message() {
        let mut err: *mut jv4_error = ptr::null_mut();
        let code = guard(&mut err, || panic!("boom {}", 42));
        assert_eq!(code, JV4_ERR_PANIC);
        // SAFETY: `err` came from the guard.
        let (c, msg) = unsafe { (jv4_error_code(err), CStr::from_ptr(jv4_error_message(err))) };
        assert_eq!(c, JV4_ERR_PANIC);
        assert!(msg.to_str().unwrap().contains("boom 42"), "{msg:?}");
        // SAFETY: a live handle, freed once, then again (a no-op).
        unsafe {
            jv4_error_free(err);
            jv4_error_free(err);
            assert_eq!(jv4_error_code(err), JV4_ERR_BAD_HANDLE);
        }
        assert_eq!(guard_or(7, || panic!("boom")), 7);
        // With a NULL `err` the failure is still reported by its code.
        assert_eq!(guard(ptr::null_mut(), || panic!("boom")), JV4_ERR_PANIC);
    }

    #[test]
    fn spans_are_checked() {
        let s = |a, b| jv4_span { start: a, end: b };
        let text = "héllo world";
        assert!(check_spans(text, &[s(0, 6), s(7, 12)]).is_ok());
        for (spans, want) in [
            (vec![], "no spans"),
            (vec![s(3, 3)], "empty"),
            (vec![s(0, 13)], "outside"),
            (vec![s(0, 2)], "cuts"),
            (vec![s(0, 6), s(5, 8)], "overlaps"),
            (vec![s(7, 12), s(0, 3)], "overlaps or comes before"),
        ] {
            let f = check_spans(text, &spans).unwrap_err();
            assert_eq!(f.code, JV4_ERR_INPUT);
            assert!(f.msg.contains(want), "{spans:?}: {}", f.msg);
        }
    }
}
