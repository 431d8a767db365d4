//! Chunked transfers of large blobs (REAPI SplitBlob/SpliceBlob) when the server offers them:
//! an upload sends only the chunks the server lacks, a read fetches a blob by its chunks.
//!
//! Every chunk is verified against its own digest as it arrives, and the assembled blob
//! against the blob's digest before anyone sees it: a chunk list comes from the server and
//! proves nothing. A failed split or splice falls back to a whole transfer; assembled bytes
//! that do not match are an error, never a reason to try again.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;
use futures::StreamExt;

use super::GrpcStore;
use crate::cas::chunks::{chunk_reader, groups, ChunkParams, MAX_SPLICE_CHUNKS};
use crate::cas::{ByteStream, Cas};
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::proto::reapi::{self, chunking_function};

/// What the server offers for chunked blobs.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Chunking {
    split: bool,
    splice: bool,
    /// Its FastCDC parameters, when advertised and within the spec's range.
    params: Option<ChunkParams>,
}

impl GrpcStore {
    /// What the server offers (nothing without `cfg.chunking`, or from a server without
    /// Capabilities).
    async fn chunking(&self) -> Chunking {
        if !self.chunking_on {
            return Chunking::default();
        }
        match self.cache_caps().await {
            Some(c) => Chunking {
                split: c.split_blob_support,
                splice: c.splice_blob_support,
                params: c.fast_cdc_2020_params.as_ref().and_then(ChunkParams::from_proto),
            },
            _ => Chunking::default(),
        }
    }

