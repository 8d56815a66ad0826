//! `jv4 serve`: an HTTP embedding server on one [`Engine`] (docs/SERVER.md).
//!
//! - `POST /v1/embeddings`: the OpenAI embeddings API, with the jina API's extensions on the
//!   same route (`openai.rs`).
//! - `POST /embed`, `POST /embed_all`: text-embeddings-inference's shape (`tei.rs`).
//! - `GET /health`, `GET /info`, `GET /metrics` (Prometheus text, `metrics.rs`).
//!
//! The async side (tokio + axum, HTTP/1.1) only reads bodies, parses them and writes answers. A
//! request's inputs go to the engine from a blocking thread ([`tokio::task::spawn_blocking`]):
//! [`Engine::embed_with`] tokenizes and decodes there, off the connection threads, and the
//! engine's worker packs the requests of every connection into shared forwards (dynamic
//! batching across requests, under the token and patch budgets and the engine's wait window).
//!
//! Limits: a request over the input count, body size, text or base64 size, or (without
//! `truncate`) the token limit is answered 413; past `max_queue` requests admitted at once the
//! server answers 429 with `Retry-After` (a bounded queue, nothing dropped silently); a request
//! that runs past its timeout is answered 504 and its queued inputs are cancelled, as they are
//! when the client disconnects. Fairness: each request is handed to the engine in windows of
//! `fair_window` inputs, at most two windows queued at a time; the worker serves in arrival
//! order, so a small request waits behind at most two windows of a large one.

pub mod client;
mod metrics;
mod openai;
mod tei;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{oneshot, Semaphore};

use crate::engine::{CallOptions, Cancel, Embedding, Engine, Request};
use crate::{Error, Result};
use metrics::Metrics;

/// Server settings (the engine's are in [`crate::EngineOptions`]).
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The model name `/v1/embeddings` answers with when a request names none, and `/info` shows.
    pub served_model_name: String,
    /// When set, every route but `/health` needs `Authorization: Bearer <key>` (else 401).
    pub api_key: Option<String>,
    /// Requests admitted at once (queued in the engine or running); past it: 429 + Retry-After.
    pub max_queue: usize,
    /// Inputs in one request (else 413).
    pub max_inputs: usize,
    /// Bytes of one request body (else 413).
    pub max_request_bytes: usize,
    /// How long a request may take; past it: 504 and its queued inputs are cancelled.
    pub request_timeout: Duration,
    /// Inputs of one request handed to the engine at a time (the fairness rule, docs/SERVER.md).
    pub fair_window: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            served_model_name: "jina-embeddings-v4".into(),
            api_key: None,
            max_queue: 1024,
            max_inputs: 2048,
            max_request_bytes: 64 << 20,
            request_timeout: Duration::from_secs(60),
            fair_window: 32,
        }
    }
}

/// What every handler shares.
pub(crate) struct Shared {
    pub engine: Engine,
    pub opts: ServerOptions,
    /// Admission: one permit per request admitted (held until the engine has answered it).
    queue: Arc<Semaphore>,
    /// Inputs of the admitted requests (a gauge for /metrics).
    pub queued_inputs: Arc<AtomicUsize>,
    /// Set once shutdown has begun: new requests are answered 503.
    pub draining: AtomicBool,
    /// Set when the engine reported its device lost: /health answers 503.
    pub unhealthy: AtomicBool,
    pub metrics: Metrics,
}

impl Shared {
    /// Requests admitted and not yet answered by the engine.
    pub fn queue_depth(&self) -> usize {
        self.opts.max_queue - self.queue.available_permits()
    }
}

/// How an error body is shaped: OpenAI's `{"error": {"message", "type", "code"}}` or
/// text-embeddings-inference's `{"error", "error_type"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Style {
    OpenAi,
    Tei,
}

/// A request that is answered with an error status.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    /// Short name of the kind (the `errors_total{kind}` label and the error `type`/`code`).
    pub kind: &'static str,
    pub message: String,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), retry_after: None }
    }

    /// 400: the request is malformed; the message names the field.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 413: over a per-request cap; the message names the cap.
    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    fn retry(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    /// The error of input `i` of a request, by the engine error's kind.
    pub fn engine(i: usize, e: &Error) -> ApiError {
        let msg = format!("input[{i}]: {e}");
        match e {
            Error::Input(_) | Error::Tokenizer(_) => ApiError::bad(msg),
            Error::OutOfMemory { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "out_of_memory", msg).retry(1)
            }
            Error::Cancelled(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cancelled", msg).retry(1),
            Error::DeviceLost(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "device_lost", msg),
            Error::NonFinite(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "non_finite", msg),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
        }
    }

    pub fn into_response(self, style: Style) -> Response {
        let body = match style {
            Style::OpenAi => json!({"error": {
                "message": self.message, "type": self.kind, "param": null, "code": self.status.as_u16(),
            }}),
            Style::Tei => json!({"error": self.message, "error_type": self.kind}),
        };
        let mut r = json_response(self.status, body.to_string());
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r.extensions_mut().insert(ErrorKind(self.kind));
        r
    }
}

