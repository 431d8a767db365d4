//! zstd on the client: when the server offers it, blobs past the threshold travel compressed.
//!
//! What the server offers is asked once (GetCapabilities). Whatever arrives compressed is
//! decompressed with a cap of the digest's size and then verified like any blob, so a server
//! can no more slip a bomb than wrong bytes past the client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::{function_segment, GrpcStore};
use crate::cas::compress::{compress_all, compress_stream, decompress_all, IDENTITY, ZSTD};
use crate::cas::{ByteStream, CHUNK};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::proto::bytestream::WriteRequest;

/// Which zstd uses the server offers.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Offer {
    /// `compressed-blobs/zstd` ByteStream reads and writes, and zstd batch read answers.
    streams: bool,
    /// zstd entries in BatchUpdateBlobs.
    batch_update: bool,
}

impl GrpcStore {
    /// What the server offers (asked once; nothing when compression is off or the server does
    /// not answer GetCapabilities).
    async fn offer(&self) -> Offer {
        if self.compress_threshold.is_none() {
            return Offer::default();
        }
        *self
            .zstd
            .get_or_init(|| async {
                match self.capabilities().await {
                    Ok(c) => {
                        let c = c.cache_capabilities.unwrap_or_default();
                        Offer {
                            streams: c.supported_compressors.contains(&ZSTD),
                            batch_update: c.supported_batch_update_compressors.contains(&ZSTD),
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "GetCapabilities failed; not compressing");
                        Offer::default()
                    }
                }
            })
            .await
    }

    fn worth(&self, size: u64) -> bool {
        self.compress_threshold.is_some_and(|t| size >= t)
    }

    /// Whether `digest` is read and written through `compressed-blobs/zstd`.
    pub(super) async fn zstd_stream(&self, digest: &Digest) -> bool {
        self.worth(digest.size()) && self.offer().await.streams
    }

    /// `acceptable_compressors` for a batch read of `batch`.
    pub(super) async fn acceptable(&self, batch: &[Digest]) -> Vec<i32> {
        if batch.iter().any(|d| self.worth(d.size())) && self.offer().await.streams {
            vec![ZSTD]
        } else {
            vec![]
        }
    }

    /// Each blob of a batch upload as sent, with its compressor: zstd where the server takes
    /// it and it saves bytes.
    pub(super) async fn batch_entries(&self, batch: &[(Digest, Bytes)]) -> Vec<(Bytes, i32)> {
        let plain = || batch.iter().map(|(_, b)| (b.clone(), IDENTITY)).collect();
        if !batch.iter().any(|(_, b)| self.worth(b.len() as u64)) || !self.offer().await.batch_update {
            return plain();
        }
        let threshold = self.compress_threshold.unwrap_or(u64::MAX);
        let blobs: Vec<Bytes> = batch.iter().map(|(_, b)| b.clone()).collect();
        let work = tokio::task::spawn_blocking(move || {
            blobs
                .into_iter()
                .map(|b| match compress_all(&b) {
                    Ok(z) if b.len() as u64 >= threshold && z.len() < b.len() => (Bytes::from(z), ZSTD),
                    _ => (b, IDENTITY),
                })
                .collect()
        });
        work.await.unwrap_or_else(|_| plain())
    }

    /// ByteStream resource name for reading a blob compressed.
    pub fn compressed_read_resource(&self, d: &Digest) -> String {
        format!("{}compressed-blobs/zstd/{}{}/{}", self.prefix(), function_segment(d), d.hash_hex(), d.size())
    }

    /// ByteStream resource name for uploading a blob compressed (fresh uuid each time).
    pub fn compressed_write_resource(&self, d: &Digest) -> String {
        let (uuid, f) = (uuid::Uuid::new_v4(), function_segment(d));
        format!("{}uploads/{uuid}/compressed-blobs/zstd/{f}{}/{}", self.prefix(), d.hash_hex(), d.size())
    }
}

/// The bytes of one batch read answer: zstd data decompressed (never past the digest's size),
/// plain data copied out of the response. Not verified: the caller does.
pub(super) fn batch_data(d: &Digest, compressor: i32, data: &Bytes) -> Result<Bytes> {
    match compressor {
        // Each blob gets its own buffer: a slice would keep the whole multi-MiB response
        // alive for as long as any one of its blobs is cached.
        IDENTITY => Ok(Bytes::copy_from_slice(data)),
        ZSTD => decompress_all(data, d.size(), &format!("BatchReadBlobs {d}")),
        c => Err(Error::InvalidArgument(format!("BatchReadBlobs {d}: the server used compressor {c}, not offered"))),
    }
}

/// The WriteRequests of a compressed upload of `data`, and the count of compressed bytes they
/// carry (offsets count those, as the spec says). A failed source ends the requests without
/// `finish_write`, so the server refuses the upload.
pub(super) fn compressed_requests(
    resource: String,
    data: ByteStream,
) -> (BoxStream<'static, WriteRequest>, Arc<AtomicU64>) {
    let sent = Arc::new(AtomicU64::new(0));
    let counted = sent.clone();
    let mut z = compress_stream(data);
    let reqs = async_stream::stream! {
        let mut offset = 0u64;
        let mut first = true;
        let mut pending: Option<Bytes> = None;
        loop {
            let next = match z.next().await {
                Some(Ok(b)) => Some(b),
                Some(Err(_)) => return,
                None => None,
            };
            let done = next.is_none();
            if let Some(mut p) = pending.take() {
                while !p.is_empty() {
                    let piece = p.split_to(p.len().min(CHUNK));
                    let len = piece.len() as u64;
                    let finish = done && p.is_empty();
                    yield WriteRequest {
                        resource_name: if first { resource.clone() } else { String::new() },
                        write_offset: offset as i64,
                        finish_write: finish,
                        data: piece,
                    };
                    first = false;
                    offset += len;
                    counted.store(offset, Ordering::Relaxed);
                }
            }
            if done {
                return;
            }
            pending = next;
        }
    };
    (reqs.boxed(), sent)
}
