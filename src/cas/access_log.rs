//! A store decorator that writes one line per blob read or written: `read HASH/SIZE`.
//! `casfs serve --access-log FILE` uses it so tests and operators can see exactly what a
//! client fetched.

use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;

use super::{ByteStream, Cas, SharedCas};
use crate::digest::Digest;
use crate::error::{IoContext, Result};

/// Logs blob traffic of an inner store.
pub struct AccessLog {
    inner: SharedCas,
    out: Mutex<LineWriter<std::fs::File>>,
}

impl AccessLog {
    /// Appends to `path`.
    pub fn open(inner: SharedCas, path: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ctx(|| format!("opening access log {}", path.display()))?;
        Ok(AccessLog { inner, out: Mutex::new(LineWriter::new(f)) })
    }

    fn log(&self, what: &str, d: &Digest) {
        let _ = writeln!(self.out.lock().unwrap(), "{what} {d}");
    }
}

#[async_trait::async_trait]
impl Cas for AccessLog {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.inner.find_missing(digests).await
    }

    async fn read_stream(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ByteStream> {
        self.log("read", digest);
        self.inner.read_stream(digest, offset, limit).await
    }

    async fn write_stream(&self, digest: &Digest, data: ByteStream) -> Result<()> {
        self.log("write", digest);
        self.inner.write_stream(digest, data).await
    }

    async fn read(&self, digest: &Digest) -> Result<Bytes> {
        self.log("read", digest);
        self.inner.read(digest).await
    }

    async fn write(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.log("write", digest);
        self.inner.write(digest, data).await
    }

    async fn read_many(&self, digests: &[Digest]) -> Result<Vec<(Digest, Result<Bytes>)>> {
        for d in digests {
            self.log("read", d);
        }
        self.inner.read_many(digests).await
    }

    async fn split(&self, digest: &Digest) -> Result<Option<Vec<Digest>>> {
        self.inner.split(digest).await
    }
}