/// The kind of an error response, for the metrics layer.
#[derive(Clone, Copy)]
struct ErrorKind(&'static str);

/// A JSON response.
pub(crate) fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Sets the cancel flag when dropped, unless disarmed: the handler's future is dropped when its
/// client disconnects, which gives up on the request's queued inputs.
struct CancelOnDrop(Option<Cancel>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.cancel();
        }
    }
}

/// The body of a request, within [`ServerOptions::max_request_bytes`].
pub(crate) async fn read_body(
    sh: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> std::result::Result<Value, ApiError> {
    let max = sh.opts.max_request_bytes;
    let over =
        || ApiError::too_large(format!("request body over the limit of {max} bytes (max_request_bytes)"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(over());
    }
    let bytes = axum::body::to_bytes(body, max).await.map_err(|_| over())?;
    // Large bodies (base64 images) are parsed off the connection threads.
    let parse = move || {
        serde_json::from_slice::<Value>(&bytes)
            .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}")))
    };
    if declared.unwrap_or(0) > 256 << 10 {
        tokio::task::spawn_blocking(parse)
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    } else {
        parse()
    }
}

/// Embeds a request's inputs: admission (429 past the queue bound), the engine call on a blocking
/// thread in fairness windows, the timeout (504) and cancellation when the caller goes away.
/// Every input's result, or the first input's error.
pub(crate) async fn embed(
    sh: &Arc<Shared>,
    reqs: Vec<Request>,
) -> std::result::Result<Vec<Embedding>, ApiError> {
    if sh.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
        .retry(1));
    }
    let permit = sh.queue.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!("the queue is full ({} requests in flight, max_queue); retry later", sh.opts.max_queue),
        )
        .retry(1)
    })?;
    let n = reqs.len();
    let cancel = Cancel::new();
    let guard = CancelOnDrop(Some(cancel.clone()));
    let (tx, rx) = oneshot::channel();
    let (engine, inputs) = (sh.engine.clone(), sh.queued_inputs.clone());
    let call = CallOptions { cancel: Some(cancel), window: sh.opts.fair_window };
    inputs.fetch_add(n, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || {
        let results = engine.embed_with(&reqs, &call);
        inputs.fetch_sub(n, Ordering::Relaxed);
        drop(permit);
        let _ = tx.send(results);
    });
    let results = match tokio::time::timeout(sh.opts.request_timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the engine call was lost",
            ))
        }
        Err(_) => {
            drop(guard); // cancels what is still queued
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "the request took longer than {:?} (request_timeout); its queued inputs were cancelled",
                    sh.opts.request_timeout
                ),
            ));
        }
    };
    let mut guard = guard;
    guard.0 = None; // answered: nothing to cancel
    sh.metrics.inputs(n);
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.map_err(|e| {
                if matches!(e, Error::DeviceLost(_)) {
                    sh.unhealthy.store(true, Ordering::Relaxed);
                }
                ApiError::engine(i, &e)
            })
        })
        .collect()
}

/// 413 for an input the engine truncated when the request asked for no truncation.
pub(crate) fn check_truncation(
    sh: &Shared,
    truncate: bool,
    results: &[Embedding],
) -> std::result::Result<(), ApiError> {
    if truncate {
        return Ok(());
    }
    match results.iter().position(|e| e.dropped > 0) {
        None => Ok(()),
        Some(i) => Err(ApiError::too_large(format!(
            "input[{i}]: {} tokens, over the limit of {} tokens (max_length); send \"truncate\": true to cut it",
            results[i].tokens + results[i].dropped,
            sh.engine.truncation().max_length
        ))),
    }
}

/// A server bound to its address, not yet serving.
pub struct Server {
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds `addr` (port 0: any free port) for `engine`.
    pub fn bind(engine: Engine, opts: ServerOptions, addr: SocketAddr) -> Result<Server> {
        if opts.max_queue == 0 || opts.max_inputs == 0 || opts.fair_window == 0 || opts.max_request_bytes == 0
        {
            return Err(Error::Input(
                "max_queue, max_inputs, fair_window and max_request_bytes must be at least 1".into(),
            ));
        }
        let listener = std::net::TcpListener::bind(addr).map_err(|e| Error::io(addr.to_string(), e))?;
        listener.set_nonblocking(true).map_err(|e| Error::io(addr.to_string(), e))?;
        let shared = Arc::new(Shared {
            queue: Arc::new(Semaphore::new(opts.max_queue)),
            engine,
            opts,
            queued_inputs: Arc::new(AtomicUsize::new(0)),
            draining: AtomicBool::new(false),
            unhealthy: AtomicBool::new(false),
            metrics: Metrics::default(),
        });
        Ok(Server { listener, shared })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `stop` completes, then stops accepting and finishes the requests in flight
    /// (at most `request_timeout` + 5 s more) before it returns.
    pub fn run(self, stop: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let workers = std::thread::available_parallelism().map_or(4, |n| n.get()).clamp(2, 16);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .max_blocking_threads(self.shared.opts.max_queue + 64)
            .thread_name("jv4-serve")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the server's runtime: {e}")))?;
        let drain = self.shared.opts.request_timeout + Duration::from_secs(5);
        let shared = self.shared.clone();
        let result = rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(self.listener)
                .map_err(|e| Error::Internal(format!("cannot listen: {e}")))?;
            let (began_tx, began_rx) = oneshot::channel::<()>();
            let sh = shared.clone();
            let signal = async move {
                stop.await;
                sh.draining.store(true, Ordering::Relaxed);
                let _ = began_tx.send(());
            };
            // No Nagle delay on small answers (a query's vector is one short write).
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let serve = axum::serve(listener, router(shared)).with_graceful_shutdown(signal);
            let cap = async move {
                if began_rx.await.is_ok() {
                    tokio::time::sleep(drain).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                r = serve => r.map_err(|e| Error::Internal(format!("the server failed: {e}"))),
                () = cap => {
                    eprintln!("jv4 serve: requests still open {drain:?} after shutdown began; stopping anyway");
                    Ok(())
                }
            }
        });
        rt.shutdown_timeout(Duration::from_secs(5));
        result
    }

