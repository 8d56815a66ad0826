//! `jv4`: the command-line runner. Today it inspects a checkpoint (and loads it onto the GPU),
//! tokenizes text with the task prompts, and reports the GPU and the compiled kernels; it becomes
//! the embedding runner in the next milestones.

use std::process::ExitCode;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use jv4::engine::output::EmbeddingType;
use jv4::engine::text::{TextTokenizer, DEFAULT_MAX_LENGTH};
use jv4::{Device, Engine, EngineOptions, Error, Limits, OutputKind, PromptName, Task, Truncation};

mod embed;
mod serve;

#[derive(Parser)]
#[command(name = "jv4", version, about = "jina-embeddings-v4 on NVIDIA GPUs", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per run: the size of the largest variant (embed's flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Open a checkpoint folder, validate every tensor against the config, report what it holds,
    /// and (unless --no-gpu) load it onto the GPU and report the load time.
    Info {
        /// The model folder (config.json, model*.safetensors[.index.json], adapters/, ...).
        #[arg(long)]
        model: PathBuf,
        /// Validate on the host only; do not touch the GPU.
        #[arg(long)]
        no_gpu: bool,
        /// Which GPU (CUDA device ordinal).
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// List every tensor (canonical name, stored name, dtype, shape).
        #[arg(long)]
        tensors: bool,
    },
    /// Turn text into the model's token ids, with the task's prompt ("Query: " / "Passage: ").
    /// Texts come from the arguments, or one per line from standard input. Prints one JSON line
    /// per text: {"text", "ids", "dropped"}, or {"line", "error"} for a text that fails.
    Tokenize {
        /// The model folder holding tokenizer.json.
        #[arg(long, conflicts_with = "tokenizer", required_unless_present = "tokenizer")]
        model: Option<PathBuf>,
        /// A tokenizer.json file (instead of --model).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Task: retrieval, text-matching or code (text-matching always uses the "Query" prompt).
        #[arg(long, default_value = "retrieval", value_parser = parse_task)]
        task: Task,
        /// Prompt: query or passage.
        #[arg(long, default_value = "query", value_parser = parse_prompt)]
        prompt_name: PromptName,
        /// Longest token sequence kept (prompt included); longer texts are cut on the right.
        #[arg(long, default_value_t = DEFAULT_MAX_LENGTH)]
        max_length: usize,
        /// Make a text longer than --max-length an error instead of truncating it.
        #[arg(long)]
        strict: bool,
        /// Texts; when none are given, read one per line from standard input.
        texts: Vec<String>,
    },
    /// Embed texts and images. Input: JSON lines `{"text": ..., "id"?, "task"?, "prompt_name"?,
    /// "dims"?, "late_chunking"?}` or `{"image": "<path>" | "image_base64": "...", "id"?, "task"?,
    /// "max_pixels"?}` from --input or standard input; "late_chunking" is `{"chunk_size": N}` or
    /// `{"spans": [[start, end], ...]}` (byte offsets of the text). Output: JSON lines `{"id",
    /// "embedding"?, "multi_vector"?, "chunks"?: [{"tokens": [a, b], "chars": [s, e],
    /// "embedding"?, "multi_vector"?}]}` (or `{"id", "error"}` for a line that fails; the others
    /// are still served), a .npy matrix of the single vectors, or a .npz of the multi-vectors
    /// (`data`, `offsets`, and `single` with --vector both).
    Embed {
        /// The model folder (checkpoint + tokenizer.json), a Hugging Face cache folder
        /// (`models--jinaai--jina-embeddings-v4`, its snapshot from refs/main) or a hub cache
        /// holding one.
        #[arg(long)]
        model: PathBuf,
        /// tokenizer.json, when the model folder has none (e.g. a synthetic checkpoint).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Default task for lines without "task": retrieval, text-matching or code.
        #[arg(long, default_value = "retrieval", value_parser = parse_task)]
        task: Task,
        /// Default prompt for lines without "prompt_name": query or passage.
        #[arg(long, default_value = "query", value_parser = parse_prompt)]
        prompt_name: PromptName,
        /// Matryoshka width of the single vector (128, 256, 512, 1024 or 2048).
        #[arg(long)]
        dims: Option<usize>,
        /// Which outputs: single (pooled), multi (per token) or both.
        #[arg(long, value_enum, default_value_t = VectorArg::Single)]
        vector: VectorArg,
        /// Input JSONL file (default: standard input). A progress bar goes to stderr.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Output file: .jsonl (default: standard output), .npy (single vectors only) or .npz
        /// (multi-vectors: `data` [rows, width] and int64 `offsets` [lines + 1]; with --vector
        /// both also `single`).
        #[arg(long)]
        output: Option<PathBuf>,
        /// JSONL vectors as arrays of numbers (float) or one base64 string of the little-endian
        /// bytes each (base64, as OpenAI's encoding_format).
        #[arg(long, value_enum, default_value_t = EncodingArg::Float)]
        encoding: EncodingArg,
        /// Element type: float (f32), binary (packed sign bits as int8, u − 128), ubinary (packed
        /// sign bits as uint8; most significant bit first) or int8 (fixed range [−1, 1]);
        /// see `jv4::engine::output`.
        #[arg(long, default_value = "float", value_parser = parse_embedding_type)]
        embedding_type: EmbeddingType,
        /// Longest token sequence kept per text (prompt included); longer texts are truncated
        /// with a warning.
        #[arg(long, default_value_t = DEFAULT_MAX_LENGTH)]
        max_length: usize,
        /// Make a text longer than --max-length an error for its line instead of truncating it.
        #[arg(long)]
        strict: bool,
        /// Most tokens per forward pass (requests are packed up to it).
        #[arg(long, default_value_t = 16384)]
        max_batch_tokens: usize,
        /// Most image patches per forward pass; a larger image is resized down to fit.
        #[arg(long, default_value_t = 16384)]
        max_batch_patches: usize,
        /// Activation memory budget (e.g. 20GiB); default $JV4_MEM_BUDGET, else 90% of free memory.
        #[arg(long, value_parser = parse_size)]
        mem_budget: Option<u64>,
        /// Where to run: cpu (the exact f32 forward: slow, for machines without a GPU), cuda or
        /// cuda:N.
        #[arg(long, default_value = "cuda", value_parser = parse_device)]
        device: Device,
        /// Several devices, one copy of the model each, sharing the work (instead of --device):
        /// all (every GPU the driver reports), a list of ordinals (0,1,...) or of devices
        /// (cuda:0,cuda:1 or cpu,cpu).
        #[arg(long, conflicts_with = "device")]
        devices: Option<String>,
        /// Milliseconds a forward that is not full waits for more requests (0: none).
        #[arg(long, default_value_t = 0)]
        batch_wait_ms: u64,
        /// Task adapters on the GPU: stacked (one base weight, two extra GEMMs per projection; the
        /// more faithful) or merged (one weight per task: ≈ 20% faster on documents, ≈ 11 GB more
        /// memory, about twice stacked's error against fp32).
        #[arg(long, default_value = "stacked", value_parser = parse_lora)]
        lora: jv4::LoraMode,
        /// Longest input line (default 48MiB); a longer line is an error of its own.
        #[arg(long, value_parser = parse_size_usize)]
        max_line_bytes: Option<usize>,
        /// Longest text in bytes (default 2MiB); a longer text is refused (not cut).
        #[arg(long, value_parser = parse_size_usize)]
        max_text_bytes: Option<usize>,
        /// Longest image_base64 string (default 45MiB).
        #[arg(long, value_parser = parse_size_usize)]
        max_base64_bytes: Option<usize>,
        /// Largest image file or encoded image (default 32MiB).
        #[arg(long, value_parser = parse_size)]
        max_image_file_bytes: Option<u64>,
        /// Most pixels (width x height) of a decoded image (default 178956970, PIL's limit).
        #[arg(long)]
        max_image_pixels: Option<u64>,
        /// Read image paths only from inside this folder (symlinks resolved; relative paths are
        /// taken from it).
        #[arg(long)]
        image_root: Option<PathBuf>,
    },
    /// Serve embeddings over HTTP: the OpenAI API (POST /v1/embeddings, with jina's task,
    /// image, multi-vector and late-chunking extensions), text-embeddings-inference's POST /embed
    /// and /embed_all, GET /health, /info and /metrics (docs/SERVER.md). Requests from all
    /// connections are packed into shared forwards. Stops on SIGTERM / SIGINT after finishing
    /// the requests in flight.
    Serve(serve::ServeArgs),
    /// Write a random checkpoint in the exact on-disk layout of the real one (for tests and
    /// benchmarks where the real weights are not available).
    Synth {
        /// Where to write it (created).
        #[arg(long)]
        out: PathBuf,
        /// Shapes: tiny (a few MB) or full (the real 3.8B shapes, about 8 GB).
        #[arg(long, value_enum, default_value_t = PresetArg::Tiny)]
        preset: PresetArg,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Store the LoRA tensors as f32 instead of bf16.
        #[arg(long)]
        f32_adapters: bool,
    },
    /// Open the GPU and report it: name, compute capability, memory, driver, kernels loaded.
    Gpu {
        /// Which GPU (CUDA device ordinal).
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Activation memory budget for the paged allocator (e.g. 20GiB); default
        /// $JV4_MEM_BUDGET, else 90% of the free device memory.
        #[arg(long)]
        mem_budget: Option<String>,
    },
    /// List the compiled kernels and the target they were built for.
    Kernels {
        /// Also print each module's ptxas report (registers, spills, shared memory).
        #[arg(long)]
        ptxas: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum VectorArg {
    Single,
    Multi,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EncodingArg {
    Float,
    Base64,
}

fn parse_embedding_type(s: &str) -> Result<EmbeddingType, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

#[derive(Clone, Copy, ValueEnum)]
enum PresetArg {
    Tiny,
    Full,
}

fn parse_lora(s: &str) -> Result<jv4::LoraMode, String> {
    match s {
        "merged" => Ok(jv4::LoraMode::Merged),
        "stacked" => Ok(jv4::LoraMode::Stacked),
        _ => Err(format!("{s:?}: expected stacked or merged")),
    }
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_size(s: &str) -> Result<u64, String> {
    jv4::parse_bytes(s).map_err(|e| e.to_string())
}

fn parse_size_usize(s: &str) -> Result<usize, String> {
    usize::try_from(parse_size(s)?).map_err(|e| e.to_string())
}

fn parse_task(s: &str) -> Result<Task, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_prompt(s: &str) -> Result<PromptName, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

/// The exit status of a failed run (docs/RELIABILITY.md): 1 bad input (lines that failed, an
/// invalid request or model folder), 2 usage error (clap's own), 3 no GPU, 4 the GPU was lost
/// during the run, 5 a file could not be read or written. A closed standard output (`| head`)
/// ends the run quietly with 0.
fn exit_code(e: &Error) -> u8 {
    match e {
        Error::NoGpu(_) => 3,
        Error::DeviceLost(_) => 4,
        Error::Io { .. } => 5,
        _ => 1,
    }
}

fn is_closed_pipe(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Long-running runs (embed, serve): RSS flat under mixed loads (jv4::host_malloc).
    jv4::host_malloc::fix_mmap_threshold();
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Prints to standard output, returning a write failure (a closed pipe) as an error, not a panic.
fn out(s: &str) -> jv4::Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(s.as_bytes()).and_then(|()| o.flush()).map_err(|e| Error::io("standard output", e))
}

/// Checks, before the model loads, that the input can be read and the output written.
fn check_files(input: Option<&std::path::Path>, output: Option<&std::path::Path>) -> jv4::Result<()> {
    if let Some(p) = input {
        let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        if f.metadata().map_err(|e| Error::io(p, e))?.is_dir() {
            return Err(Error::io(p, std::io::Error::from(std::io::ErrorKind::IsADirectory)));
        }
    }
    if let Some(p) = output {
        // Writable? Opened without truncating; a file made only for this check is removed again,
        // so that a run that fails writes no (empty) output file.
        let existed = p.exists();
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .map_err(|e| Error::io(p, e))?;
        if !existed {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(())
}

fn run(cmd: Cmd) -> jv4::Result<()> {
    match cmd {
        Cmd::Info { model, no_gpu, device, tensors } => {
            out(&jv4::diag::checkpoint_report(&model, no_gpu, device, tensors)?)
        }
        Cmd::Tokenize { model, tokenizer, task, prompt_name, max_length, strict, texts } => {
            let tok = match (&model, &tokenizer) {
                (_, Some(file)) => TextTokenizer::from_file(file)?,
                (Some(dir), None) => TextTokenizer::from_model_dir(dir)?,
                (None, None) => unreachable!("clap requires one of --model, --tokenizer"),
            };
            tokenize(&tok, task, prompt_name, Truncation { max_length, strict }, texts)
        }
        Cmd::Embed {
            model,
            tokenizer,
            task,
            prompt_name,
            dims,
            vector,
            input,
            output,
            encoding,
            embedding_type,
            max_length,
            strict,
            max_batch_tokens,
            max_batch_patches,
            mem_budget,
            device,
            devices,
            batch_wait_ms,
            lora,
            max_line_bytes,
            max_text_bytes,
            max_base64_bytes,
            max_image_file_bytes,
            max_image_pixels,
            image_root,
        } => {
            let output_kind = match vector {
                VectorArg::Single => OutputKind::Single,
                VectorArg::Multi => OutputKind::Multi,
                VectorArg::Both => OutputKind::Both,
            };
            let ext = output.as_ref().and_then(|p| p.extension()).and_then(|e| e.to_str());
            let file = match ext {
                Some("npy") => embed::FileKind::Npy,
                Some("npz") => embed::FileKind::Npz,
                _ => embed::FileKind::Jsonl,
            };
            if file == embed::FileKind::Npy && output_kind != OutputKind::Single {
                return Err(Error::Input(
                    "--output .npy holds single vectors only; use .npz or .jsonl for multi".into(),
                ));
            }
            if file == embed::FileKind::Npz && output_kind == OutputKind::Single {
                return Err(Error::Input(
                    "--output .npz holds multi-vectors: use --vector multi or both (or .npy for single)"
                        .into(),
                ));
            }
            if file != embed::FileKind::Jsonl && encoding == EncodingArg::Base64 {
                return Err(Error::Input("--encoding base64 applies to .jsonl output only".into()));
            }
            let format = embed::Format { file, base64: encoding == EncodingArg::Base64, ty: embedding_type };
            let d = Limits::default();
            let limits = Limits {
                max_line_bytes: max_line_bytes.unwrap_or(d.max_line_bytes),
                max_text_bytes: max_text_bytes.unwrap_or(d.max_text_bytes),
                max_base64_bytes: max_base64_bytes.unwrap_or(d.max_base64_bytes),
                max_image_file_bytes: max_image_file_bytes.unwrap_or(d.max_image_file_bytes),
                max_image_pixels: max_image_pixels.unwrap_or(d.max_image_pixels),
                image_root,
            };
            limits.validate()?;
            check_files(input.as_deref(), output.as_deref())?;
            let devices = devices.as_deref().map(Device::parse_list).transpose()?.unwrap_or_default();
            let opts = EngineOptions {
                device,
                devices,
                max_batch_tokens,
                mem_budget,
                truncation: Truncation { max_length, strict },
                max_batch_patches,
                batch_wait: std::time::Duration::from_millis(batch_wait_ms),
                tokenizer,
                limits: limits.clone(),
                lora,
                ..EngineOptions::default()
            };
            let engine = Engine::open(&model, opts)?;
            let defaults =
                jv4::engine::jsonl::Defaults { task, prompt: prompt_name, output: output_kind, dims, limits };
            embed::run(&engine, &defaults, input.as_deref(), output.as_deref(), format)
        }
        Cmd::Serve(args) => serve::run(args),
        Cmd::Synth { out, preset, seed, f32_adapters } => {
            let t0 = Instant::now();
            jv4::diag::synth(&out, matches!(preset, PresetArg::Full), seed, f32_adapters)?;
            self::out(&format!("wrote {} in {:.1} s\n", out.display(), t0.elapsed().as_secs_f64()))
        }
        Cmd::Gpu { device, mem_budget } => out(&jv4::diag::gpu_report(device, mem_budget.as_deref())?),
        Cmd::Kernels { ptxas } => out(&jv4::diag::kernels_report(ptxas)),
    }
}

fn tokenize(
    tok: &TextTokenizer,
    task: Task,
    prompt: PromptName,
    trunc: Truncation,
    texts: Vec<String>,
) -> jv4::Result<()> {
    let texts: Vec<String> = if texts.is_empty() {
        let mut lines = Vec::new();
        for (i, line) in std::io::stdin().lock().lines().enumerate() {
            match line {
                Ok(l) => lines.push(l),
                Err(e) => return Err(Error::Input(format!("standard input line {}: {e}", i + 1))),
            }
        }
        lines
    } else {
        texts
    };
    let items: Vec<_> = texts.iter().map(|t| (task, prompt, t.as_str())).collect();
    let mut out = std::io::stdout().lock();
    let mut failed = 0;
    for (i, (text, result)) in texts.iter().zip(tok.encode_batch_prompted(&items, trunc)).enumerate() {
        let line = match result {
            Ok(enc) => {
                if enc.dropped > 0 {
                    eprintln!(
                        "warning: text {} truncated to {} tokens ({} dropped)",
                        i + 1,
                        enc.ids.len(),
                        enc.dropped
                    );
                }
                serde_json::json!({"text": text, "ids": enc.ids, "dropped": enc.dropped})
            }
            Err(e) => {
                failed += 1;
                serde_json::json!({"line": i + 1, "error": e.to_string()})
            }
        };
        writeln!(out, "{line}").map_err(|e| Error::io("standard output", e))?;
    }
    if failed > 0 {
        return Err(Error::Input(format!("{failed} of {} texts failed", texts.len())));
    }
    Ok(())
}
