//! ByteStream uploads: a stream of chunks turned into the WriteRequests of one write.

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::cas::{ByteStream, CHUNK};
use crate::proto::bytestream::WriteRequest;

struct WriteState {
    data: ByteStream,
    pending: Bytes,
    resource: String,
    size: u64,
    offset: u64,
    first: bool,
    done: bool,
}

/// Turns a chunk stream into ByteStream WriteRequests of at most `CHUNK` bytes, the first
/// naming the resource and the last finishing the write.
pub(super) fn write_requests(resource: String, size: u64, data: ByteStream) -> BoxStream<'static, WriteRequest> {
    let st = WriteState { data, pending: Bytes::new(), resource, size, offset: 0, first: true, done: false };
    futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        while st.pending.is_empty() {
            match st.data.next().await {
                Some(Ok(chunk)) => st.pending = chunk,
                // A failed source ends the upload short; the server refuses the partial blob.
                Some(Err(_)) | None => break,
            }
        }
        let piece = st.pending.split_to(st.pending.len().min(CHUNK));
        let len = piece.len() as u64;
        if len == 0 && !st.first && st.offset < st.size {
            // Source ended early: finish so the server can judge (and refuse).
            st.done = true;
        }
        let finish = st.offset + len == st.size || len == 0;
        let req = WriteRequest {
            resource_name: if st.first { st.resource.clone() } else { String::new() },
            write_offset: st.offset as i64,
            finish_write: finish,
            data: piece,
        };
        st.first = false;
        st.offset += len;
        st.done |= finish;
        Some((req, st))
    })
    .boxed()
}
