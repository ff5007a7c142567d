//! Hot reload: a model file replaced on disk (new contents, a new sha256) is loaded by its engine
//! thread before its next batch and swapped in, with no restart and nothing in flight dropped (the
//! batches waiting meanwhile run on the new engine); results name the new version from the first
//! batch on the new file. Replace a file atomically (write it beside, then rename it over the old):
//! a file caught half-written fails to load, is logged, and the old engine stays.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::engine::Engine;

/// What tells one file from its replacement without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified_ns: i64,
    inode: u64,
}

fn stamp(path: &PathBuf) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp { len: m.len(), modified_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(), inode: m.ino() })
}

/// The file's sha256, in hex.
fn sha256(path: &PathBuf) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Loads an engine from the model file.
pub type Loader = std::sync::Arc<dyn Fn() -> anyhow::Result<Box<dyn Engine>> + Send + Sync>;

/// One model file, watched: each of the model's engines watches it with a clone of its own, and
/// loads the new file before its next batch.
#[derive(Clone)]
pub struct Reload {
    path: PathBuf,
    stamp: Option<Stamp>,
    sha256: String,
    /// The manifest's version without its `+sha` suffix (the weights' version).
    base_version: String,
    load: Loader,
}

impl Reload {
    /// Watches `path`, whose engine is already loaded; returns the watcher and the version of the
    /// file as it is now: `version`'s part before `+`, then `+` and the file's first 8 hex digits
    /// (the manifest's own version when the file is the manifest's).
    pub fn new(path: PathBuf, version: &str, load: Loader) -> std::io::Result<(Self, String)> {
        let base_version = version.split('+').next().unwrap_or(version).to_owned();
        let reload = Self { stamp: stamp(&path), sha256: sha256(&path)?, path, base_version, load };
        let version = reload.version();
        Ok((reload, version))
    }

    fn version(&self) -> String {
        format!("{}+{}", self.base_version, &self.sha256[..8])
    }

    /// When the file has been replaced by different contents that load: the new engine and its
    /// version. Costs a `stat` when nothing changed.
    pub fn check(&mut self) -> Option<(Box<dyn Engine>, String)> {
        let now = stamp(&self.path);
        if now == self.stamp {
            return None;
        }
        self.stamp = now;
        let sha = match sha256(&self.path) {
            Ok(sha) if sha != self.sha256 => sha,
            Ok(_) => return None,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "the model file cannot be read; keeping the engine loaded");
                return None;
            }
        };
        match (self.load)() {
            Ok(engine) => {
                self.sha256 = sha;
                let version = self.version();
                tracing::info!(path = %self.path.display(), %version, "model file replaced; new engine swapped in");
                Some((engine, version))
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "the replaced model file does not load; keeping the engine loaded");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Constant(f32);

    impl Engine for Constant {
        fn infer(&mut self, _: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, crate::engine::EngineError> {
            Ok(vec![vec![self.0]; batch])
        }
    }

    #[test]
    fn a_replaced_file_with_new_contents_is_reloaded_once_and_names_its_sha() {
        let dir = std::env::temp_dir().join(format!("reefline-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.onnx");
        std::fs::write(&path, b"first").unwrap();
        let file = path.clone();
        let load: Loader = std::sync::Arc::new(move || {
            let bytes = std::fs::read(&file)?;
            anyhow::ensure!(bytes != b"broken", "not a model");
            Ok(Box::new(Constant(bytes.len() as f32)))
        });
        let (mut reload, version) = Reload::new(path.clone(), "0.1.0+3cb5e8af", load).unwrap();
        // sha256("first") = a7937b64...
        assert_eq!(version, "0.1.0+a7937b64");
        assert!(reload.check().is_none(), "nothing changed");

        // Replaced by rename, as a deployment should: loaded, once.
        std::fs::write(dir.join("new"), b"second!").unwrap();
        std::fs::rename(dir.join("new"), &path).unwrap();
        let (mut engine, version) = reload.check().expect("a new file");
        assert_eq!(engine.infer(&[], 1).unwrap(), vec![vec![7.0]]);
        assert_eq!(version, format!("0.1.0+{}", &sha256(&path).unwrap()[..8]));
        assert!(reload.check().is_none());

        // The same contents again: nothing to load. A file that does not load: the old engine stays.
        std::fs::write(dir.join("same"), b"second!").unwrap();
        std::fs::rename(dir.join("same"), &path).unwrap();
        assert!(reload.check().is_none());
        std::fs::write(dir.join("bad"), b"broken").unwrap();
        std::fs::rename(dir.join("bad"), &path).unwrap();
        assert!(reload.check().is_none());
        std::fs::remove_dir_all(&dir).ok();
    }
}
