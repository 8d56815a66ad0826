//! The `jv4` binary from the outside: bad input gives a clear message and a non-zero exit, never
//! a panic; a machine without a GPU is told so.

use std::process::{Command, Output};

fn jv4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jv4")).args(args).output().expect("run jv4")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn assert_no_panic(o: &Output) {
    let t = text(o);
    assert!(!t.contains("panicked"), "jv4 panicked:\n{t}");
}

#[test]
fn gpu_report_or_clear_no_gpu_error() {
    let o = jv4(&["gpu"]);
    assert_no_panic(&o);
    if o.status.success() {
        assert!(text(&o).contains("compute capability"), "{}", text(&o));
    } else {
        assert_eq!(o.status.code(), Some(3), "no GPU: exit 3\n{}", text(&o));
        assert!(text(&o).contains("no GPU available"), "{}", text(&o));
    }
}

#[test]
fn info_on_a_missing_folder_names_it() {
    let o = jv4(&["info", "--model", "/nonexistent/jv4-model", "--no-gpu"]);
    assert_no_panic(&o);
    assert_eq!(o.status.code(), Some(5), "a file that cannot be read: exit 5");
    assert!(text(&o).contains("/nonexistent/jv4-model"), "{}", text(&o));
}

#[test]
fn synth_then_info_reports_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let o = jv4(&["synth", "--out", out.to_str().unwrap(), "--seed", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = jv4(&["info", "--model", out.to_str().unwrap(), "--no-gpu"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("tensors: 172 (82 base, 90 adapter)"), "{t}");
    assert!(t.contains("retrieval, text-matching, code"), "{t}");
    assert!(t.contains("ignored (documented): lm_head.weight"), "{t}");
}

fn shared_model_dir() -> std::path::PathBuf {
    match std::env::var_os("JV4_MODEL_DIR") {
        Some(d) => d.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/jina-embeddings-v4"),
    }
}

#[test]
fn tokenize_prints_ids_and_reports_bad_lines() {
    let model = shared_model_dir();
    let model = model.to_str().unwrap();
    let o =
        jv4(&["tokenize", "--model", model, "--task", "text-matching", "--prompt-name", "passage", "hello"]);
    assert!(o.status.success(), "{}", text(&o));
    let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // text-matching always uses "Query: ".
    assert_eq!(line["ids"][0], 2859, "{line}");

    let o = jv4(&["tokenize", "--model", model, "--max-length", "4", "--strict", "a b c d e f g", "ok"]);
    assert_no_panic(&o);
    assert_eq!(o.status.code(), Some(1));
    let lines: Vec<serde_json::Value> = o
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", text(&o));
    assert_eq!(lines[0]["line"], 1);
    assert!(lines[0]["error"].as_str().unwrap().contains("over the limit"), "{}", lines[0]);
    assert!(lines[1]["ids"].is_array(), "the good text is still served: {}", lines[1]);
}

#[test]
fn unknown_task_and_prompt_are_rejected_with_the_choices() {
    for (flag, bad) in [("--task", "classification"), ("--prompt-name", "document")] {
        let o = jv4(&["tokenize", "--tokenizer", "/dev/null", flag, bad, "x"]);
        assert_no_panic(&o);
        assert_ne!(o.status.code(), Some(0));
        let t = text(&o);
        assert!(t.contains(bad), "{t}");
    }
}

/// The README's main job: a synthetic model folder embedded end to end on the CPU backend, texts
/// and an image, a bad line answered alone.
#[test]
fn synth_then_embed_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    let o = jv4(&["synth", "--out", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let input = dir.path().join("in.jsonl");
    let mut lines = std::fs::read_to_string(root.join("examples/requests.jsonl")).unwrap();
    let image = root.join("tests/fixtures/images/grad_224x224.png");
    lines = lines.replace("tests/fixtures/images/grad_224x224.png", image.to_str().unwrap());
    lines.push_str("{\"id\": \"bad\", \"text\": \"x\", \"dims\": 300}\n");
    std::fs::write(&input, lines).unwrap();
    let o = jv4(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--input",
        input.to_str().unwrap(),
        "--vector",
        "both",
    ]);
    assert_no_panic(&o);
    assert_eq!(o.status.code(), Some(1), "one bad line: exit 1\n{}", text(&o));
    let out: Vec<serde_json::Value> = o
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let ids: Vec<String> = out.iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["q1", "p1", "c1", "img", "bad"], "results in input order");
    for v in &out[..4] {
        let e = v["embedding"].as_array().unwrap_or_else(|| panic!("{v}"));
        let norm: f64 = e.iter().map(|x| x.as_f64().unwrap().powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{v}");
        assert!(!v["multi_vector"].as_array().unwrap().is_empty());
    }
    assert_eq!(out[2]["embedding"].as_array().unwrap().len(), 128, "the line's own dims");
    assert!(out[4]["error"].as_str().unwrap().contains("Matryoshka"), "{}", out[4]);
}

/// Runs jv4 with its standard output already closed by the reader (as `| head -1` does once it
/// has its line), so that the first write gets EPIPE.
fn jv4_closed_stdout(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_jv4"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run jv4");
    drop(child.stdout.take());
    child.wait_with_output().expect("wait for jv4")
}

fn synth_model(dir: &std::path::Path) -> std::path::PathBuf {
    let model = dir.join("m");
    let o = jv4(&["synth", "--out", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    model
}

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth_model(dir.path());
    let m = model.to_str().unwrap();
    let o = jv4_closed_stdout(&["info", "--model", m, "--no-gpu", "--tensors"]);
    assert_no_panic(&o);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains("error"), "quiet: {}", text(&o));

    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
    let o =
        jv4_closed_stdout(&["embed", "--model", m, "--device", "cpu", "--input", input.to_str().unwrap()]);
    assert_no_panic(&o);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains("Broken pipe"), "quiet: {}", text(&o));
}

