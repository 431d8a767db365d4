//! The ByteStream service: streamed blob reads and verified, resumable-free uploads.

use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::resource::{parse_read, parse_write, Resource};
use super::{status, Backend, READ_CHUNK};
use crate::error::Error;
use crate::proto::bytestream::byte_stream_server::ByteStream;
use crate::proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};

pub(super) struct ByteStreamService {
    backend: Backend,
}

impl ByteStreamService {
    pub(super) fn new(backend: Backend) -> Self {
        ByteStreamService { backend }
    }
}

fn uncompressed(r: Resource) -> Result<Resource, Status> {
    match &r.compressor {
        None => Ok(r),
        Some(c) => {
            Err(Status::invalid_argument(format!("compressor {c:?} is not supported (the server advertises none)")))
        }
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let req = req.into_inner();
        let r = uncompressed(parse_read(&req.resource_name).map_err(status)?)?;
        if req.read_offset < 0 || req.read_limit < 0 {
            return Err(Status::invalid_argument("read_offset and read_limit must not be negative"));
        }
        if req.read_offset as u64 > r.digest.size() {
            return Err(Status::out_of_range(format!(
                "read_offset {} is past the end of {}",
                req.read_offset, r.digest
            )));
        }
        let data = self
            .backend
            .cas
            .read_stream(&r.digest, req.read_offset as u64, req.read_limit as u64)
            .await
            .map_err(status)?;
        // Re-chunk to stay under the message limit whatever the store yields.
        let out = data.flat_map(|chunk| {
            let pieces: Vec<Result<ReadResponse, Status>> = match chunk {
                Ok(mut b) => {
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
        let mut incoming = req.into_inner();
        let first =
            incoming.message().await?.ok_or_else(|| Status::invalid_argument("upload stream carried no message"))?;
        let r = uncompressed(parse_write(&first.resource_name).map_err(status)?)?;
        let digest = r.digest;
        let size = digest.size() as i64;
        if first.write_offset != 0 {
            return Err(Status::invalid_argument("resumed uploads are not supported: write_offset must start at 0"));
        }
        if self.backend.cas.find_missing(&[digest]).await.map_err(status)?.is_empty() {
            // Already stored: answer at once, as the spec allows.
            return Ok(Response::new(WriteResponse { committed_size: size }));
        }
        let name = first.resource_name.clone();
        let chunks = async_stream::stream! {
            let mut offset = 0i64;
            let mut msg = Some(first);
            loop {
                let m = match msg.take() {
                    Some(m) => m,
                    None => match incoming.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => {
                            yield Err(Error::InvalidArgument(format!("upload of {digest} ended without finish_write")));
                            return;
                        }
                        Err(e) => {
                            yield Err(Error::Unavailable(format!("upload of {digest} broke off: {}", e.message())));
                            return;
                        }
                    },
                };
                if !m.resource_name.is_empty() && m.resource_name != name {
                    yield Err(Error::InvalidArgument("resource_name changed within one upload".into()));
                    return;
                }
                if m.write_offset != offset {
                    yield Err(Error::InvalidArgument(format!("write_offset {} where {offset} was expected", m.write_offset)));
                    return;
                }
                offset += m.data.len() as i64;
                if offset > size {
                    yield Err(Error::InvalidArgument(format!("more than {size} bytes sent for {digest}")));
                    return;
                }
                let finish = m.finish_write;
                yield Ok::<Bytes, Error>(m.data);
                if finish {
                    return;
                }
            }
        };
        match self.backend.cas.write_stream(&digest, chunks.boxed()).await {
            Ok(()) => Ok(Response::new(WriteResponse { committed_size: size })),
            Err(e) => {
                tracing::info!(digest = %digest, error = %e, "upload refused");
                Err(status(e))
            }
        }
    }

    async fn query_write_status(
        &self,
        req: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let r = parse_write(&req.into_inner().resource_name).map_err(status)?;
        let present = self.backend.cas.find_missing(&[r.digest]).await.map_err(status)?.is_empty();
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size: if present { r.digest.size() as i64 } else { 0 },
            complete: present,
        }))
    }
}
