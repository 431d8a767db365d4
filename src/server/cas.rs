//! The ContentAddressableStorage service: FindMissingBlobs, batch reads and writes, GetTree.

use std::collections::HashSet;
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use prost::Message;
use tonic::{Request, Response, Status};

use super::{status, Backend, MAX_BATCH_BYTES};
use crate::digest::{Digest, DigestFunction};
use crate::error::{rpc_ok, Error};
use crate::proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use crate::proto::reapi::{self, batch_read_blobs_response, batch_update_blobs_response};
use crate::proto::rpc;

/// Directories per GetTree page when the client does not say.
const DEFAULT_TREE_PAGE: usize = 1000;

pub(super) struct CasService {
    backend: Backend,
}

impl CasService {
    pub(super) fn new(backend: Backend) -> Self {
        CasService { backend }
    }
}

fn ok_status() -> Option<rpc::Status> {
    Some(rpc_ok())
}

fn err_status(e: &Error) -> Option<rpc::Status> {
    Some(e.to_rpc_status())
}

fn check_function(value: i32) -> Result<(), Status> {
    DigestFunction::from_proto(value).map(|_| ()).map_err(|e| status(e.into()))
}

/// Parses request digests; the first malformed one fails the whole request.
fn digests(list: &[reapi::Digest]) -> Result<Vec<Digest>, Status> {
    list.iter().map(|d| Digest::try_from(d).map_err(|e| status(e.into()))).collect()
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<reapi::GetTreeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        req: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        let req = req.into_inner();
        check_function(req.digest_function)?;
        let wanted = digests(&req.blob_digests)?;
        let missing = self.backend.cas.find_missing(&wanted).await.map_err(status)?;
        Ok(Response::new(reapi::FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(|d| d.to_proto()).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        req: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        let req = req.into_inner();
        check_function(req.digest_function)?;
        let total: u64 = req.requests.iter().map(|r| r.data.len() as u64).sum();
        if total > MAX_BATCH_BYTES {
            return Err(Status::invalid_argument(format!(
                "batch carries {total} bytes, over the advertised limit of {MAX_BATCH_BYTES}; use ByteStream"
            )));
        }
        let mut responses = Vec::with_capacity(req.requests.len());
        for r in req.requests {
            let digest = match r.digest.as_ref().map(Digest::try_from) {
                Some(Ok(d)) => d,
                other => {
                    let why = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "missing digest".into(),
                    };
                    responses.push(batch_update_blobs_response::Response {
                        digest: r.digest,
                        status: err_status(&Error::InvalidArgument(why)),
                    });
                    continue;
                }
            };
            let result = if r.compressor != 0 {
                Err(Error::InvalidArgument(format!("compressor {} is not supported in batches", r.compressor)))
            } else {
                self.backend.cas.write(&digest, r.data).await
            };
            if let Err(e) = &result {
                tracing::info!(digest = %digest, error = %e, "batch write refused");
            }
            responses.push(batch_update_blobs_response::Response {
                digest: Some(digest.to_proto()),
                status: match &result {
                    Ok(()) => ok_status(),
                    Err(e) => err_status(e),
                },
            });
        }
        Ok(Response::new(reapi::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        req: Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<Response<reapi::BatchReadBlobsResponse>, Status> {
        let req = req.into_inner();
        check_function(req.digest_function)?;
        let wanted = digests(&req.digests)?;
        let total: u64 = wanted.iter().map(|d| d.size()).sum();
        if total > MAX_BATCH_BYTES {
            return Err(Status::invalid_argument(format!(
                "batch asks for {total} bytes, over the advertised limit of {MAX_BATCH_BYTES}; use ByteStream"
            )));
        }
        let got = self.backend.cas.read_many(&wanted).await.map_err(status)?;
        let responses = got
            .into_iter()
            .map(|(d, r)| match r {
                Ok(data) => batch_read_blobs_response::Response {
                    digest: Some(d.to_proto()),
                    data,
                    compressor: 0,
                    status: ok_status(),
                },
                Err(e) => batch_read_blobs_response::Response {
                    digest: Some(d.to_proto()),
                    data: Bytes::new(),
                    compressor: 0,
                    status: err_status(&e),
                },
            })
            .collect();
        Ok(Response::new(reapi::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(&self, req: Request<reapi::GetTreeRequest>) -> Result<Response<TreeStream>, Status> {
        let req = req.into_inner();
        check_function(req.digest_function)?;
        let root = req
            .root_digest
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("root_digest is required"))
            .and_then(|d| Digest::try_from(d).map_err(|e| status(e.into())))?;
        let page = if req.page_size > 0 { req.page_size as usize } else { DEFAULT_TREE_PAGE };
        let start: usize = if req.page_token.is_empty() {
            0
        } else {
            req.page_token.parse().map_err(|_| Status::invalid_argument("bad page_token"))?
        };
        // Breadth-first from the root; absent or undecodable subtrees are left out (as the
        // spec allows), but an absent root is NOT_FOUND.
        let cas = &self.backend.cas;
        let root_bytes = cas.read(&root).await.map_err(status)?;
        let mut order: Vec<reapi::Directory> = Vec::new();
        let mut seen = HashSet::from([root]);
        let mut level = vec![(root, root_bytes)];
        let end = start + page;
        while !level.is_empty() && order.len() < end {
            let mut next = Vec::new();
            for (d, bytes) in level {
                let Ok(msg) = reapi::Directory::decode(bytes.as_ref()) else {
                    tracing::info!(digest = %d, "GetTree: skipping an undecodable Directory");
                    continue;
                };
                for c in &msg.directories {
                    if let Some(Ok(cd)) = c.digest.as_ref().map(Digest::try_from) {
                        if seen.insert(cd) {
                            next.push(cd);
                        }
                    }
                }
                order.push(msg);
            }
            level = cas
                .read_many(&next)
                .await
                .map_err(status)?
                .into_iter()
                .filter_map(|(d, r)| r.ok().map(|b| (d, b)))
                .collect();
        }
        let more = order.len() > end || !level.is_empty();
        let directories: Vec<reapi::Directory> = order.into_iter().skip(start).take(page).collect();
        let next_page_token = if more { (start + page).to_string() } else { String::new() };
        let resp = reapi::GetTreeResponse { directories, next_page_token };
        Ok(Response::new(Box::pin(futures::stream::once(async move { Ok(resp) }))))
    }

    async fn split_blob(
        &self,
        _: Request<reapi::SplitBlobRequest>,
    ) -> Result<Response<reapi::SplitBlobResponse>, Status> {
        Err(Status::unimplemented("SplitBlob is not supported (split_blob_support is false)"))
    }

    async fn splice_blob(
        &self,
        _: Request<reapi::SpliceBlobRequest>,
    ) -> Result<Response<reapi::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("SpliceBlob is not supported (splice_blob_support is false)"))
    }
}
