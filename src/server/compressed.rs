//! zstd in batches: compressed BatchUpdateBlobs entries inflated (capped), BatchReadBlobs answers deflated.

use bytes::Bytes;

use super::{Backend, MAX_BATCH_BYTES};
use crate::cas::compress::{compress_all, decompress_all, IDENTITY, ZSTD};
use crate::digest::Digest;
use crate::error::Error;
use crate::proto::reapi::batch_read_blobs_response;

/// Blobs smaller than this are answered uncompressed: zstd's framing would eat the gain.
const MIN_COMPRESSED: usize = 1 << 10;

fn compressor_name(c: i32) -> &'static str {
    if c == ZSTD {
        "zstd"
    } else {
        "identity"
    }
}

fn count(b: &Backend, direction: &str, compressor: i32, n: usize) {
    let c = compressor_name(compressor);
    b.metrics.add(&format!("casfs_batch_wire_bytes_total{{direction=\"{direction}\",compressor=\"{c}\"}}"), n as u64);
}

/// The bytes of one BatchUpdateBlobs entry as stored: zstd data is decompressed, never past
/// the digest's size (and only for blobs a batch could carry uncompressed, so a batch costs
/// at most one such blob of memory at a time); the store then checks them against the digest.
pub(super) fn inflate(b: &Backend, digest: &Digest, compressor: i32, data: Bytes) -> Result<Bytes, Error> {
    count(b, "write", compressor, data.len());
    match compressor {
        IDENTITY => Ok(data),
        ZSTD if digest.size() > MAX_BATCH_BYTES => Err(Error::InvalidArgument(format!(
            "{digest}: a compressed batch entry may hold at most {MAX_BATCH_BYTES} bytes once decompressed; use \
             ByteStream"
        ))),
        ZSTD => decompress_all(&data, digest.size(), &format!("batch entry {digest}")),
        c => Err(Error::InvalidArgument(format!("compressor {c} is not supported in batches (zstd is)"))),
    }
}

/// The answers of a BatchReadBlobs, zstd-compressed where the client accepts it and it saves
/// bytes (on a blocking thread: a full batch takes milliseconds to compress).
pub(super) async fn deflate(
    b: &Backend,
    acceptable: &[i32],
    responses: Vec<batch_read_blobs_response::Response>,
) -> Vec<batch_read_blobs_response::Response> {
    let responses = if acceptable.contains(&ZSTD) {
        let work = tokio::task::spawn_blocking(move || {
            responses.into_iter().map(deflate_one).collect::<Vec<batch_read_blobs_response::Response>>()
        });
        match work.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    } else {
        responses
    };
    for r in &responses {
        count(b, "read", r.compressor, r.data.len());
    }
    responses
}

fn deflate_one(mut r: batch_read_blobs_response::Response) -> batch_read_blobs_response::Response {
    if r.data.len() >= MIN_COMPRESSED {
        if let Ok(z) = compress_all(&r.data) {
            if z.len() < r.data.len() {
                r.data = z.into();
                r.compressor = ZSTD;
            }
        }
    }
    r
}
