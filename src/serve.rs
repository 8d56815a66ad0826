//! The `jv4 serve` command: opens the engine and runs the HTTP server of [`jv4::server`] until
//! SIGTERM or SIGINT, then finishes the requests in flight and exits 0.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use jv4::engine::text::DEFAULT_MAX_LENGTH;
use jv4::server::{Server, ServerOptions};
use jv4::{Device, Engine, EngineOptions, Error, Limits, Truncation};

/// The command's flags.
#[derive(Args)]
pub struct ServeArgs {
    /// The model folder (checkpoint + tokenizer.json), a Hugging Face cache folder or a hub cache.
    #[arg(long)]
    model: PathBuf,
    /// tokenizer.json, when the model folder has none.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda", value_parser = super::parse_device)]
    device: Device,
    /// Several devices, one copy of the model each, sharing the requests (instead of --device):
    /// all (every GPU the driver reports) or a list (0,1,... or cuda:0,cuda:1 or cpu,cpu).
    #[arg(long, conflicts_with = "device")]
    devices: Option<String>,
    /// Task adapters on the GPU: stacked (the default, the more faithful) or merged (faster,
    /// ≈ 11 GB more memory, less faithful; see `jv4 embed --help`).
    #[arg(long, default_value = "stacked", value_parser = super::parse_lora)]
    lora: jv4::LoraMode,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0 to serve the network).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// API key clients must send as `Authorization: Bearer <key>` (default $JV4_API_KEY; none:
    /// no key needed). /health needs none.
    #[arg(long)]
    api_key: Option<String>,
    /// Model name answered when a request names none.
    #[arg(long, default_value = "jina-embeddings-v4")]
    served_model_name: String,
    /// Requests admitted at once (queued or running); past it requests get 429 + Retry-After.
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// Inputs per request; more get 413.
    #[arg(long, default_value_t = 2048)]
    max_inputs: usize,
    /// Largest request body (default 64MiB); larger get 413.
    #[arg(long, default_value = "64MiB", value_parser = super::parse_size_usize)]
    max_request_bytes: usize,
    /// Seconds a request may take; past it 504 and its queued inputs are cancelled.
    #[arg(long, default_value_t = 60.0)]
    request_timeout_s: f64,
    /// Inputs of one request handed to the engine at a time, so that small requests interleave
    /// with a large one (docs/SERVER.md).
    #[arg(long, default_value_t = 32)]
    fair_window: usize,
    /// Longest token sequence per input (prompt included); longer inputs get 413 unless the
    /// request says "truncate": true.
    #[arg(long, default_value_t = DEFAULT_MAX_LENGTH)]
    max_length: usize,
    /// Most tokens per forward pass (requests of all connections are packed up to it).
    #[arg(long, default_value_t = 16384)]
    max_batch_tokens: usize,
    /// Most image patches per forward pass.
    #[arg(long, default_value_t = 16384)]
    max_batch_patches: usize,
    /// Milliseconds a forward that is not full waits for more requests (0: none).
    #[arg(long, default_value_t = 0)]
    batch_wait_ms: u64,
    /// Activation memory budget (e.g. 20GiB); default $JV4_MEM_BUDGET, else 90% of free memory.
    #[arg(long, value_parser = super::parse_size)]
    mem_budget: Option<u64>,
    /// Longest text in bytes (default 2MiB); longer get 413.
    #[arg(long, value_parser = super::parse_size_usize)]
    max_text_bytes: Option<usize>,
    /// Longest base64 image string (default 45MiB); longer get 413.
    #[arg(long, value_parser = super::parse_size_usize)]
    max_base64_bytes: Option<usize>,
}

pub fn run(a: ServeArgs) -> jv4::Result<()> {
    let d = Limits::default();
    let limits = Limits {
        max_text_bytes: a.max_text_bytes.unwrap_or(d.max_text_bytes),
        max_base64_bytes: a.max_base64_bytes.unwrap_or(d.max_base64_bytes),
        ..d
    };
    if !(a.request_timeout_s > 0.0 && a.request_timeout_s.is_finite()) {
        return Err(Error::Input("--request-timeout-s must be a positive number".into()));
    }
    let devices = a.devices.as_deref().map(Device::parse_list).transpose()?.unwrap_or_default();
    let opts = EngineOptions {
        device: a.device,
        devices,
        max_batch_tokens: a.max_batch_tokens,
        max_batch_patches: a.max_batch_patches,
        mem_budget: a.mem_budget,
        // Never strict: a request's "truncate" decides (413 when it is false and tokens were cut).
        truncation: Truncation { max_length: a.max_length, strict: false },
        batch_wait: Duration::from_millis(a.batch_wait_ms),
        tokenizer: a.tokenizer,
        limits,
        lora: a.lora,
        ..EngineOptions::default()
    };
    let api_key = a.api_key.or_else(|| std::env::var("JV4_API_KEY").ok()).filter(|k| !k.is_empty());
    let sopts = ServerOptions {
        served_model_name: a.served_model_name,
        api_key,
        max_queue: a.max_queue,
        max_inputs: a.max_inputs,
        max_request_bytes: a.max_request_bytes,
        request_timeout: Duration::from_secs_f64(a.request_timeout_s),
        fair_window: a.fair_window,
    };
    let engine = Engine::open(&a.model, opts)?;
    let server = Server::bind(engine.clone(), sopts, SocketAddr::new(a.host, a.port))?;
    eprintln!("jv4 serve: {} on http://{}", engine.describe(), server.local_addr());
    server.run(jv4::server::signals())?;
    eprintln!("jv4 serve: stopped");
    Ok(())
}
