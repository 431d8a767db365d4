//! The ByteStream service: streamed blob reads and verified, resumable-free uploads.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::resource::{parse_read, parse_write, Resource};
use super::{status, Instances, READ_CHUNK, UPLOAD_PROGRESS_BYTES};
use crate::error::Error;
use crate::proto::bytestream::byte_stream_server::ByteStream;
use crate::proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};

pub(super) struct ByteStreamService {
    instances: std::sync::Arc<Instances>,
}

impl ByteStreamService {
    pub(super) fn new(instances: std::sync::Arc<Instances>) -> Self {
        ByteStreamService { instances }
    }
}

/// Whether `r` names zstd-compressed data (`compressed-blobs/zstd/…`); other compressors are refused.
fn zstd(r: &Resource) -> Result<bool, Status> {
    match r.compressor.as_deref() {
        None => Ok(false),
        Some("zstd") => Ok(true),
        Some(c) => Err(Status::invalid_argument(format!("compressor {c:?} is not supported (the server offers zstd)"))),
    }
}

/// The counter of bytes carried by ByteStream messages in `direction`, by compressor.
fn wire_counter(b: &super::Backend, direction: &str, zstd: bool) -> std::sync::Arc<AtomicU64> {
    let c = if zstd { "zstd" } else { "identity" };
    b.metrics.counter(&format!("casfs_bytestream_wire_bytes_total{{direction=\"{direction}\",compressor=\"{c}\"}}"))
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

/// The messages of one upload, with its idle clock: only the time spent waiting for the
/// client counts (not the time the store takes to write what came), and it restarts each
/// time the client has delivered [`UPLOAD_PROGRESS_BYTES`].
struct Upload {
    stream: Streaming<WriteRequest>,
    idle: Duration,
    waited: Duration,
}

impl Upload {
    /// The next message; DEADLINE_EXCEEDED once the client has been idle for too long.
    async fn next(&mut self, what: &str) -> Result<Option<WriteRequest>, Error> {
        let left = self.idle.saturating_sub(self.waited);
        let started = Instant::now();
        let got = tokio::time::timeout(left, self.stream.message()).await;
        self.waited += started.elapsed();
        match got {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => Err(Error::Unavailable(format!("{what} broke off: {}", e.message()))),
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "{what}: the client sent less than {} KiB in {:?}; upload aborted (the server's \
                 --upload-idle-timeout)",
                UPLOAD_PROGRESS_BYTES >> 10,
                self.idle
            ))),
        }
    }
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let req = req.into_inner();
        let r = parse_read(&req.resource_name).map_err(status)?;
        let compressed = zstd(&r)?;
        let backend = self.instances.get(&r.instance)?;
        if req.read_offset < 0 || req.read_limit < 0 {
            return Err(Status::invalid_argument("read_offset and read_limit must not be negative"));
        }
        if compressed && req.read_limit != 0 {
            return Err(Status::invalid_argument("read_limit must be 0 when reading compressed-blobs"));
        }
        if req.read_offset as u64 > r.digest.size() {
            return Err(Status::out_of_range(format!(
                "read_offset {} is past the end of {}",
                req.read_offset, r.digest
            )));
        }
        let mut data =
            backend.cas.read_stream(&r.digest, req.read_offset as u64, req.read_limit as u64).await.map_err(status)?;
        if compressed {
            // read_offset counts uncompressed bytes: the rest of the blob, compressed afresh.
            data = crate::cas::compress::compress_stream(data);
        }
        let wire = wire_counter(backend, "read", compressed);
        // Re-chunk to stay under the message limit whatever the store yields.
        let out = data.flat_map(move |chunk| {
            let pieces: Vec<Result<ReadResponse, Status>> = match chunk {
                Ok(mut b) => {
                    wire.fetch_add(b.len() as u64, Ordering::Relaxed);
                    let mut v = Vec::new();
                    while !b.is_empty() {
                        v.push(Ok(ReadResponse { data: b.split_to(b.len().min(READ_CHUNK)) }));
                    }
                    v
                }
                Err(e) => vec![Err(status(e))],
            };
            futures::stream::iter(pieces)
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn write(&self, req: Request<Streaming<WriteRequest>>) -> Result<Response<WriteResponse>, Status> {
        let mut incoming = Upload {
            stream: req.into_inner(),
            idle: self.instances.first().upload_idle_timeout,
            waited: Duration::ZERO,
        };
        let first = match incoming.next("upload").await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Status::invalid_argument("upload stream carried no message")),
            Err(e) => return Err(status(e)),
        };
        let r = parse_write(&first.resource_name).map_err(status)?;
        let compressed = zstd(&r)?;
        let backend = self.instances.get(&r.instance)?;
        let digest = r.digest;
        let size = digest.size();
        if first.write_offset != 0 {
            return Err(Status::invalid_argument("resumed uploads are not supported: write_offset must start at 0"));
        }
        if backend.cas.find_missing(&[digest]).await.map_err(status)?.is_empty() {
            // Already stored: answer at once, as the spec allows (-1 for a compressed upload).
            return Ok(Response::new(WriteResponse { committed_size: if compressed { -1 } else { size as i64 } }));
        }
        let name = first.resource_name.clone();
        let what = format!("upload of {digest}");
        // Offsets count the bytes sent: compressed ones for compressed-blobs, whose total is
        // bounded by what an honest compressor needs for `size` bytes.
        let limit = if compressed { crate::cas::compress::max_compressed(size) } else { size };
        let wire = wire_counter(backend, "write", compressed);
        let received = std::sync::Arc::new(AtomicU64::new(0));
        let counted = received.clone();
        let chunks = async_stream::stream! {
            // Sizes are u64 here: `offset <= size < 2^63` and one message is at most a few
            // MiB, so `offset + len` cannot overflow.
            let mut offset = 0u64;
            let mut progress = 0u64;
            let mut msg = Some(first);
            loop {
                let m = match msg.take() {
                    Some(m) => m,
                    None => match incoming.next(&what).await {
                        Ok(Some(m)) => m,
                        Ok(None) => {
                            yield Err(Error::InvalidArgument(format!("{what} ended without finish_write")));
                            return;
                        }
                        Err(e) => {
                            yield Err(e);
                            return;
                        }
                    },
                };
                if !m.resource_name.is_empty() && m.resource_name != name {
                    yield Err(Error::InvalidArgument("resource_name changed within one upload".into()));
                    return;
                }
                if m.write_offset != offset as i64 {
                    yield Err(Error::InvalidArgument(format!("write_offset {} where {offset} was expected", m.write_offset)));
                    return;
                }
                let len = m.data.len() as u64;
                offset += len;
                wire.fetch_add(len, Ordering::Relaxed);
                counted.store(offset, Ordering::Relaxed);
                if offset > limit {
                    yield Err(Error::InvalidArgument(format!("more than {limit} bytes sent for {digest}")));
                    return;
                }
                progress += len;
                if progress >= UPLOAD_PROGRESS_BYTES {
                    progress = 0;
                    incoming.waited = Duration::ZERO;
                }
                let finish = m.finish_write;
                yield Ok::<Bytes, Error>(m.data);
                if finish {
                    return;
                }
            }
        };
        let data = if compressed {
            crate::cas::compress::decompress_stream(chunks.boxed(), size, format!("upload of {digest}"))
        } else {
            chunks.boxed()
        };
        match backend.cas.write_stream(&digest, data).await {
            // What was committed is counted as it was sent: compressed bytes for compressed-blobs.
            Ok(()) if compressed => {
                Ok(Response::new(WriteResponse { committed_size: received.load(Ordering::Relaxed) as i64 }))
            }
            Ok(()) => Ok(Response::new(WriteResponse { committed_size: size as i64 })),
            Err(e) => {
                if e.is_disk_full() {
                    // The store warned once that it is full.
                    tracing::debug!(digest = %digest, error = %e, "upload refused");
                } else {
                    tracing::info!(digest = %digest, error = %e, "upload refused");
                }
                Err(status(e))
            }
        }
    }

    async fn query_write_status(
        &self,
        req: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let r = parse_write(&req.into_inner().resource_name).map_err(status)?;
        let backend = self.instances.get(&r.instance)?;
        let present = backend.cas.find_missing(&[r.digest]).await.map_err(status)?.is_empty();
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size: if present { r.digest.size() as i64 } else { 0 },
            complete: present,
        }))
    }
}
