//! `GET /metrics`: Prometheus text format (version 0.0.4). What it holds is listed in
//! docs/SERVER.md: requests by route and status, latency histograms by route, errors by kind,
//! queue depth, inputs, the engine's forwards / sequences / tokens (with tokens/s over the last
//! interval), forwards by batch size, and the device memory.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::Shared;

/// Upper bounds (seconds) of the latency histogram buckets.
const LATENCY_BOUNDS: [f64; 16] =
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0];

#[derive(Default)]
struct Histogram {
    /// Per bucket (not cumulative), then the overflow.
    counts: [u64; LATENCY_BOUNDS.len() + 1],
    sum: f64,
}

/// The server's own counters (the engine keeps its own).
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    inputs: AtomicU64,
    /// The engine's token count at the last rate sample, when, and the rate then.
    rate: Mutex<(Instant, u64, f64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            latency: Mutex::default(),
            errors: Mutex::default(),
            inputs: AtomicU64::new(0),
            rate: Mutex::new((Instant::now(), 0, 0.0)),
        }
    }
}

impl Metrics {
    /// A request answered: its route, status, time and (for an error) its kind.
    pub fn request(&self, route: &'static str, status: u16, took: Duration, error: Option<&'static str>) {
        *self.requests.lock().expect("metrics lock").entry((route, status)).or_default() += 1;
        let s = took.as_secs_f64();
        let mut lat = self.latency.lock().expect("metrics lock");
        let h = lat.entry(route).or_default();
        let b = LATENCY_BOUNDS.iter().position(|&u| s <= u).unwrap_or(LATENCY_BOUNDS.len());
        h.counts[b] += 1;
        h.sum += s;
        drop(lat);
        if let Some(kind) = error {
            *self.errors.lock().expect("metrics lock").entry(kind).or_default() += 1;
        }
    }

    /// Inputs embedded.
    pub fn inputs(&self, n: usize) {
        self.inputs.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Tokens/s since the previous sample at least a second ago (the last rate otherwise).
    fn tokens_per_second(&self, tokens: u64) -> f64 {
        let mut r = self.rate.lock().expect("metrics lock");
        let dt = r.0.elapsed().as_secs_f64();
        if dt >= 1.0 {
            r.2 = tokens.saturating_sub(r.1) as f64 / dt;
            *r = (Instant::now(), tokens, r.2);
        }
        r.2
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The whole exposition.
async fn render(sh: &Arc<Shared>) -> String {
    let m = &sh.metrics;
    let mut out = String::new();
    family(&mut out, "jv4_requests_total", "counter", "HTTP requests answered, by route and status.");
    for ((route, status), n) in m.requests.lock().expect("metrics lock").iter() {
        let _ = writeln!(out, "jv4_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
    }
    family(&mut out, "jv4_request_duration_seconds", "histogram", "Time from request to answer, by route.");
    for (route, h) in m.latency.lock().expect("metrics lock").iter() {
        let mut cum = 0u64;
        for (i, u) in LATENCY_BOUNDS.iter().enumerate() {
            cum += h.counts[i];
            let _ =
                writeln!(out, "jv4_request_duration_seconds_bucket{{route=\"{route}\",le=\"{u}\"}} {cum}");
        }
        cum += h.counts[LATENCY_BOUNDS.len()];
        let _ = writeln!(out, "jv4_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "jv4_request_duration_seconds_sum{{route=\"{route}\"}} {}", h.sum);
        let _ = writeln!(out, "jv4_request_duration_seconds_count{{route=\"{route}\"}} {cum}");
    }
    family(&mut out, "jv4_errors_total", "counter", "Error answers, by kind.");
    for (kind, n) in m.errors.lock().expect("metrics lock").iter() {
        let _ = writeln!(out, "jv4_errors_total{{kind=\"{kind}\"}} {n}");
    }
    family(&mut out, "jv4_queue_depth", "gauge", "Requests admitted and not yet answered by the engine.");
    let _ = writeln!(out, "jv4_queue_depth {}", sh.queue_depth());
    family(&mut out, "jv4_queue_capacity", "gauge", "Requests admitted at most (max_queue); past it 429.");
    let _ = writeln!(out, "jv4_queue_capacity {}", sh.opts.max_queue);
    family(&mut out, "jv4_queue_inputs", "gauge", "Inputs of the admitted requests.");
    let _ = writeln!(out, "jv4_queue_inputs {}", sh.queued_inputs.load(Ordering::Relaxed));
    family(&mut out, "jv4_inputs_total", "counter", "Inputs embedded and answered.");
    let _ = writeln!(out, "jv4_inputs_total {}", m.inputs.load(Ordering::Relaxed));

    let st = sh.engine.stats();
    family(&mut out, "jv4_engine_forwards_total", "counter", "Forward passes run.");
    let _ = writeln!(out, "jv4_engine_forwards_total {}", st.forwards);
    family(&mut out, "jv4_engine_sequences_total", "counter", "Sequences embedded.");
    let _ = writeln!(out, "jv4_engine_sequences_total {}", st.sequences);
    family(&mut out, "jv4_engine_tokens_total", "counter", "Tokens embedded.");
    let _ = writeln!(out, "jv4_engine_tokens_total {}", st.tokens);
    family(
        &mut out,
        "jv4_engine_tokens_per_second",
        "gauge",
        "Tokens/s between the last two scrapes (1 s apart at least).",
    );
    let _ = writeln!(out, "jv4_engine_tokens_per_second {:.1}", m.tokens_per_second(st.tokens));
    family(&mut out, "jv4_engine_batch_sequences", "histogram", "Forward passes by sequences packed.");
    let mut cum = 0u64;
    for (bound, n) in sh.engine.batch_sizes() {
        cum += n;
        let le = if bound == usize::MAX { "+Inf".to_string() } else { bound.to_string() };
        let _ = writeln!(out, "jv4_engine_batch_sequences_bucket{{le=\"{le}\"}} {cum}");
    }
    let _ = writeln!(out, "jv4_engine_batch_sequences_sum {}", st.sequences);
    let _ = writeln!(out, "jv4_engine_batch_sequences_count {cum}");

    // The worker answers between forwards: bounded, so that a long forward cannot hang a scrape.
    let engine = sh.engine.clone();
    let mem = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::task::spawn_blocking(move || engine.memory()),
    )
    .await;
    if let Ok(Ok(Ok(mem))) = mem {
        family(&mut out, "jv4_device_weights_bytes", "gauge", "Device memory held by the weights.");
        let _ = writeln!(out, "jv4_device_weights_bytes {}", mem.weights);
        family(
            &mut out,
            "jv4_device_activations_peak_bytes",
            "gauge",
            "Peak activation memory (0 on the CPU).",
        );
        let _ = writeln!(out, "jv4_device_activations_peak_bytes {}", mem.activations_peak);
        family(
            &mut out,
            "jv4_device_activations_budget_bytes",
            "gauge",
            "Activation memory budget (0 on the CPU).",
        );
        let _ = writeln!(out, "jv4_device_activations_budget_bytes {}", mem.activations_budget);
    }
    out
}

/// The handler.
pub(crate) async fn handler(State(sh): State<Arc<Shared>>) -> Response {
    let body = render(&sh).await;
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
