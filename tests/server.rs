//! `jv4 serve` (src/server) on the CPU backend with a synthetic tiny model, over loopback: each
//! endpoint's shape, results equal to `Engine::embed` called directly (bit for bit), the error
//! codes (400 naming the field, 401, 404, 413, 429 + Retry-After, 504), 200 concurrent requests,
//! a client that disconnects mid-request, fairness between a large and a small request, graceful
//! shutdown; and the engine's cancel hook (`Engine::embed_with`) on its own.

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use jv4::engine::output::{quantize, EmbeddingType};
use jv4::engine::{CallOptions, Cancel};
use jv4::model::synth::{write_checkpoint, Preset, SynthSpec};
use jv4::model::Dtype;
use jv4::server::client::{Client, Response};
use jv4::server::{Running, Server, ServerOptions};
use jv4::{Chunking, Device, Embedding, Engine, EngineOptions, Error, OutputKind, PromptName, Request, Task};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(120);

struct Fixture {
    _dir: tempfile::TempDir,
    engine: Engine,
    server: Option<Running>,
    addr: SocketAddr,
}

impl Fixture {
    fn new(eng: impl FnOnce(&mut EngineOptions), srv: impl FnOnce(&mut ServerOptions)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec { seed: 11, preset: Preset::Tiny, adapter_dtype: Dtype::BF16 };
        write_checkpoint(dir.path(), &spec).unwrap();
        let mut eo = EngineOptions { device: Device::Cpu, preprocess_threads: 2, ..EngineOptions::default() };
        eng(&mut eo);
        let engine = Engine::open(dir.path(), eo).unwrap();
        let mut so = ServerOptions::default();
        srv(&mut so);
        let server = Server::bind(engine.clone(), so, "127.0.0.1:0".parse().unwrap()).unwrap().spawn();
        let addr = server.addr;
        Fixture { _dir: dir, engine, server: Some(server), addr }
    }

    fn plain() -> Fixture {
        Fixture::new(|_| {}, |_| {})
    }

    fn client(&self) -> Client {
        Client::connect(self.addr, TIMEOUT).unwrap()
    }

    fn post(&self, path: &str, body: Value) -> Response {
        self.client().post(path, &body).unwrap()
    }

    fn one(&self, r: Request) -> Embedding {
        self.engine.embed(&[r]).pop().unwrap().unwrap()
    }

    /// A gauge or counter of /metrics.
    fn metric(&self, name: &str) -> f64 {
        let text = self.client().get("/metrics").unwrap().text();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
            .parse()
            .unwrap()
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn b64_floats(v: &Value) -> Vec<f32> {
    let bytes = jv4::engine::jsonl::base64_decode(v.as_str().unwrap()).unwrap();
    bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn ok_json(r: &Response) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json().unwrap()
}

/// An error answer with this status whose message contains `what`.
fn error(r: &Response, status: u16, what: &str) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json().unwrap();
    let msg =
        v["error"]["message"].as_str().or(v["error"].as_str()).unwrap_or_else(|| panic!("no message: {v}"));
    assert!(msg.contains(what), "{msg:?} does not name {what:?}");
    v
}

fn long_text(words: usize, tag: usize) -> String {
    let mut s: String = (0..words).map(|i| format!("w{} ", (i * 7 + tag) % 50)).collect();
    s.push_str(&tag.to_string());
    s
}

#[test]
fn openai_route_equals_the_engine() {
    let f = Fixture::plain();
    let texts = ["What is the capital of France?", "Paris is the capital of France.", ""];
    let v = ok_json(&f.post("/v1/embeddings", json!({"input": texts, "model": "m1"})));
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "m1");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let mut tokens = 0;
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(data[i]["object"], "embedding");
        assert_eq!(data[i]["index"], i);
        let e = f.one(Request::text(*t));
        tokens += e.tokens;
        assert_eq!(bits(&floats(&data[i]["embedding"])), bits(e.single.as_ref().unwrap()), "input {i}");
    }
    assert_eq!(v["usage"]["prompt_tokens"], tokens);
    assert_eq!(v["usage"]["total_tokens"], tokens);

    // A single string; the served model name when none is given.
    let v = ok_json(&f.post("/v1/embeddings", json!({"input": "hello"})));
    assert_eq!(v["model"], "jina-embeddings-v4");
    assert_eq!(floats(&v["data"][0]["embedding"]), f.one(Request::text("hello")).single.unwrap());

    // Token ids: one list, and a list of lists.
    let ids: Vec<u32> = vec![5, 17, 99, 3];
    let want = f.one(Request::tokens(ids.clone())).single.unwrap();
    let v = ok_json(&f.post("/v1/embeddings", json!({"input": ids})));
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(bits(&floats(&v["data"][0]["embedding"])), bits(&want));
    let v = ok_json(&f.post("/v1/embeddings", json!({"input": [ids, [7, 8]]})));
    assert_eq!(bits(&floats(&v["data"][0]["embedding"])), bits(&want));
    assert_eq!(floats(&v["data"][1]["embedding"]), f.one(Request::tokens(vec![7, 8])).single.unwrap());

    // dimensions, base64, task.
    let want =
        f.one(Request::text("abc").task(Task::Code).prompt(PromptName::Passage).dims(128)).single.unwrap();
    let v = ok_json(&f.post(
        "/v1/embeddings",
        json!({"input": ["abc"], "dimensions": 128, "encoding_format": "base64", "task": "code.passage"}),
    ));
    let got = b64_floats(&v["data"][0]["embedding"]);
    assert_eq!(got.len(), 128);
    assert_eq!(bits(&got), bits(&want));
    let v = ok_json(&f.post(
        "/v1/embeddings",
        json!({"input": "abc", "task": "text-matching", "embedding_type": "base64"}),
    ));
    assert_eq!(
        b64_floats(&v["data"][0]["embedding"]),
        f.one(Request::text("abc").task(Task::TextMatching)).single.unwrap()
    );
}

