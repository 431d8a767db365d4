//! zstd on the client: when the server offers it, blobs past the threshold travel compressed.
//!
//! What the server offers is asked once (GetCapabilities). Whatever arrives compressed is
//! decompressed with a cap of the digest's size and then verified like any blob, so a server
//! can no more slip a bomb than wrong bytes past the client.

use bytes::Bytes;

use super::{function_segment, GrpcStore};
use crate::cas::compress::{compress_all, decompress_all, IDENTITY, ZSTD};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// Which zstd uses the server offers.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Offer {
    /// `compressed-blobs/zstd` ByteStream reads and writes, and zstd batch read answers.
    streams: bool,
    /// zstd entries in BatchUpdateBlobs.
    batch_update: bool,
}

impl GrpcStore {
    /// What the server offers (nothing when compression is off or the server does not
    /// answer GetCapabilities).
    async fn offer(&self) -> Offer {
        if self.compress_threshold.is_none() {
            return Offer::default();
        }
        self.cache_caps().await.map_or_else(Offer::default, |c| Offer {
            streams: c.supported_compressors.contains(&ZSTD),
            batch_update: c.supported_batch_update_compressors.contains(&ZSTD),
        })
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
