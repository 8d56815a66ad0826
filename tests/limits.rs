//! Input limits (docs/RELIABILITY.md): every limit refuses what is over it with a message that
//! names the limit, never blocks, never reads past it, and never echoes a file's contents.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jv4::engine::image::{preprocess_bytes, preprocess_file_with, AlphaMode, ImageConfig};
use jv4::engine::jsonl::{parse_line, Defaults, Line};
use jv4::model::synth::{write_checkpoint, Preset, SynthSpec};
use jv4::model::Dtype;
use jv4::{Device, Engine, EngineOptions, Error, Limits, OutputKind, PromptName, Request, Task};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images").join(name)
}

fn msg<T: std::fmt::Debug>(r: jv4::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// Runs `f` on a thread and fails the test if it takes longer than `limit` (a hang).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("did not finish in time (blocked?)")
}

#[test]
fn dev_zero_is_refused_at_once() {
    let t0 = Instant::now();
    let e = msg(Limits::default().read_image_file(Path::new("/dev/zero")));
    assert!(e.contains("not a regular file (a character device)"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(1));
}

#[test]
fn a_fifo_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.png");
    let ok = std::process::Command::new("mkfifo").arg(&fifo).status().map(|s| s.success());
    if ok.ok() != Some(true) {
        eprintln!("skipped: mkfifo is not available");
        return;
    }
    let e = within(Duration::from_secs(5), move || msg(Limits::default().read_image_file(&fifo)));
    assert!(e.contains("a FIFO"), "{e}");
}

#[test]
fn directories_and_missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = msg(Limits::default().read_image_file(dir.path()));
    assert!(e.contains("a directory"), "{e}");
    let missing = dir.path().join("missing.png");
    let r = Limits::default().read_image_file(&missing);
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    assert!(msg(r).contains("missing.png"));
}

#[test]
fn files_over_the_size_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("big.png");
    std::fs::write(&f, vec![7u8; 1001]).unwrap();
    let limits = Limits { max_image_file_bytes: 1000, ..Limits::default() };
    let e = msg(limits.read_image_file(&f));
    assert!(e.contains("over the limit of 1000 bytes (max_image_file_bytes)"), "{e}");
    std::fs::write(&f, vec![7u8; 1000]).unwrap();
    assert_eq!(limits.read_image_file(&f).unwrap().len(), 1000);
}

#[test]
fn error_messages_never_echo_file_contents() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("secret.png");
    std::fs::write(&f, b"SECRET-password=hunter2\n").unwrap();
    let e = msg(preprocess_file_with(&f, &ImageConfig::default(), AlphaMode::Drop, &Limits::default()));
    assert!(e.contains("secret.png") && e.contains("unrecognised image format"), "{e}");
    // Neither the text nor its hex (53 45 43 = "SEC") may appear.
    assert!(!e.contains("SECRET") && !e.contains("hunter2") && !e.to_lowercase().contains("534543"), "{e}");
}

#[cfg(unix)]
#[test]
fn image_root_refuses_escapes_and_symlinks_out() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let inside = root.path().join("a.png");
    std::fs::copy(fixture("grad_224x224.png"), &inside).unwrap();
    let secret = outside.path().join("s.png");
    std::fs::copy(fixture("grad_224x224.png"), &secret).unwrap();
    std::os::unix::fs::symlink(&secret, root.path().join("link.png")).unwrap();
    std::os::unix::fs::symlink(&inside, root.path().join("inner_link.png")).unwrap();
    let limits = Limits { image_root: Some(root.path().into()), ..Limits::default() };

    assert!(limits.read_image_file(Path::new("a.png")).is_ok(), "relative paths come from the root");
    assert!(limits.read_image_file(&inside).is_ok());
    assert!(limits.read_image_file(Path::new("inner_link.png")).is_ok(), "a link that stays inside");
    for p in [
        PathBuf::from("link.png"),
        PathBuf::from("../").join(outside.path().file_name().unwrap()).join("s.png"),
        secret.clone(),
        PathBuf::from("/etc/hostname"),
    ] {
        let e = msg(limits.read_image_file(&p));
        assert!(e.contains("outside the image root") || e.contains("No such file"), "{}: {e}", p.display());
    }
    let e = msg(limits.read_image_file(Path::new("link.png")));
    assert!(e.contains("outside the image root"), "{e}");
}

