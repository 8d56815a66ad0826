//! Model folders as users have them: a synthetic model laid out as a Hugging Face hub cache
//! (`models--jinaai--jina-embeddings-v4/{refs/main, snapshots/<rev>/ → ../../blobs/<hash>}`, every
//! file a relative symlink into `blobs/`) opens from the cache folder and from the hub root, and
//! embeds exactly what the plain folder does.
#![cfg(unix)]

use std::path::Path;

use jv4::model::folder::HF_CACHE_NAME;
use jv4::model::synth::{write_checkpoint, Preset, SynthSpec};
use jv4::model::Dtype;
use jv4::{Device, Engine, EngineOptions, OutputKind, Request};

/// Moves every file of `src` into `repo/blobs/<n>` and links it from `repo/snapshots/<rev>/` at its
/// relative path, as `huggingface_hub` does.
fn as_hf_cache(src: &Path, repo: &Path, rev: &str) {
    let blobs = repo.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let snap = repo.join("snapshots").join(rev);
    let mut stack = vec![src.to_path_buf()];
    let mut n = 0;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(src).unwrap();
            let blob = blobs.join(format!("{n:040x}"));
            n += 1;
            std::fs::rename(&p, &blob).unwrap();
            let link = snap.join(rel);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            // From snapshots/<rev>/<rel> up to the repo folder, then into blobs/.
            let up = "../".repeat(rel.components().count() + 1);
            std::os::unix::fs::symlink(
                format!("{up}blobs/{}", blob.file_name().unwrap().to_str().unwrap()),
                &link,
            )
            .unwrap();
        }
    }
    assert!(n > 3, "the synthetic model has its files");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
}

#[test]
fn a_hugging_face_cache_opens_like_the_plain_folder() {
    let t = tempfile::tempdir().unwrap();
    let spec = SynthSpec { seed: 5, preset: Preset::Tiny, adapter_dtype: Dtype::BF16 };
    let plain = t.path().join("plain");
    let moved = t.path().join("moved");
    write_checkpoint(&plain, &spec).unwrap();
    write_checkpoint(&moved, &spec).unwrap();
    let hub = t.path().join("hub");
    let repo = hub.join(HF_CACHE_NAME);
    let rev = "0123456789abcdef0123456789abcdef01234567";
    as_hf_cache(&moved, &repo, rev);
    // A second, older snapshot that refs/main does not name must not be picked.
    std::fs::create_dir_all(repo.join("snapshots/ffff")).unwrap();
    assert!(std::fs::symlink_metadata(repo.join("snapshots").join(rev).join("config.json"))
        .unwrap()
        .is_symlink());

    let reqs =
        [Request::text("a text to embed").output(OutputKind::Both), Request::text("another").dims(128)];
    let opts = || EngineOptions { device: Device::Cpu, preprocess_threads: 1, ..Default::default() };
    let want = Engine::open(&plain, opts()).unwrap().embed(&reqs);
    for dir in [&repo, &hub, &repo.join("snapshots").join(rev)] {
        let engine = Engine::open(dir, opts()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let got = engine.embed(&reqs);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.as_ref().unwrap(), w.as_ref().unwrap(), "{}", dir.display());
        }
    }

    std::fs::write(repo.join("refs/main"), "feedface").unwrap();
    let e = Engine::open(&repo, opts()).err().expect("a missing snapshot opened").to_string();
    assert!(e.contains("feedface") && e.contains("refs/main"), "{e}");
}