    /// Serves on a thread of its own until [`Running::stop`] (for tests and embedding hosts).
    pub fn spawn(self) -> Running {
        let addr = self.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("jv4-serve-main".into())
            .spawn(move || {
                self.run(async move {
                    let _ = rx.await;
                })
            })
            .expect("cannot start the server thread");
        Running { addr, stop: Some(tx), thread: Some(thread) }
    }
}

/// A server serving on its own thread.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    /// Begins the graceful shutdown and waits for it to finish.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::Internal("the server thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C): the stop signal of `jv4 serve`.
pub async fn signals() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            eprintln!("jv4 serve: cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/embeddings", post(openai::embeddings))
        .route("/embed", post(tei::embed_single))
        .route("/embed_all", post(tei::embed_all))
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics::handler))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), track))
        .with_state(shared)
}

/// The route label of a path (a fixed set, so that metrics stay bounded).
fn route_of(path: &str) -> &'static str {
    match path {
        "/v1/embeddings" | "/embeddings" => "/v1/embeddings",
        "/embed" => "/embed",
        "/embed_all" => "/embed_all",
        "/health" => "/health",
        "/info" => "/info",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

fn style_of(route: &str) -> Style {
    if route == "/v1/embeddings" {
        Style::OpenAi
    } else {
        Style::Tei
    }
}

/// Around every request: the API key, then the metrics (status, latency, error kind).
async fn track(State(sh): State<Arc<Shared>>, req: HttpRequest, next: Next) -> Response {
    let t0 = Instant::now();
    let route = route_of(req.uri().path());
    let response = match &sh.opts.api_key {
        Some(key) if route != "/health" && !authorized(req.headers(), key) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key (Authorization: Bearer <key>)",
        )
        .into_response(style_of(route)),
        _ => next.run(req).await,
    };
    let kind = response.extensions().get::<ErrorKind>().map(|k| k.0);
    sh.metrics.request(route, response.status().as_u16(), t0.elapsed(), kind);
    response
}

/// Whether the `Authorization: Bearer` header holds `key` (compared in constant time).
fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(given) = given.strip_prefix("Bearer ").map(str::trim) else {
        return false;
    };
    let (a, b) = (given.as_bytes(), key.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn not_found(req: HttpRequest) -> Response {
    let route = route_of(req.uri().path());
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
    .into_response(style_of(route))
}

async fn health(State(sh): State<Arc<Shared>>) -> Response {
    if sh.unhealthy.load(Ordering::Relaxed) {
        return json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "device lost"}).to_string());
    }
    if sh.draining.load(Ordering::Relaxed) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "shutting down"}).to_string(),
        );
    }
    json_response(StatusCode::OK, json!({"status": "ok"}).to_string())
}

async fn info(State(sh): State<Arc<Shared>>) -> Response {
    let cfg = sh.engine.config();
    let o = &sh.opts;
    let sp = &cfg.special;
    let vision_ids: Vec<u32> = [sp.vision_start_token_id, sp.image_token_id, sp.vision_end_token_id]
        .into_iter()
        .chain(sp.vision_token_id)
        .chain(sp.video_token_id)
        .collect();
    let body = json!({
        "model_id": o.served_model_name,
        "version": env!("CARGO_PKG_VERSION"),
        "device": sh.engine.describe(),
        "hidden_size": cfg.text.hidden_size,
        "vocab_size": cfg.text.vocab_size,
        // Token-id inputs may not hold these (only an image's block does).
        "vision_token_ids": vision_ids,
        "matryoshka_dims": cfg.matryoshka_dims,
        "multi_vector_dim": cfg.multi_vector_projector_dim,
        "tasks": openai::TASKS.iter().map(|(n, _, _)| n).collect::<Vec<_>>(),
        "max_input_length": sh.engine.truncation().max_length,
        "max_client_batch_size": o.max_inputs,
        "max_request_bytes": o.max_request_bytes,
        "max_concurrent_requests": o.max_queue,
        "request_timeout_s": o.request_timeout.as_secs_f64(),
        "fair_window": o.fair_window,
    });
    json_response(StatusCode::OK, body.to_string())
}