#[test]
fn openai_route_jina_extensions() {
    let f = Fixture::plain();
    // {"text"} items, multi-vectors, binary types.
    let e = f.one(Request::text("a text").output(OutputKind::Multi));
    let m = e.multi.as_ref().unwrap();
    let v = ok_json(
        &f.post("/v1/embeddings", json!({"input": [{"text": "a text"}], "return_multivector": true})),
    );
    let rows = v["data"][0]["embedding"].as_array().unwrap();
    assert_eq!(rows.len(), m.rows());
    for (r, row) in rows.iter().enumerate() {
        assert_eq!(bits(&floats(row)), bits(m.row(r)));
    }
    let v = ok_json(&f.post("/v1/embeddings", json!({"input": ["a text"], "embedding_type": "ubinary"})));
    let want = quantize(f.one(Request::text("a text")).single.as_ref().unwrap(), EmbeddingType::Ubinary);
    assert_eq!(v["data"][0]["embedding"], want.to_json(false));
    let v = ok_json(&f.post(
        "/v1/embeddings",
        json!({"input": ["a text"], "embedding_type": "binary", "return_multivector": true, "encoding_format": "base64"}),
    ));
    let bytes: Vec<u8> =
        (0..m.rows()).flat_map(|r| quantize(m.row(r), EmbeddingType::Binary).to_le_bytes()).collect();
    assert_eq!(v["data"][0]["embedding"], jv4::engine::output::base64_encode(&bytes));

    // Late chunking: the inputs joined by spaces, one vector per input.
    let parts = ["First sentence here.", "Second one.", "And a third"];
    let joined = parts.join(" ");
    let spans = vec![(0, 20), (21, 32), (33, joined.len())];
    let e = f
        .one(Request::text(joined.clone()).prompt(PromptName::Passage).late_chunking(Chunking::Spans(spans)));
    let v =
        ok_json(&f.post(
            "/v1/embeddings",
            json!({"input": parts, "late_chunking": true, "task": "retrieval.passage"}),
        ));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, c) in e.chunks.as_ref().unwrap().iter().enumerate() {
        assert_eq!(data[i]["index"], i);
        assert_eq!(bits(&floats(&data[i]["embedding"])), bits(c.single.as_ref().unwrap()), "chunk {i}");
    }
    assert_eq!(v["usage"]["total_tokens"], e.tokens);

    // An image as base64 and as a data URL.
    let png = std::fs::read(first_image().expect("a PNG or JPEG in tests/fixtures/images")).unwrap();
    let b64 = jv4::engine::output::base64_encode(&png);
    let want = f.one(Request::image_bytes(png.clone())).single.unwrap();
    let v = ok_json(&f.post(
        "/v1/embeddings",
        json!({"input": [{"image": b64}, {"image": format!("data:image/png;base64,{b64}")}]}),
    ));
    assert_eq!(bits(&floats(&v["data"][0]["embedding"])), bits(&want));
    assert_eq!(bits(&floats(&v["data"][1]["embedding"])), bits(&want));
}

