//! `jv4-bench serve-load`: a load generator for `jv4 serve` (loopback only: it talks to the URL
//! it is given, bounded in time and count). Two parts:
//!
//! 1. 16-token queries (random token ids, as `jv4-bench engine`'s query16) at each concurrency
//!    level: that many connections, each sending one request after another until the level's
//!    time or request budget is spent. Prints requests/s, p50 and p99 latency, errors.
//! 2. The text benches' 256-document mix (`docs256`: 16–1024 tokens) sent as concurrent
//!    single-document requests, one connection each, all at once: tokens/s (median of the reps).
//!
//! Requests ask for `encoding_format: "base64"` (what the openai client sends by default).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use jv4::rng::Rng;
use jv4::server::client::{parse_url, Client};
use jv4::{Error, Result};
use serde_json::{json, Value};

/// The settings of one run.
pub struct LoadOptions {
    pub url: String,
    pub api_key: Option<String>,
    pub concurrency: Vec<usize>,
    pub seconds: f64,
    pub max_requests: usize,
    pub docs: usize,
    pub reps: usize,
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::Internal(format!("{what}: {e}"))
}

/// One POST of `body` to /v1/embeddings on `c`; checks a 200 with `n` results.
fn embed(c: &mut Client, key: &Option<String>, body: &[u8], n: usize) -> std::result::Result<(), String> {
    let auth = key.as_ref().map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let r = c.request("POST", "/v1/embeddings", &headers, body).map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("status {}: {}", r.status, r.text()));
    }
    let v: Value = r.json().map_err(|e| e.to_string())?;
    match v["data"].as_array() {
        Some(d) if d.len() == n => Ok(()),
        _ => Err(format!("expected {n} results: {}", r.text())),
    }
}

fn body(ids: &[u32]) -> Vec<u8> {
    json!({"input": [ids], "model": "jina-embeddings-v4", "encoding_format": "base64"})
        .to_string()
        .into_bytes()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(o: &LoadOptions, doc_lengths: &[usize]) -> Result<()> {
    let addr: SocketAddr = parse_url(&o.url).map_err(|e| io(&o.url, e))?;
    let timeout = Duration::from_secs(120);
    let info = Client::connect(addr, timeout)
        .and_then(|mut c| c.get("/info"))
        .map_err(|e| io("GET /info", e))?
        .json()
        .map_err(|e| io("GET /info", e))?;
    // Random ids below the first vision token id (a text may not hold those), as `engine` does.
    let vision_min =
        info["vision_token_ids"].as_array().into_iter().flatten().filter_map(Value::as_u64).min();
    let vocab =
        info["vocab_size"].as_u64().unwrap_or(1000).min(vision_min.unwrap_or(u64::MAX)).min(150_000) as usize;
    println!("server: {} on {}", info["model_id"], info["device"]);
    let mut rng = Rng::new(2);
    let query = |rng: &mut Rng| -> Vec<u32> { (0..16).map(|_| rng.below(vocab) as u32).collect() };

    // Warm-up: a few queries on one connection.
    let mut c = Client::connect(addr, timeout).map_err(|e| io("connect", e))?;
    for _ in 0..8 {
        embed(&mut c, &o.api_key, &body(&query(&mut rng)), 1).map_err(Error::Internal)?;
    }
    drop(c);

    println!("16-token queries ({:.0} s or {} requests per level at most):", o.seconds, o.max_requests);
    println!(
        "{:>11} {:>9} {:>10} {:>9} {:>9} {:>7}",
        "concurrency", "requests", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for &conc in &o.concurrency {
        let per_conn = o.max_requests.div_ceil(conc.max(1));
        let bodies: Vec<Vec<Vec<u8>>> =
            (0..conc).map(|_| (0..per_conn).map(|_| body(&query(&mut rng))).collect()).collect();
        let deadline = Instant::now() + Duration::from_secs_f64(o.seconds);
        let t0 = Instant::now();
        let per: Vec<(Vec<f64>, Vec<String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = bodies
                .iter()
                .map(|mine| {
                    s.spawn(move || {
                        let (mut lat, mut errs) = (Vec::new(), Vec::new());
                        let mut c = match Client::connect(addr, timeout) {
                            Ok(c) => c,
                            Err(e) => return (lat, vec![e.to_string()]),
                        };
                        for b in mine {
                            if Instant::now() >= deadline {
                                break;
                            }
                            let t = Instant::now();
                            match embed(&mut c, &o.api_key, b, 1) {
                                Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                                Err(e) => {
                                    errs.push(e);
                                    match Client::connect(addr, timeout) {
                                        Ok(n) => c = n,
                                        Err(_) => break,
                                    }
                                }
                            }
                        }
                        (lat, errs)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("load thread")).collect()
        });
        let wall = t0.elapsed().as_secs_f64();
        let mut lat: Vec<f64> = per.iter().flat_map(|(l, _)| l.iter().copied()).collect();
        let errors: Vec<&String> = per.iter().flat_map(|(_, e)| e).collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{conc:>11} {:>9} {:>10.0} {:>9.2} {:>9.2} {:>7}",
            lat.len(),
            lat.len() as f64 / wall,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            errors.len()
        );
        if let Some(e) = errors.first() {
            println!("  first error: {e}");
        }
    }

    let lengths = &doc_lengths[..o.docs.min(doc_lengths.len())];
    let docs: Vec<Vec<u32>> =
        lengths.iter().map(|&n| (0..n).map(|_| rng.below(vocab) as u32).collect()).collect();
    let tokens: usize = lengths.iter().sum();
    let bodies: Vec<Vec<u8>> = docs.iter().map(|d| body(d)).collect();
    let mut times = Vec::new();
    for _ in 0..o.reps.max(1) {
        // Connect first, so that the timing holds the requests only.
        let mut conns: Vec<Client> = (0..bodies.len())
            .map(|_| Client::connect(addr, timeout))
            .collect::<std::io::Result<_>>()
            .map_err(|e| io("connect", e))?;
        let t0 = Instant::now();
        let errs: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = conns
                .iter_mut()
                .zip(&bodies)
                .map(|(c, b)| s.spawn(move || embed(c, &o.api_key, b, 1).err()))
                .collect();
            hs.into_iter().filter_map(|h| h.join().expect("doc thread")).collect()
        });
        times.push(t0.elapsed().as_secs_f64());
        if let Some(e) = errs.first() {
            return Err(Error::Internal(format!(
                "{} of {} documents failed; first: {e}",
                errs.len(),
                bodies.len()
            )));
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let sec = times[times.len() / 2];
    println!(
        "docs{} as {} concurrent single-document requests: {tokens} tokens in {:.2} ms (median of {}): {:.0} tokens/s",
        lengths.len(),
        lengths.len(),
        sec * 1e3,
        times.len(),
        tokens as f64 / sec
    );
    Ok(())
}
