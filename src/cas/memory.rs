//! In-memory store and action cache, for tests and short-lived embedding.

use std::collections::HashMap;
use std::sync::RwLock;

use bytes::Bytes;
use futures::StreamExt;

use super::{verify, ActionCache, ByteStream, Cas};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::proto::reapi;

/// A store that keeps every blob in a hash map. Unbounded: use it for tests only.
#[derive(Default)]
pub struct MemoryStore {
    blobs: RwLock<HashMap<Digest, Bytes>>,
    results: RwLock<HashMap<Digest, reapi::ActionResult>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of blobs held (the implicit empty blob not counted).
    pub fn len(&self) -> usize {
        self.blobs.read().unwrap().len()
    }

    /// True when no blob was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces a blob's bytes without verification: lets tests simulate corruption.
    pub fn corrupt(&self, digest: &Digest, data: Bytes) {
        self.blobs.write().unwrap().insert(*digest, data);
    }
}

/// Slices `data` per the ranged-read rules shared by local stores.
pub(crate) fn slice_range(digest: &Digest, data: Bytes, offset: u64, limit: u64) -> Result<Bytes> {
    let len = data.len() as u64;
    if offset > len {
        return Err(Error::InvalidArgument(format!("read offset {offset} is past the end of {digest}")));
    }
    let end = if limit == 0 { len } else { len.min(offset.saturating_add(limit)) };
    Ok(data.slice(offset as usize..end as usize))
}

#[async_trait::async_trait]
impl Cas for MemoryStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let blobs = self.blobs.read().unwrap();
        let mut seen = std::collections::HashSet::new();
        Ok(digests
            .iter()
            .filter(|d| !d.is_empty_blob() && !blobs.contains_key(d) && seen.insert(**d))
            .copied()
            .collect())
    }

    async fn read_stream(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ByteStream> {
        let data = if digest.is_empty_blob() {
            Bytes::new()
        } else {
            self.blobs.read().unwrap().get(digest).cloned().ok_or(Error::MissingBlob(*digest))?
        };
        let part = slice_range(digest, data, offset, limit)?;
        Ok(futures::stream::once(async move { Ok(part) }).boxed())
    }

    async fn write_stream(&self, digest: &Digest, mut data: ByteStream) -> Result<()> {
        let mut buf = Vec::with_capacity(digest.size().min(64 << 20) as usize);
        while let Some(chunk) = data.next().await {
            buf.extend_from_slice(&chunk?);
        }
        verify(digest, &buf)?;
        if !digest.is_empty_blob() {
            self.blobs.write().unwrap().insert(*digest, buf.into());
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ActionCache for MemoryStore {
    async fn get_action_result(&self, action: &Digest) -> Result<Option<reapi::ActionResult>> {
        Ok(self.results.read().unwrap().get(action).cloned())
    }

    async fn update_action_result(&self, action: &Digest, result: &reapi::ActionResult) -> Result<()> {
        self.results.write().unwrap().insert(*action, result.clone());
        Ok(())
    }
}