fn first_image() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let mut v: Vec<_> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    v.into_iter().find(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
}

#[test]
fn tei_routes_equal_the_engine() {
    let f = Fixture::plain();
    let v = ok_json(&f.post("/embed", json!({"inputs": "hi there"})));
    assert_eq!(bits(&floats(&v[0])), bits(f.one(Request::text("hi there")).single.as_ref().unwrap()));
    let v = ok_json(&f.post(
        "/embed",
        json!({"inputs": ["x", "y z"], "prompt_name": "passage", "normalize": true, "truncate": true}),
    ));
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(
        bits(&floats(&v[1])),
        bits(f.one(Request::text("y z").prompt(PromptName::Passage)).single.as_ref().unwrap())
    );
    let e = f.one(Request::text("many tokens here").output(OutputKind::Multi));
    let v = ok_json(&f.post("/embed_all", json!({"inputs": ["many tokens here"]})));
    let rows = v[0].as_array().unwrap();
    assert_eq!(rows.len(), e.tokens);
    assert_eq!(bits(&floats(&rows[1])), bits(e.multi.as_ref().unwrap().row(1)));
    // TEI's error shape.
    let r = f.post("/embed", json!({"inputs": "x", "normalize": false}));
    assert_eq!(error(&r, 400, "normalize")["error_type"], "invalid_request");
    error(&f.post("/embed", json!({"input": "x"})), 400, "\"inputs\"");
}

