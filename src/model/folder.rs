//! Model folders as users have them: a plain download (`config.json` and the rest in one folder),
//! a Hugging Face cache folder of the model (`models--jinaai--jina-embeddings-v4/` with `refs/`,
//! `snapshots/<revision>/` of symlinks and `blobs/`), or the hub cache above it
//! (`~/.cache/huggingface/hub`). [`resolve_model_dir`] turns any of them into the folder that holds
//! `config.json`; files reached through symlinks are read like any others.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The model's folder name in a Hugging Face hub cache.
pub const HF_CACHE_NAME: &str = "models--jinaai--jina-embeddings-v4";

/// The folder holding the model's files, from what a user gives:
///
/// 1. a folder with `config.json`: itself (a plain download, or a snapshot folder);
/// 2. a folder with `snapshots/` (a hub cache folder of one model): the snapshot that
///    `refs/main` names; without `refs/main`, the only snapshot, or of several the most recently
///    modified one;
/// 3. a folder holding [`HF_CACHE_NAME`] (the hub cache root): that folder, as in 2;
/// 4. anything else: itself unchanged, so that opening it reports what is missing.
///
/// A cache whose `refs/main` names a snapshot that is not there, or that has no snapshot at all,
/// is an [`Error::Input`] saying so.
pub fn resolve_model_dir(dir: &Path) -> Result<PathBuf> {
    if dir.join("config.json").exists() {
        return Ok(dir.to_path_buf());
    }
    if dir.join("snapshots").is_dir() {
        return snapshot(dir);
    }
    let cached = dir.join(HF_CACHE_NAME);
    if cached.join("snapshots").is_dir() {
        return snapshot(&cached);
    }
    Ok(dir.to_path_buf())
}

fn snapshot(repo: &Path) -> Result<PathBuf> {
    let snapshots = repo.join("snapshots");
    let refs_main = repo.join("refs").join("main");
    if let Ok(rev) = std::fs::read_to_string(&refs_main) {
        let rev = rev.trim();
        let dir = snapshots.join(rev);
        if rev.is_empty() || rev.contains(['/', '\\']) || !dir.is_dir() {
            return Err(Error::Input(format!(
                "{}: refs/main names revision {rev:?}, but {} is not a folder (an incomplete \
                 download? pass the snapshot folder itself)",
                repo.display(),
                dir.display()
            )));
        }
        return Ok(dir);
    }
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&snapshots).map_err(|e| Error::io(&snapshots, e))? {
        let entry = entry.map_err(|e| Error::io(&snapshots, e))?;
        let path = entry.path();
        if path.is_dir() {
            let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            found.push((modified, path));
        }
    }
    // The newest; of equal times the last by name, so the choice does not depend on listing order.
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        Error::Input(format!("{}: a Hugging Face cache folder without any snapshot", repo.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_cache_and_hub_root_resolve() {
        let t = tempfile::tempdir().unwrap();
        let plain = t.path().join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::write(plain.join("config.json"), "{}").unwrap();
        assert_eq!(resolve_model_dir(&plain).unwrap(), plain);

        let hub = t.path().join("hub");
        let repo = hub.join(HF_CACHE_NAME);
        for rev in ["aaa", "bbb"] {
            std::fs::create_dir_all(repo.join("snapshots").join(rev)).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "aaa\n").unwrap();
        let want = repo.join("snapshots/aaa");
        assert_eq!(resolve_model_dir(&repo).unwrap(), want);
        assert_eq!(resolve_model_dir(&hub).unwrap(), want);

        std::fs::write(repo.join("refs/main"), "ccc").unwrap();
        let e = resolve_model_dir(&repo).unwrap_err().to_string();
        assert!(e.contains("\"ccc\"") && e.contains("refs/main"), "{e}");

        std::fs::remove_file(repo.join("refs/main")).unwrap();
        std::fs::remove_dir(repo.join("snapshots/aaa")).unwrap();
        assert_eq!(resolve_model_dir(&repo).unwrap(), repo.join("snapshots/bbb"), "the only one");
        std::fs::remove_dir(repo.join("snapshots/bbb")).unwrap();
        let e = resolve_model_dir(&repo).unwrap_err().to_string();
        assert!(e.contains("without any snapshot"), "{e}");

        let other = t.path().join("nothing-here");
        assert_eq!(resolve_model_dir(&other).unwrap(), other);
    }
}
