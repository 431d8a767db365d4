//! SplitBlob and SpliceBlob (REAPI 2.12 chunked blobs) with FastCDC 2020 chunks.
//!
//! SplitBlob chunks a stored blob with the advertised parameters, stores every chunk in the
//! instance's CAS and returns their digests; SpliceBlob streams the named chunks into the
//! blob, verified against its digest (a mismatch stores nothing). Chunk lists a splice
//! proved (or a split computed) are remembered, so splitting a blob again costs a
//! FindMissingBlobs on its chunks rather than a read of the whole blob.

use std::sync::Arc;

use tonic::Status;

use super::{status, Instances};
use crate::cas::chunks::{self, ChunkParams};
use crate::digest::{Digest, DigestFunction};
use crate::error::Error;
use crate::proto::reapi::{self, chunking_function};

/// Chunk lists remembered (one per blob and instance name).
const KNOWN_LISTS: u64 = 10_000;

/// What the server advertises for chunking.
pub const PARAMS: ChunkParams = ChunkParams::DEFAULT;

/// The chunking state of a server: lists it has proved.
pub(super) struct Splitter {
    known: moka::sync::Cache<(String, Digest), Arc<Vec<Digest>>>,
}

/// Refuses a `chunking_function` outside the enum (any defined one is accepted: a split
/// answers with FastCDC 2020 whatever the client prefers, and a splice only concatenates).
fn check_chunking(value: i32) -> Result<(), Status> {
    chunking_function::Value::try_from(value)
        .map(|_| ())
        .map_err(|_| Status::invalid_argument(format!("unknown chunking_function {value}")))
}

fn required(function: i32, d: Option<&reapi::Digest>) -> Result<Digest, Status> {
    let d = d.ok_or_else(|| Status::invalid_argument("blob_digest is required"))?;
    DigestFunction::from_proto(function).map_err(|e| status(e.into()))?;
    Digest::from_request(function, d).map_err(|e| status(e.into()))
}

impl Splitter {
    pub(super) fn new() -> Self {
        Splitter { known: moka::sync::Cache::new(KNOWN_LISTS) }
    }

    pub(super) async fn split(
        &self,
        instances: &Instances,
        req: reapi::SplitBlobRequest,
    ) -> Result<reapi::SplitBlobResponse, Status> {
        let backend = instances.get(&req.instance_name)?;
        check_chunking(req.chunking_function)?;
        let blob = required(req.digest_function, req.blob_digest.as_ref())?;
        let answer = |list: &[Digest]| reapi::SplitBlobResponse {
            chunk_digests: list.iter().map(|d| d.to_proto()).collect(),
            chunking_function: chunking_function::Value::FastCdc2020 as i32,
        };
        if blob.is_empty_blob() {
            return Ok(answer(&[]));
        }
        // Also a promise to keep the blob a while, as for any blob reported present.
        if !backend.cas.find_missing(&[blob]).await.map_err(status)?.is_empty() {
            return Err(Status::not_found(format!("blob {blob} is not in the CAS")));
        }
        // A store that splits blobs itself (another server behind this one) is asked first.
        if let Some(list) = backend.cas.split(&blob).await.map_err(status)? {
            return Ok(answer(&list));
        }
        let key = (req.instance_name.clone(), blob);
        if let Some(list) = self.known.get(&key) {
            // The chunks' lifetimes are extended by the same check.
            if backend.cas.find_missing(&list).await.map_err(status)?.is_empty() {
                return Ok(answer(&list));
            }
            self.known.invalidate(&key);
        }
        let list = chunks::split_stored(&backend.cas, &blob, PARAMS).await.map_err(status)?;
        tracing::info!(blob = %blob, chunks = list.len(), "split");
        self.known.insert(key, Arc::new(list.clone()));
        Ok(answer(&list))
    }

    pub(super) async fn splice(
        &self,
        instances: &Instances,
        req: reapi::SpliceBlobRequest,
    ) -> Result<reapi::SpliceBlobResponse, Status> {
        let backend = instances.get(&req.instance_name)?;
        check_chunking(req.chunking_function)?;
        let blob = required(req.digest_function, req.blob_digest.as_ref())?;
        if req.chunk_digests.len() > chunks::MAX_SPLICE_CHUNKS {
            return Err(status(Error::InvalidArgument(format!(
                "{} chunks, more than the {} this server splices",
                req.chunk_digests.len(),
                chunks::MAX_SPLICE_CHUNKS
            ))));
        }
        let list = req
            .chunk_digests
            .iter()
            .map(|d| Digest::from_request(req.digest_function, d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| status(e.into()))?;
        chunks::check_list(&blob, &list).map_err(status)?;
        let done = reapi::SpliceBlobResponse { blob_digest: Some(blob.to_proto()) };
        // A blob already stored makes the splice a no-op (the spec allows it); its chunks are
        // not checked, so the list is not remembered.
        if backend.cas.find_missing(&[blob]).await.map_err(status)?.is_empty() {
            return Ok(done);
        }
        chunks::splice_into(&backend.cas, &blob, &list).await.map_err(|e| match e {
            Error::MissingBlob(c) => Status::not_found(format!("chunk {c} is not in the CAS")),
            Error::DigestMismatch { actual, .. } => {
                Status::invalid_argument(format!("the chunks make {actual}, not {blob}; nothing was stored"))
            }
            e => status(e),
        })?;
        tracing::info!(blob = %blob, chunks = list.len(), "spliced");
        self.known.insert((req.instance_name, blob), Arc::new(list));
        Ok(done)
    }
}