#[test]
fn health_info_metrics_and_404() {
    let f = Fixture::plain();
    assert_eq!(ok_json(&f.client().get("/health").unwrap())["status"], "ok");
    let info = ok_json(&f.client().get("/info").unwrap());
    assert_eq!(info["hidden_size"], f.engine.config().text.hidden_size);
    assert_eq!(info["max_client_batch_size"], 2048);
    assert_eq!(info["tasks"][0], "retrieval.query");
    let r = f.client().get("/v2/nothing").unwrap();
    error(&r, 404, "/v2/nothing");
    ok_json(&f.post("/v1/embeddings", json!({"input": ["a", "b"]})));
    error(&f.post("/v1/embeddings", json!({"input": 3})), 400, "\"input\"");
    let m = f.client().get("/metrics").unwrap();
    assert_eq!(m.status, 200);
    let text = m.text();
    for want in [
        "jv4_requests_total{route=\"/v1/embeddings\",status=\"200\"} 1",
        "jv4_requests_total{route=\"/v1/embeddings\",status=\"400\"} 1",
        "jv4_requests_total{route=\"other\",status=\"404\"} 1",
        "jv4_errors_total{kind=\"invalid_request\"} 1",
        "jv4_request_duration_seconds_count{route=\"/v1/embeddings\"} 2",
        "jv4_queue_depth 0",
        "jv4_inputs_total 2",
        "jv4_engine_batch_sequences_bucket{le=\"+Inf\"}",
        "jv4_device_weights_bytes",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    assert_eq!(f.metric("jv4_engine_sequences_total"), f.engine.stats().sequences as f64);
}

#[test]
fn bad_requests_name_what_is_wrong() {
    let f = Fixture::plain();
    let mut c = f.client();
    let r = c.request("POST", "/v1/embeddings", &[], b"{not json").unwrap();
    error(&r, 400, "not valid JSON");
    // The connection stays usable after an error.
    let cases = [
        (json!([1, 2]), "JSON object"),
        (json!({}), "missing \"input\""),
        (json!({"input": []}), "empty list"),
        (json!({"input": [[]]}), "input[0]: an empty list of token ids"),
        (json!({"input": [[1, -2]]}), "input[0][1]"),
        (json!({"input": ["ok", 5]}), "input[1]"),
        (json!({"input": [{"txt": "a"}]}), "input[0]"),
        (json!({"input": [{"image": "https://example.com/a.png"}]}), "URLs are not fetched"),
        (json!({"input": [{"image": "!!!"}]}), "input[0].image: not base64"),
        (json!({"input": "a", "task": "retrieval.both"}), "task \"retrieval.both\""),
        (json!({"input": "a", "dimensions": 100}), "\"dimensions\" 100"),
        (json!({"input": "a", "dimensions": "big"}), "\"dimensions\" must be"),
        (json!({"input": "a", "encoding_format": "hex"}), "encoding_format"),
        (json!({"input": "a", "embedding_type": "int4"}), "embedding_type"),
        (json!({"input": "a", "return_multivector": "yes"}), "return_multivector"),
        (json!({"input": [{"image": "AAAA"}], "late_chunking": true}), "late_chunking takes texts only"),
        (json!({"input": [[4000000000u64]]}), "input[0]"),
    ];
    for (body, what) in cases {
        let r = c.post("/v1/embeddings", &body).unwrap();
        let v = error(&r, 400, what);
        assert_eq!(v["error"]["type"], "invalid_request", "{v}");
    }
    // Still healthy.
    ok_json(&c.post("/v1/embeddings", &json!({"input": "fine"})).unwrap());
}

#[test]
fn limits_answer_413_and_the_api_key_401() {
    let f = Fixture::new(
        |e| {
            e.truncation.max_length = 8;
            e.limits.max_text_bytes = 100;
        },
        |s| {
            s.max_inputs = 3;
            s.max_request_bytes = 1000;
            s.api_key = Some("sekret".into());
        },
    );
    let auth = [("Authorization", "Bearer sekret")];
    let post = |body: Value, headers: &[(&str, &str)]| {
        f.client().request("POST", "/v1/embeddings", headers, body.to_string().as_bytes()).unwrap()
    };
    // 401 without the key or with a wrong one; /health needs none.
    error(&post(json!({"input": "a"}), &[]), 401, "API key");
    error(&post(json!({"input": "a"}), &[("Authorization", "Bearer sekreT")]), 401, "API key");
    let r = f.client().request("POST", "/embed", &[], json!({"inputs": "a"}).to_string().as_bytes()).unwrap();
    assert_eq!(error(&r, 401, "API key")["error_type"], "unauthorized");
    assert_eq!(f.client().get("/health").unwrap().status, 200);
    assert_eq!(f.client().get("/metrics").unwrap().status, 401);
    ok_json(&post(json!({"input": "a"}), &auth));
    // 413: inputs, body bytes, text bytes, tokens without truncate.
    error(&post(json!({"input": ["a", "b", "c", "d"]}), &auth), 413, "max_inputs");
    error(&post(json!({"input": "x".repeat(2000)}), &auth), 413, "max_request_bytes");
    error(&post(json!({"input": ["ok", "y".repeat(101)]}), &auth), 413, "input[1]: text of 101 bytes");
    let long = "one two three four five six seven eight nine ten";
    let r = post(json!({"input": ["short", long]}), &auth);
    assert_eq!(error(&r, 413, "input[1]")["error"]["type"], "too_large");
    let v = ok_json(&post(json!({"input": [long], "truncate": true}), &auth));
    let e = f.one(Request::text(long));
    assert!(e.dropped > 0 && e.tokens == 8);
    assert_eq!(bits(&floats(&v["data"][0]["embedding"])), bits(e.single.as_ref().unwrap()));
}

/// Inputs slow enough on the CPU to keep the engine busy for a while.
fn big_inputs(n: usize, words: usize) -> Vec<String> {
    (0..n).map(|i| long_text(words, i)).collect()
}

#[test]
fn a_full_queue_answers_429_with_retry_after_and_timeouts_504() {
    let f = Fixture::new(
        |_| {},
        |s| {
            s.max_queue = 1;
            s.fair_window = 4;
            s.request_timeout = Duration::from_millis(4000);
        },
    );
    let big = big_inputs(64, 40);
    let addr = f.addr;
    let slow = std::thread::spawn(move || {
        Client::connect(addr, TIMEOUT).unwrap().post("/v1/embeddings", &json!({"input": big})).unwrap()
    });
    // Wait for it to be admitted.
    let t0 = Instant::now();
    while f.metric("jv4_queue_depth") < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the slow request was never admitted");
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = f.post("/v1/embeddings", json!({"input": "small"}));
    error(&r, 429, "queue is full");
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = f.post("/embed", json!({"inputs": "small"}));
    assert_eq!(error(&r, 429, "max_queue")["error_type"], "overloaded");
    // The slow one runs past its timeout: 504, and its queued inputs are cancelled.
    let r = slow.join().unwrap();
    error(&r, 504, "request_timeout");
    let t0 = Instant::now();
    while f.metric("jv4_queue_depth") > 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the timed-out request still holds the queue");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(f.engine.stats().sequences < 64, "the cancelled inputs ran anyway");
    ok_json(&f.post("/v1/embeddings", json!({"input": "small"})));
    assert!(f.metric("jv4_errors_total{kind=\"overloaded\"}") >= 2.0);
    assert_eq!(f.metric("jv4_errors_total{kind=\"timeout\"}"), 1.0);
}

#[test]
fn two_hundred_concurrent_requests_are_all_answered_correctly() {
    let f = Fixture::plain();
    let n = 200;
    let texts: Vec<String> = (0..n).map(|i| format!("q{i}")).collect();
    let reqs: Vec<Request> = texts.iter().map(|t| Request::text(t.clone())).collect();
    let want: Vec<Vec<f32>> = f.engine.embed(&reqs).into_iter().map(|r| r.unwrap().single.unwrap()).collect();
    let forwards0 = f.engine.stats().forwards;
    let t0 = Instant::now();
    let barrier = Arc::new(Barrier::new(n));
    let addr = f.addr;
    let handles: Vec<_> = texts
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr, TIMEOUT).unwrap();
                b.wait();
                let body = if i % 2 == 0 { json!({"input": t}) } else { json!({"inputs": [t]}) };
                let r = c.post(if i % 2 == 0 { "/v1/embeddings" } else { "/embed" }, &body).unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                let v = r.json().unwrap();
                if i % 2 == 0 {
                    floats(&v["data"][0]["embedding"])
                } else {
                    floats(&v[0])
                }
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(bits(&h.join().unwrap()), bits(&want[i]), "request {i}");
    }
    assert!(t0.elapsed() < Duration::from_secs(60), "200 requests took {:?}", t0.elapsed());
    let forwards = f.engine.stats().forwards - forwards0;
    assert!(forwards < n as u64, "{forwards} forwards for {n} concurrent requests: nothing was packed");
}

