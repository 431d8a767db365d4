//! ByteStream uploads: a stream of chunks turned into the WriteRequests of one write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::cas::{ByteStream, CHUNK};
use crate::proto::bytestream::WriteRequest;

/// Turns a chunk stream (plain or compressed bytes) into ByteStream WriteRequests of at most
/// `CHUNK` bytes, the first naming the resource and the last finishing the write, with a
/// count of the bytes they carried (what a server commits of compressed data). A failed
/// source ends the requests without `finish_write`, so the server refuses the upload.
pub(super) fn write_requests(resource: String, data: ByteStream) -> (BoxStream<'static, WriteRequest>, Arc<AtomicU64>) {
    let sent = Arc::new(AtomicU64::new(0));
    let counted = sent.clone();
    let mut data = data;
    let reqs = async_stream::stream! {
        let mut offset = 0u64;
        let mut first = true;
        // One chunk is held back until the next one shows whether it is the last.
        let mut pending: Option<Bytes> = None;
        loop {
            let next = match data.next().await {
                Some(Ok(b)) if b.is_empty() => continue,
                Some(Ok(b)) => Some(b),
                Some(Err(_)) => return,
                None => None,
            };
            let done = next.is_none();
            if let Some(mut p) = pending.take() {
                while !p.is_empty() {
                    let piece = p.split_to(p.len().min(CHUNK));
                    let len = piece.len() as u64;
                    yield WriteRequest {
                        resource_name: if first { resource.clone() } else { String::new() },
                        write_offset: offset as i64,
                        finish_write: done && p.is_empty(),
                        data: piece,
                    };
                    first = false;
                    offset += len;
                    counted.store(offset, Ordering::Relaxed);
                }
            }
            if done {
                if first {
                    // Nothing to send (the empty blob): one request names and finishes it.
                    yield WriteRequest { resource_name: resource.clone(), write_offset: 0, finish_write: true, data: Bytes::new() };
                }
                return;
            }
            pending = next;
        }
    };
    (reqs.boxed(), sent)
}