    /// The server's chunk list for a blob (SplitBlob), or `None` when it does not split.
    pub(super) async fn split_rpc(&self, digest: &Digest) -> Result<Option<Vec<Digest>>> {
        if !self.chunking().await.split {
            return Ok(None);
        }
        let f = digest.function();
        let req = reapi::SplitBlobRequest {
            instance_name: self.instance.clone(),
            blob_digest: Some(digest.to_proto()),
            digest_function: f.proto_value(),
            chunking_function: chunking_function::Value::FastCdc2020 as i32,
        };
        let resp =
            self.retry.unary("SplitBlob", &self.cas(), &req, |mut c, r| async move { c.split_blob(r).await }).await?;
        let list = resp.chunk_digests.iter().map(|d| Digest::from_proto_with(f, d)).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(list))
    }

    async fn splice_rpc(&self, digest: &Digest, chunks: &[Digest]) -> Result<()> {
        let req = reapi::SpliceBlobRequest {
            instance_name: self.instance.clone(),
            blob_digest: Some(digest.to_proto()),
            chunk_digests: chunks.iter().map(|d| d.to_proto()).collect(),
            digest_function: digest.function().proto_value(),
            chunking_function: chunking_function::Value::FastCdc2020 as i32,
        };
        self.retry.unary("SpliceBlob", &self.cas(), &req, |mut c, r| async move { c.splice_blob(r).await }).await?;
        Ok(())
    }

    /// Uploads a large file by its chunks when the server splices: chunks it with the
    /// server's parameters, asks which chunks are missing, sends those, then splices.
    /// `None`: not worth it or not offered, or it failed (the caller uploads the file whole).
    pub(super) async fn upload_chunked(&self, digest: &Digest, path: &Path) -> Option<Result<()>> {
        let offer = self.chunking().await;
        let params = offer.params.filter(|p| offer.splice && digest.size() >= p.threshold())?;
        match self.try_upload_chunked(digest, path, params).await {
            Ok(()) => Some(Ok(())),
            Err(e @ Error::DigestMismatch { .. }) => Some(Err(e)),
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "chunked upload failed; uploading the blob whole");
                None
            }
        }
    }

    async fn try_upload_chunked(&self, digest: &Digest, path: &Path, params: ChunkParams) -> Result<()> {
        let file = std::sync::Arc::new(std::fs::File::open(path).ctx(|| format!("opening {}", path.display()))?);
        let (f, reader) = (digest.function(), file.clone());
        let (whole, list) = tokio::task::spawn_blocking(move || {
            let mut list = Vec::new();
            let whole = chunk_reader(&*reader, params, f, |offset, d, _| {
                list.push((offset, d));
                Ok(())
            })?;
            Ok::<_, Error>((whole, list))
        })
        .await
        .map_err(|e| Error::Internal(format!("chunking {}: {e}", path.display())))??;
        if whole != *digest {
            return Err(Error::DigestMismatch { expected: Box::new(*digest), actual: Box::new(whole) });
        }
        if list.len() > MAX_SPLICE_CHUNKS {
            return Err(Error::InvalidArgument(format!("{} chunks are too many to splice", list.len())));
        }
        let chunks: Vec<Digest> = list.iter().map(|(_, d)| *d).collect();
        let at: HashMap<Digest, u64> = list.iter().map(|(o, d)| (*d, *o)).collect();
        let missing = self.find_missing(&chunks).await?;
        let sent: u64 = missing.iter().map(|d| d.size()).sum();
        for group in groups(&missing) {
            let (file, at) = (file.clone(), group.iter().map(|d| (*d, at[d])).collect::<Vec<_>>());
            let blobs = tokio::task::spawn_blocking(move || {
                at.into_iter()
                    .map(|(d, offset)| {
                        let mut buf = vec![0u8; d.size() as usize];
                        file.read_exact_at(&mut buf, offset).map_err(|e| Error::io("reading a chunk", e))?;
                        Ok((d, Bytes::from(buf)))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .await
            .map_err(|e| Error::Internal(format!("reading chunks: {e}")))??;
            for (d, r) in self.write_many(blobs).await? {
                r.map_err(|e| Error::Internal(format!("uploading chunk {d}: {e}")))?;
            }
        }
        self.splice_rpc(digest, &chunks).await?;
        tracing::debug!(digest = %digest, chunks = chunks.len(), missing = missing.len(), sent, "chunked upload");
        Ok(())
    }

    /// A large blob's bytes fetched by its chunks when the server splits it, each chunk
    /// verified; `None` when not offered or the split failed (read it whole). The stream is
    /// not verified as a whole: the caller hashes it (as [`crate::cas::stream_to_file`] does).
    pub(super) async fn read_chunked(&self, digest: &Digest) -> Option<ByteStream> {
        let offer = self.chunking().await;
        if !offer.split || digest.size() < offer.params.unwrap_or(ChunkParams::DEFAULT).threshold() {
            return None;
        }
        let list = match self.split_rpc(digest).await {
            Ok(Some(list)) => list,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(digest = %digest, error = %e, "SplitBlob failed; reading the blob whole");
                return None;
            }
        };
        if let Err(e) = crate::cas::chunks::check_list(digest, &list) {
            tracing::warn!(digest = %digest, error = %e, "unusable chunk list; reading the blob whole");
            return None;
        }
        Some(chunk_stream(self.clone(), list))
    }
}

/// The bytes of `list` in order, fetched a group at a time (each chunk verified by
/// `read_many`).
fn chunk_stream(store: GrpcStore, list: Vec<Digest>) -> ByteStream {
    futures::stream::iter(groups(&list))
        .then(move |group| {
            let store = store.clone();
            async move {
                let mut seen = std::collections::HashSet::new();
                let distinct: Vec<Digest> = group.iter().filter(|d| seen.insert(**d)).copied().collect();
                let mut got: HashMap<Digest, Bytes> = HashMap::new();
                for (d, r) in store.read_many(&distinct).await? {
                    got.insert(d, r?);
                }
                let bytes =
                    group.into_iter().map(|d| got.get(&d).cloned().ok_or(Error::MissingBlob(d))).collect::<Vec<_>>();
                Ok::<_, Error>(futures::stream::iter(bytes))
            }
        })
        .map(|r| match r {
            Ok(s) => s.boxed(),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        })
        .flatten()
        .boxed()
}
