//! The ContentAddressableStorage service: FindMissingBlobs, batch reads and writes, GetTree.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use tonic::{Request, Response, Status};

use super::get_tree::{self, TreeStream};
use super::{status, Instances, MAX_BATCH_BYTES};
use crate::digest::{Digest, DigestFunction};
use crate::error::{rpc_ok, Error};
use crate::proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use crate::proto::reapi::{self, batch_read_blobs_response, batch_update_blobs_response};
use crate::proto::rpc;

pub(super) struct CasService {
    instances: Arc<Instances>,
    splitter: super::split::Splitter,
}

impl CasService {
    pub(super) fn new(instances: Arc<Instances>) -> Self {
        CasService { instances, splitter: super::split::Splitter::new() }
    }
}

fn ok_status() -> Option<rpc::Status> {
    Some(rpc_ok())
}

fn err_status(e: &Error) -> Option<rpc::Status> {
    Some(e.to_rpc_status())
}

/// Refuses a `digest_function` this server does not implement.
fn check_function(value: i32) -> Result<(), Status> {
    DigestFunction::from_proto(value).map(|_| ()).map_err(|e| status(e.into()))
}

/// Reads one request digest under the request's function (0: inferred from its length).
fn digest(function: i32, d: &reapi::Digest) -> Result<Digest, Status> {
    Digest::from_request(function, d).map_err(|e| status(e.into()))
}

/// Parses request digests; the first malformed one fails the whole request.
fn digests(function: i32, list: &[reapi::Digest]) -> Result<Vec<Digest>, Status> {
    list.iter().map(|d| digest(function, d)).collect()
}

/// The distinct digests of `list`, first occurrence first.
fn distinct(list: Vec<Digest>) -> Vec<Digest> {
    let mut seen = HashSet::with_capacity(list.len());
    list.into_iter().filter(|d| seen.insert(*d)).collect()
}

/// The sum of `sizes`, or `None` past 2^64 - 1 (sizes come from the client: any i64 >= 0).
fn checked_total(sizes: impl IntoIterator<Item = u64>) -> Option<u64> {
    sizes.into_iter().try_fold(0u64, |acc, s| acc.checked_add(s))
}

/// Refuses a batch whose blobs add up past the advertised limit (or past 2^64).
fn check_batch_total(what: &str, total: Option<u64>) -> Result<(), Status> {
    match total {
        Some(t) if t <= MAX_BATCH_BYTES => Ok(()),
        Some(t) => Err(Status::invalid_argument(format!(
            "batch {what} {t} bytes, over the advertised limit of {MAX_BATCH_BYTES}; use ByteStream"
        ))),
        None => Err(Status::invalid_argument(format!(
            "batch {what} more than 2^64 bytes in all, over the advertised limit of {MAX_BATCH_BYTES}"
        ))),
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        req: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        let req = req.into_inner();
        let backend = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function)?;
        let wanted = digests(req.digest_function, &req.blob_digests)?;
        let missing = backend.cas.find_missing(&wanted).await.map_err(status)?;
        Ok(Response::new(reapi::FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(|d| d.to_proto()).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        req: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        let req = req.into_inner();
        let backend = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function)?;
        // What is summed is the bytes carried (bounded by the message size), not the digests'
        // claimed sizes; each entry is still checked against its digest when written. Entries
        // naming the same digest are each answered (their data may differ, one right, one
        // wrong); the second write of a blob is a lookup.
        check_batch_total("carries", checked_total(req.requests.iter().map(|r| r.data.len() as u64)))?;
        let mut responses = Vec::with_capacity(req.requests.len());
        for r in req.requests {
            let digest = match r.digest.as_ref().map(|d| Digest::from_request(req.digest_function, d)) {
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
            let result = match super::compressed::inflate(backend, &digest, r.compressor, r.data) {
                Ok(data) => backend.cas.write(&digest, data).await,
                Err(e) => Err(e),
            };
            match &result {
                // The store warned once that it is full.
                Err(e) if e.is_disk_full() => tracing::debug!(digest = %digest, error = %e, "batch write refused"),
                Err(e) => tracing::info!(digest = %digest, error = %e, "batch write refused"),
                Ok(()) => {}
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
        let backend = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function)?;
        // Duplicates are read and answered once: every response names its digest and the bytes
        // under one digest are the same whoever asks, so a client finds each blob it asked for
        // (the spec counts this call as one Read per blob; a blob asked twice is one blob).
        // The limit is checked on the distinct blobs' claimed sizes, with checked arithmetic,
        // before anything is read.
        let wanted = distinct(digests(req.digest_function, &req.digests)?);
        check_batch_total("asks for", checked_total(wanted.iter().map(|d| d.size())))?;
        let got = backend.cas.read_many(&wanted).await.map_err(status)?;
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
        let responses = super::compressed::deflate(backend, &req.acceptable_compressors, responses).await;
        Ok(Response::new(reapi::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(&self, req: Request<reapi::GetTreeRequest>) -> Result<Response<TreeStream>, Status> {
        let req = req.into_inner();
        let backend = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function)?;
        let root = req
            .root_digest
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("root_digest is required"))
            .and_then(|d| digest(req.digest_function, d))?;
        let paging = get_tree::Paging::new(req.page_size, &req.page_token)?;
        if root.size() > get_tree::MAX_DIRECTORY_BYTES {
            return Err(Status::invalid_argument(format!(
                "root {root} is larger than any Directory this server returns ({} bytes)",
                get_tree::MAX_DIRECTORY_BYTES
            )));
        }
        // An absent root is NOT_FOUND; absent subtrees are left out of the stream.
        let root_bytes = backend.cas.read(&root).await.map_err(status)?;
        Ok(Response::new(get_tree::stream(backend.cas.clone(), root, root_bytes, paging)))
    }

    async fn split_blob(
        &self,
        req: Request<reapi::SplitBlobRequest>,
    ) -> Result<Response<reapi::SplitBlobResponse>, Status> {
        self.splitter.split(&self.instances, req.into_inner()).await.map(Response::new)
    }

    async fn splice_blob(
        &self,
        req: Request<reapi::SpliceBlobRequest>,
    ) -> Result<Response<reapi::SpliceBlobResponse>, Status> {
        self.splitter.splice(&self.instances, req.into_inner()).await.map(Response::new)
    }
}