#[test]
fn the_pixel_limit_reaches_jpeg_and_webp() {
    for name in ["partial_196x308.jpg", "big_600x800.webp", "grad_224x224.png"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let mut cfg = ImageConfig::default();
        assert!(preprocess_bytes(&bytes, &cfg, AlphaMode::Drop).is_ok(), "{name}");
        cfg.limits.max_pixels = 1000;
        let e = msg(preprocess_bytes(&bytes, &cfg, AlphaMode::Drop));
        assert!(e.contains("too large") && e.contains("1000 pixels"), "{name}: {e}");
    }
}

fn defaults(limits: Limits) -> Defaults {
    Defaults {
        task: Task::Retrieval,
        prompt: PromptName::Query,
        output: OutputKind::Single,
        dims: None,
        limits,
    }
}

fn line_err(l: Line) -> String {
    match l {
        Line::Err(_, m) => m,
        Line::Ok(id, r) => panic!("expected an error, got {id} {r:?}"),
    }
}

#[test]
fn lines_and_base64_over_their_limits_are_refused() {
    let d = defaults(Limits { max_line_bytes: 64, max_base64_bytes: 8, ..Limits::default() });
    let long = format!("{{\"text\": \"{}\"}}", "a".repeat(100));
    assert!(line_err(parse_line(1, Ok(long.into_bytes()), &d)).contains("max_line_bytes"));
    let b64 = br#"{"image_base64": "aGVsbG8gd29ybGQ="}"#.to_vec();
    assert!(line_err(parse_line(2, Ok(b64), &d)).contains("max_base64_bytes"));
    assert!(matches!(parse_line(3, Ok(br#"{"text": "ok"}"#.to_vec()), &d), Line::Ok(..)));
}

#[test]
fn numeric_ids_are_kept_exactly_or_refused() {
    let d = defaults(Limits::default());
    for id in ["18446744073709551615", "-9223372036854775808", "0.1", "1.5e-7", "3", "2.5"] {
        let l = parse_line(1, Ok(format!("{{\"id\": {id}, \"text\": \"x\"}}").into_bytes()), &d);
        match l {
            Line::Ok(v, _) => assert_eq!(v.to_string(), id),
            Line::Err(_, m) => panic!("{id}: {m}"),
        }
    }
    for id in ["18446744073709551616", "1.50", "1e3", "123456789012345678901234567890"] {
        let m = line_err(parse_line(1, Ok(format!("{{\"id\": {id}, \"text\": \"x\"}}").into_bytes()), &d));
        assert!(m.contains("cannot be echoed exactly"), "{id}: {m}");
    }
}

#[test]
fn engine_applies_text_image_and_root_limits() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec { seed: 5, preset: Preset::Tiny, adapter_dtype: Dtype::BF16 };
    write_checkpoint(dir.path(), &spec).unwrap();
    let root = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("grad_224x224.png"), root.path().join("g.png")).unwrap();
    let limits = Limits { max_text_bytes: 100, image_root: Some(root.path().into()), ..Limits::default() };
    let opts =
        EngineOptions { device: Device::Cpu, preprocess_threads: 1, limits, ..EngineOptions::default() };
    let engine = Engine::open(dir.path(), opts).unwrap();
    let out = engine.embed(&[
        Request::text("a".repeat(100)),
        Request::text("a".repeat(101)),
        Request::image_path("g.png"),
        Request::image_path(fixture("grad_224x224.png")),
        Request::image_path("/dev/zero"),
    ]);
    assert!(out[0].is_ok(), "{:?}", out[0]);
    let e = out[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("over the limit of 100 bytes (max_text_bytes)"), "{e}");
    assert!(out[2].is_ok(), "{:?}", out[2]);
    assert!(out[3].as_ref().unwrap_err().to_string().contains("outside the image root"));
    assert!(out[4].is_err());
}

/// Found by `tests/fuzz.rs`: a 12-kB TIFF whose directory entry claims millions of values made
/// the TIFF decoder allocate 140 MB before any check ran.
#[test]
fn tiff_entry_counts_past_the_file_are_refused_before_the_decoder() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let bytes = std::fs::read(dir.join("tiff_huge_tag_count.bin")).unwrap();
    let e = msg(preprocess_bytes(&bytes, &ImageConfig::default(), AlphaMode::Drop));
    assert!(e.contains("corrupt TIFF image") && e.contains("more than the file holds"), "{e}");
    // The good fixture still decodes.
    let good = std::fs::read(fixture("plain_64x64.tiff")).unwrap();
    assert!(preprocess_bytes(&good, &ImageConfig::default(), AlphaMode::Drop).is_ok());
}