#[test]
fn a_client_disconnecting_mid_request_leaves_the_server_healthy() {
    let f = Fixture::new(|_| {}, |s| s.fair_window = 4);
    let mut c = f.client();
    c.send("POST", "/v1/embeddings", &[], json!({"input": big_inputs(100, 20)}).to_string().as_bytes())
        .unwrap();
    let t0 = Instant::now();
    while f.metric("jv4_queue_depth") < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    c.stream().shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);
    let t0 = Instant::now();
    while f.metric("jv4_queue_depth") > 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the abandoned request is still queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    let done = f.engine.stats().sequences;
    assert!(done < 50, "{done} of 100 inputs ran after the client went away");
    assert_eq!(ok_json(&f.client().get("/health").unwrap())["status"], "ok");
    let v = ok_json(&f.post("/v1/embeddings", json!({"input": "after"})));
    assert_eq!(floats(&v["data"][0]["embedding"]), f.one(Request::text("after")).single.unwrap());
}

#[test]
fn a_large_request_does_not_starve_a_small_one() {
    let f = Fixture::new(|_| {}, |s| s.fair_window = 2);
    let addr = f.addr;
    let big = big_inputs(64, 10);
    let t_big = Instant::now();
    let big_thread = std::thread::spawn(move || {
        let r =
            Client::connect(addr, TIMEOUT).unwrap().post("/v1/embeddings", &json!({"input": big})).unwrap();
        (r, Instant::now())
    });
    let t0 = Instant::now();
    while f.engine.stats().sequences == 0 {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(5));
    }
    let t_small = Instant::now();
    let v = ok_json(&f.post("/v1/embeddings", json!({"input": "a small query"})));
    let small_done = Instant::now();
    let small = small_done - t_small;
    assert_eq!(floats(&v["data"][0]["embedding"]), f.one(Request::text("a small query")).single.unwrap());
    let (r, big_done) = big_thread.join().unwrap();
    assert_eq!(ok_json(&r)["data"].as_array().unwrap().len(), 64);
    let big = big_done - t_big;
    assert!(small_done < big_done, "the small request ({small:?}) finished after the large one ({big:?})");
    // The small one waits behind at most two windows (4 of the 64 inputs).
    assert!(small * 4 < big, "small request {small:?} vs large request {big:?}");
}

