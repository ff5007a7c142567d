//! The package's ZIP, written as it streams: each entry deflated, its sizes and CRC in a data
//! descriptor after its data (no seeking back), the bytes taken by the export as they come.
//! An entry over 4 GiB (a media table of tens of millions of rows) is written as ZIP64 in its
//! data descriptor and the central directory only: readers that use the central directory (unzip,
//! Python's zipfile, R's) read it; a reader that streams local headers alone may not.

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use chrono::Utc;
use flate2::Compression;
use flate2::write::DeflateEncoder;
use rawzip::{CompressionMethod, ZipArchiveWriter, ZipDataWriter, ZipEntryWriter};

/// The archive's bytes, taken by the export as they are written.
#[derive(Clone, Default)]
pub struct Shared(Arc<Mutex<Vec<u8>>>);

impl Shared {
    /// The bytes written so far, when there are at least `at`.
    pub fn take_at(&self, at: usize) -> Option<Bytes> {
        let mut buffer = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (buffer.len() >= at).then(|| Bytes::from(std::mem::take(&mut *buffer)))
    }
}

impl Write for Shared {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A table being written into the archive, deflated.
pub type Table<'a> = csv::Writer<ZipDataWriter<DeflateEncoder<ZipEntryWriter<'a, Shared>>>>;

/// The archive, written into `Shared`.
pub struct Archive {
    zip: ZipArchiveWriter<Shared>,
    created: rawzip::time::UtcDateTime,
}

fn io(e: rawzip::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl Archive {
    pub fn new(out: Shared) -> Self {
        Self { zip: ZipArchiveWriter::new(out), created: rawzip::time::UtcDateTime::from_unix(Utc::now().timestamp()) }
    }

    pub fn entry(&mut self, name: &str) -> std::io::Result<ZipDataWriter<DeflateEncoder<ZipEntryWriter<'_, Shared>>>> {
        let (entry, config) = self
            .zip
            .new_file(name)
            .compression_method(CompressionMethod::DEFLATE)
            .last_modified(self.created)
            .unix_permissions(0o644)
            .start()
            .map_err(io)?;
        Ok(config.wrap(DeflateEncoder::new(entry, Compression::default())))
    }

    pub fn close(data: ZipDataWriter<DeflateEncoder<ZipEntryWriter<'_, Shared>>>) -> std::io::Result<()> {
        let (deflate, descriptor) = data.finish().map_err(io)?;
        deflate.finish()?.finish(descriptor).map_err(io)?;
        Ok(())
    }

    /// Starts a CSV entry, its header written.
    pub fn table(&mut self, name: &str, header: &[&str]) -> std::io::Result<Table<'_>> {
        let mut table = csv::Writer::from_writer(self.entry(name)?);
        table.write_record(header)?;
        Ok(table)
    }

    pub fn end_table(table: Table<'_>) -> std::io::Result<()> {
        Self::close(table.into_inner().map_err(|e| e.into_error())?)
    }

    /// Writes the central directory.
    pub fn finish(self) -> std::io::Result<()> {
        self.zip.finish().map_err(io).map(drop)
    }
}