#[test]
fn embed_checks_its_files_before_loading_the_model() {
    let dir = tempfile::tempdir().unwrap();
    // The model folder does not exist: the input and output errors must come first.
    let o = jv4(&["embed", "--model", "/nonexistent/model", "--input", "/nonexistent/in.jsonl"]);
    assert_no_panic(&o);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("/nonexistent/in.jsonl"), "{}", text(&o));
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"text\": \"a\"}\n").unwrap();
    let i = input.to_str().unwrap();
    let o =
        jv4(&["embed", "--model", "/nonexistent/model", "--input", i, "--output", "/nonexistent/o.jsonl"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("/nonexistent/o.jsonl"), "{}", text(&o));
    // A directory as input used to be read forever (EISDIR on every read).
    let o = jv4(&["embed", "--model", "/nonexistent/model", "--input", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
}

#[test]
fn exit_codes_are_distinct() {
    let dir = tempfile::tempdir().unwrap();
    // 2: usage (clap).
    let o = jv4(&["embed"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let model = synth_model(dir.path());
    let m = model.to_str().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\": 18446744073709551615, \"text\": \"a\"}\n{\"id\": 0.1, \"text\": \"b\"}\n{\"text\": 3}\n",
    )
    .unwrap();
    let i = input.to_str().unwrap();
    // 1: some lines failed; numeric ids come back exactly as given.
    let o = jv4(&["embed", "--model", m, "--device", "cpu", "--input", i]);
    assert_no_panic(&o);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    assert!(out.lines().next().unwrap().contains("\"id\":18446744073709551615"), "{out}");
    assert!(out.lines().nth(1).unwrap().contains("\"id\":0.1"), "{out}");
    // 3: no GPU (only where there is none).
    let o = jv4(&["embed", "--model", m, "--device", "cuda", "--input", i]);
    if !o.status.success() && text(&o).contains("no GPU available") {
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    }
}

#[test]
fn embed_on_several_devices_equals_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth_model(dir.path());
    let input = dir.path().join("in.jsonl");
    let lines: String =
        (0..7).map(|i| format!("{{\"id\": \"{i}\", \"text\": \"line {i} of the input\"}}\n")).collect();
    std::fs::write(&input, lines).unwrap();
    let run = |device: &[&str]| {
        let mut args = vec!["embed", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()];
        args.extend_from_slice(device);
        jv4(&args)
    };
    let one = run(&["--device", "cpu"]);
    assert!(one.status.success(), "{}", text(&one));
    let two = run(&["--devices", "cpu,cpu"]);
    assert!(two.status.success(), "{}", text(&two));
    assert_eq!(one.stdout, two.stdout, "the same lines, in the same order");
    let bad = run(&["--devices", "cpu,gpu"]);
    assert_no_panic(&bad);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(text(&bad).contains("or all, or a list"), "{}", text(&bad));
    let mixed = run(&["--devices", "cpu,0"]);
    assert_eq!(mixed.status.code(), Some(1), "{}", text(&mixed));
    assert!(text(&mixed).contains("all CUDA or all cpu"), "{}", text(&mixed));
    let both = run(&["--device", "cpu", "--devices", "cpu"]);
    assert_eq!(both.status.code(), Some(2), "--device and --devices conflict\n{}", text(&both));
    let serve = jv4(&["serve", "--model", model.to_str().unwrap(), "--devices", "cpu,gpu", "--port", "0"]);
    assert_no_panic(&serve);
    assert_eq!(serve.status.code(), Some(1), "{}", text(&serve));
    assert!(text(&serve).contains("or all, or a list"), "{}", text(&serve));
    let all = run(&["--devices", "all"]);
    assert_no_panic(&all);
    if !all.status.success() {
        assert_eq!(all.status.code(), Some(3), "no GPU: exit 3\n{}", text(&all));
        assert!(text(&all).contains("no GPU available"), "{}", text(&all));
    }
}