#[test]
fn shutdown_finishes_the_requests_in_flight() {
    let mut f = Fixture::new(|_| {}, |s| s.fair_window = 4);
    let addr = f.addr;
    let inputs = big_inputs(8, 10);
    let want: Vec<Vec<f32>> = f
        .engine
        .embed(&inputs.iter().map(|t| Request::text(t.clone())).collect::<Vec<_>>())
        .into_iter()
        .map(|r| r.unwrap().single.unwrap())
        .collect();
    let seq0 = f.engine.stats().sequences;
    let t = std::thread::spawn(move || {
        Client::connect(addr, TIMEOUT).unwrap().post("/v1/embeddings", &json!({"input": inputs})).unwrap()
    });
    while f.engine.stats().sequences == seq0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    f.server.take().unwrap().stop().unwrap();
    let r = t.join().unwrap();
    let v = ok_json(&r);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(bits(&floats(&v["data"][i]["embedding"])), bits(w), "input {i}");
    }
    assert!(Client::connect(addr, Duration::from_secs(2)).is_err(), "still accepting after shutdown");
}

#[test]
fn cancel_hook_answers_queued_requests_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec { seed: 5, preset: Preset::Tiny, adapter_dtype: Dtype::BF16 };
    write_checkpoint(dir.path(), &spec).unwrap();
    let engine = Engine::open(
        dir.path(),
        EngineOptions { device: Device::Cpu, preprocess_threads: 2, ..Default::default() },
    )
    .unwrap();
    let reqs: Vec<Request> = big_inputs(200, 40).into_iter().map(Request::text).collect();

    // Cancelled before the call: nothing runs.
    let cancel = Cancel::new();
    cancel.cancel();
    let out = engine.embed_with(&reqs, &CallOptions { cancel: Some(cancel), window: 8 });
    assert!(out.iter().all(|r| matches!(r, Err(Error::Cancelled(_)))));
    assert_eq!(engine.stats().sequences, 0);

    // Cancelled mid-call: what ran is right, the rest is answered Cancelled, soon.
    let cancel = Cancel::new();
    let c2 = cancel.clone();
    let e2 = engine.clone();
    let setter = std::thread::spawn(move || {
        while e2.stats().sequences == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        c2.cancel();
        Instant::now()
    });
    let out = engine.embed_with(&reqs, &CallOptions { cancel: Some(cancel), window: 8 });
    let returned = Instant::now();
    let cancelled_at = setter.join().unwrap();
    let ok: Vec<usize> = (0..out.len()).filter(|&i| out[i].is_ok()).collect();
    let n_cancelled = out.iter().filter(|r| matches!(r, Err(Error::Cancelled(_)))).count();
    assert_eq!(ok.len() + n_cancelled, reqs.len(), "every request is answered, ok or cancelled");
    assert!(n_cancelled > 150, "only {n_cancelled} of 200 cancelled");
    assert!(returned - cancelled_at < Duration::from_secs(20));
    let direct = engine.embed(&ok.iter().map(|&i| reqs[i].clone()).collect::<Vec<_>>());
    for (k, &i) in ok.iter().enumerate() {
        assert_eq!(out[i].as_ref().unwrap(), direct[k].as_ref().unwrap(), "request {i}");
    }
    // The engine serves on; a plain call (no cancel) with a small window equals embed.
    let few = &reqs[..5];
    let a = engine.embed_with(few, &CallOptions { cancel: Some(Cancel::new()), window: 2 });
    let b = engine.embed(few);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.as_ref().unwrap(), y.as_ref().unwrap());
    }
}
