//! Files written whole or not at all.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// A file written whole or not at all: the bytes go to `.NAME.part-<pid>` beside it, renamed onto it
/// by [`Partial::commit`]; dropped before that (an export broke off), the temporary file is removed
/// and the file is as it was.
pub struct Partial {
    temporary: PathBuf,
    path: PathBuf,
    file: Option<BufWriter<File>>,
}

impl Partial {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let name = path.file_name().with_context(|| format!("{} names no file", path.display()))?;
        let temporary = path.with_file_name(format!(".{}.part-{}", name.to_string_lossy(), std::process::id()));
        let file = File::create(&temporary).with_context(|| format!("creating {}", temporary.display()))?;
        Ok(Self { temporary, path: path.to_owned(), file: Some(BufWriter::new(file)) })
    }

    /// Puts the whole file in its place.
    pub fn commit(mut self) -> anyhow::Result<()> {
        let file = self.file.take().expect("committed once");
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&self.temporary, &self.path)
            .with_context(|| format!("renaming {} to {}", self.temporary.display(), self.path.display()))
    }
}

impl Write for Partial {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("not committed").write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}
