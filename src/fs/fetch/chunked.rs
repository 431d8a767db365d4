//! Large blobs fetched by their chunks (REAPI SplitBlob) through the local cache, so a new
//! version of a file fetches only the chunks an older one did not already bring.

use futures::{FutureExt, StreamExt, TryStreamExt};

use super::Fetcher;
use crate::cas::chunks::{check_list, groups, ChunkParams};
use crate::cas::{Cas, SharedCas};
use crate::digest::Digest;
use crate::error::{Error, Result};

impl Fetcher {
    /// Fetches a large blob as the concatenation of the chunks the server splits it into:
    /// chunks already in the cache are read there, the others are fetched (each verified)
    /// and kept, and the whole is verified against `digest` as it enters the cache. False:
    /// the blob is too small, the server does not split, or the split failed or makes no
    /// sense (then the caller reads it whole). Bytes that do not match `digest` are an
    /// error: the chunk list was a lie.
    pub(super) async fn fetch_chunked(&self, digest: Digest, remote: &SharedCas) -> Result<bool> {
        match self.try_fetch_chunked(digest, remote).await {
            Err(e) if !matches!(e, Error::DigestMismatch { .. }) => {
                tracing::warn!(digest = %digest, error = %e, "fetching by chunks failed; fetching the blob whole");
                Ok(false)
            }
            done => done,
        }
    }

    async fn try_fetch_chunked(&self, digest: Digest, remote: &SharedCas) -> Result<bool> {
        if digest.size() < ChunkParams::DEFAULT.threshold() {
            return Ok(false);
        }
        let list = match self.with_deadline(digest, remote.split(&digest)).await {
            Ok(Some(list)) => list,
            Ok(None) => return Ok(false),
            Err(e) => {
                tracing::debug!(digest = %digest, error = %e, "SplitBlob failed; fetching the blob whole");
                return Ok(false);
            }
        };
        if let Err(e) = check_list(&digest, &list) {
            tracing::warn!(digest = %digest, error = %e, "unusable chunk list; fetching the blob whole");
            return Ok(false);
        }
        self.metrics.add("casfs_chunked_fetches_total", 1);
        // The first attempt trusts the cached chunks' files (the whole is verified as it
        // enters the cache, which is what readers rely on). If it fails, the second checks
        // each cached chunk first (a corrupt one is dropped and fetched again); what still
        // does not make the blob is the server's lie.
        match self.assemble(digest, &list, remote, false).await {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::info!(digest = %digest, error = %e, "assembling from chunks failed; checking the cached chunks");
                self.assemble(digest, &list, remote, true).await.map(|()| true)
            }
        }
    }

    /// Fetches the chunks of `list` not in the cache (`check`: nor failing a check of their
    /// bytes), then streams them all into the cache as `digest`, verified whole.
    async fn assemble(&self, digest: Digest, list: &[Digest], remote: &SharedCas, check: bool) -> Result<()> {
        let mut missing = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in list {
            if !seen.insert(*c) || c.is_empty_blob() {
                continue;
            }
            let here = if check { self.cache.ready(c) || self.cache.check(c).await? } else { self.cache.contains(c) };
            if !here {
                missing.push(*c);
            }
        }
        if !check {
            self.metrics.add("casfs_chunks_reused_total", (seen.len() - missing.len()) as u64);
        }
        for group in groups(&missing) {
            self.fetch_chunks(digest, group, remote).await?;
        }
        let (cache, remote) = (self.cache.clone(), remote.clone());
        let joined = futures::stream::iter(list.to_vec())
            .then(move |c| {
                let (cache, remote) = (cache.clone(), remote.clone());
                async move {
                    // The first attempt reads a cached chunk's file as it is: the whole is
                    // verified anyway, and a mismatch sends us to the checked attempt.
                    if !check && cache.bytes_now(&c).is_none() {
                        if let Ok(Some(f)) = cache.file_now(&c) {
                            return Ok(crate::cas::file_range_stream(f, c, 0, 0));
                        }
                    }
                    match cache.read_stream(&c, 0, 0).await {
                        Ok(s) => Ok(s),
                        // Gone from the cache meanwhile: fetched again (verified).
                        Err(_) => remote.read(&c).await.map(|b| futures::stream::once(async move { Ok(b) }).boxed()),
                    }
                }
                .boxed()
            })
            .try_flatten()
            .boxed();
        self.cache.insert_stream(&digest, joined).await.inspect_err(|e| {
            if check {
                tracing::error!(digest = %digest, error = %e, "chunks from the server do not make the blob");
            }
        })
    }

    /// Fetches chunks into the cache (each verified by `read_many`), within the in-flight
    /// bound and the deadline. Any failure fails the blob's fetch.
    async fn fetch_chunks(&self, blob: Digest, group: Vec<Digest>, remote: &SharedCas) -> Result<()> {
        let _turn = self.batch_turn(&group).await?;
        let results = self.with_deadline(blob, remote.read_many(&group)).await?;
        let mut got = Vec::with_capacity(results.len());
        for (d, r) in results {
            let data = r?;
            self.metrics.add("casfs_fetch_bytes_total", data.len() as u64);
            self.metrics.add("casfs_chunks_fetched_total", 1);
            got.push((d, data));
        }
        let cache = self.cache.clone();
        // Large chunks are written to their blob files at once (blocking).
        tokio::task::spawn_blocking(move || {
            for (d, data) in got {
                cache.insert_verified(d, data);
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("caching chunks of {blob}: {e}")))
    }
}
