//! The Remote Asset API (Fetch and Push): a URI plus qualifiers names a blob or a Directory
//! tree in the CAS. Records ride in the action cache under a key no action can have (the
//! SHA-256 of a domain-separated name), so they persist with the store and a record whose
//! content was evicted is a miss. Fetch answers from records and, for URLs `--asset-fetch`
//! allows, downloads the content itself; every failure is an RPC error (Bazel ignores the
//! response's `status`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};

use super::asset_http::{Downloader, Sri, SriHasher};
use super::{status, AcWrites, Backend, Instances};
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::proto::asset::{self, fetch_server::Fetch, push_server::Push, Qualifier};
use crate::proto::reapi;

/// Whether a record names a single blob or a Directory tree.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blob,
    Directory,
}

/// What a record says, read back from the action cache.
struct Record {
    digest: Digest,
    created: Option<SystemTime>,
    expires: Option<SystemTime>,
}

/// The action-cache key of a name: qualifiers sorted, each part length-prefixed.
fn key(kind: Kind, uri: &str, qualifiers: &[Qualifier]) -> Digest {
    let mut q: Vec<(&str, &str)> = qualifiers.iter().map(|q| (q.name.as_str(), q.value.as_str())).collect();
    q.sort();
    let mut buf = b"casfs remote asset record v1".to_vec();
    let mut part = |s: &str| {
        buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    };
    part(if kind == Kind::Blob { "blob" } else { "directory" });
    part(uri);
    for (n, v) in q {
        part(n);
        part(v);
    }
    Digest::of_bytes(&buf)
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    t.into()
}

fn system_time(t: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(t).ok())
}

/// The Fetch and Push services of one server.
pub(super) struct AssetService {
    instances: Arc<Instances>,
    http: Downloader,
    downloads: tokio::sync::Semaphore,
}

impl AssetService {
    /// One service for both Fetch and Push (one HTTP client, one bound on downloads).
    pub(super) fn new(instances: Arc<Instances>) -> Result<Arc<Self>> {
        let http = Downloader::new(instances.first().asset_fetch.clone())?;
        let downloads = tokio::sync::Semaphore::new(http.config().concurrency.max(1));
        Ok(Arc::new(AssetService { instances, http, downloads }))
    }

    /// The first of `uris` with a live record no older than `oldest`.
    async fn find(
        &self,
        b: &Backend,
        kind: Kind,
        uris: &[String],
        qualifiers: &[Qualifier],
        oldest: Option<SystemTime>,
    ) -> Result<Option<(String, Record)>> {
        for uri in uris {
            let Some(r) = self.lookup(b, kind, uri, qualifiers).await? else { continue };
            if oldest.is_some_and(|o| r.created.is_none_or(|c| c < o)) {
                continue;
            }
            return Ok(Some((uri.clone(), r)));
        }
        Ok(None)
    }

    async fn record(
        &self,
        b: &Backend,
        kind: Kind,
        uri: &str,
        qualifiers: &[Qualifier],
        digest: Digest,
        expires: Option<SystemTime>,
    ) -> Result<()> {
        let now = SystemTime::now();
        let mut result = reapi::ActionResult {
            execution_metadata: Some(reapi::ExecutedActionMetadata {
                worker: "casfs remote asset".into(),
                worker_start_timestamp: Some(timestamp(now)),
                worker_completed_timestamp: expires.map(timestamp),
                ..Default::default()
            }),
            ..Default::default()
        };
        match kind {
            Kind::Blob => result.output_files.push(reapi::OutputFile {
                path: "blob".into(),
                digest: Some(digest.to_proto()),
                ..Default::default()
            }),
            Kind::Directory => result.output_directories.push(reapi::OutputDirectory {
                path: "directory".into(),
                root_directory_digest: Some(digest.to_proto()),
                ..Default::default()
            }),
        }
        b.ac.update_action_result(&key(kind, uri, qualifiers), &result).await
    }

    /// The live record of a name: present, not expired, its content still in the CAS.
    async fn lookup(&self, b: &Backend, kind: Kind, uri: &str, qualifiers: &[Qualifier]) -> Result<Option<Record>> {
        let Some(r) = b.ac.get_action_result(&key(kind, uri, qualifiers)).await? else { return Ok(None) };
        let meta = r.execution_metadata.unwrap_or_default();
        let digest = match kind {
            Kind::Blob => r.output_files.first().and_then(|f| f.digest.clone()),
            Kind::Directory => r.output_directories.first().and_then(|d| d.root_directory_digest.clone()),
        };
        let Some(digest) = digest.and_then(|d| Digest::try_from(&d).ok()) else { return Ok(None) };
        let record = Record {
            digest,
            created: system_time(&meta.worker_start_timestamp),
            expires: system_time(&meta.worker_completed_timestamp),
        };
        if record.expires.is_some_and(|e| e <= SystemTime::now()) {
            return Ok(None);
        }
        if !digest.is_empty_blob() && !b.cas.find_missing(&[digest]).await?.is_empty() {
            return Ok(None);
        }
        Ok(Some(record))
    }

    /// Checks a blob against a `checksum.sri` qualifier, reading it from the CAS.
    async fn check_sri(&self, b: &Backend, digest: &Digest, sri: &Sri, uri: &str) -> Result<()> {
        use futures::StreamExt;
        let mut h = SriHasher::new(sri);
        let mut stream = b.cas.read_stream(digest, 0, 0).await?;
        while let Some(chunk) = stream.next().await {
            h.update(&chunk?);
        }
        h.check(sri, uri)
    }

    /// Downloads the first allowed URI that works, stores and records it.
    async fn download_blob(
        &self,
        b: &Backend,
        req: &asset::FetchBlobRequest,
        sri: Option<&Sri>,
    ) -> Result<(String, Digest)> {
        let mut headers = Vec::new();
        for q in &req.qualifiers {
            match q.name.as_str() {
                "checksum.sri" => {}
                n if n.starts_with("http_header:") => {
                    headers.push((n["http_header:".len()..].to_string(), q.value.clone()))
                }
                // Bazel's own bookkeeping (canonical id, auth patterns): part of the name only.
                n if n.starts_with("bazel.") => {}
                n => return Err(Error::InvalidArgument(format!("qualifier {n:?} is not supported for downloads"))),
            }
        }
        let timeout = req
            .timeout
            .and_then(|t| Duration::try_from(t).ok())
            .filter(|t| !t.is_zero())
            .map_or(self.http.config().timeout, |t| t.min(self.http.config().timeout));
        let dir = std::env::temp_dir();
        let mut last = None;
        for uri in req.uris.iter().filter(|u| self.http.config().allows(u)) {
            let _slot = self.downloads.acquire().await.map_err(|_| Error::Internal("download slots closed".into()))?;
            match self.http.download(uri, &headers, sri, timeout, &dir).await {
                Ok((file, digest)) => {
                    b.cas.write_file(&digest, file.path()).await?;
                    tracing::info!(uri = %uri, digest = %digest, "remote asset downloaded");
                    return Ok((uri.clone(), digest));
                }
                Err(e @ Error::InvalidArgument(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(uri = %uri, error = %e, "remote asset download failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::NotFound(format!(
                "no record of {:?} with these qualifiers, and this server downloads nothing itself for them (casfs serve --asset-fetch PREFIX allows URL prefixes)",
                req.uris
            ))
        }))
    }
}

fn sri_of(qualifiers: &[Qualifier]) -> Result<Option<Sri>> {
    qualifiers.iter().find(|q| q.name == "checksum.sri").map(|q| q.value.parse()).transpose()
}

/// Remote Asset records and fetches SHA-256 blobs only (what it hashes downloads with).
fn check_function(f: i32) -> Result<(), Status> {
    match DigestFunction::from_proto(f) {
        Ok(DigestFunction::Sha256) => Ok(()),
        Ok(other) => Err(Status::invalid_argument(format!("Remote Asset supports sha256 only, not {other}"))),
        Err(e) => Err(status(e.into())),
    }
}

fn digest_of(d: &Option<reapi::Digest>, what: &str) -> Result<Digest, Status> {
    let d = d.as_ref().ok_or_else(|| Status::invalid_argument(format!("{what} is required")))?;
    Digest::try_from(d).map_err(|e| status(e.into()))
}

fn ok_status() -> Option<crate::proto::rpc::Status> {
    Some(crate::proto::rpc::Status::default())
}

#[tonic::async_trait]
impl Fetch for AssetService {
    async fn fetch_blob(
        &self,
        req: Request<asset::FetchBlobRequest>,
    ) -> Result<Response<asset::FetchBlobResponse>, Status> {
        let req = req.into_inner();
        let b = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function)?;
        if req.uris.is_empty() {
            return Err(Status::invalid_argument("FetchBlob needs at least one URI"));
        }
        let sri = sri_of(&req.qualifiers).map_err(status)?;
        let oldest = system_time(&req.oldest_content_accepted);
        let found = self.find(b, Kind::Blob, &req.uris, &req.qualifiers, oldest).await.map_err(status)?;
        if let Some((uri, r)) = found {
            return Ok(Response::new(asset::FetchBlobResponse {
                status: ok_status(),
                uri,
                qualifiers: req.qualifiers.clone(),
                expires_at: r.expires.map(timestamp),
                blob_digest: Some(r.digest.to_proto()),
                digest_function: req.digest_function,
            }));
        }
        let (uri, digest) = self.download_blob(b, &req, sri.as_ref()).await.map_err(status)?;
        self.record(b, Kind::Blob, &uri, &req.qualifiers, digest, None).await.map_err(status)?;
        Ok(Response::new(asset::FetchBlobResponse {
            status: ok_status(),
            uri,
            qualifiers: req.qualifiers,
            expires_at: None,
            blob_digest: Some(digest.to_proto()),
            digest_function: req.digest_function,
        }))
    }

    async fn fetch_directory(
        &self,
        req: Request<asset::FetchDirectoryRequest>,
    ) -> Result<Response<asset::FetchDirectoryResponse>, Status> {
        let req = req.into_inner();
        let b = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function)?;
        if req.uris.is_empty() {
            return Err(Status::invalid_argument("FetchDirectory needs at least one URI"));
        }
        let oldest = system_time(&req.oldest_content_accepted);
        let found = self.find(b, Kind::Directory, &req.uris, &req.qualifiers, oldest).await.map_err(status)?;
        if let Some((uri, r)) = found {
            return Ok(Response::new(asset::FetchDirectoryResponse {
                status: ok_status(),
                uri,
                qualifiers: req.qualifiers.clone(),
                expires_at: r.expires.map(timestamp),
                root_directory_digest: Some(r.digest.to_proto()),
                digest_function: req.digest_function,
            }));
        }
        Err(Status::not_found(format!(
            "no directory record of {:?} with these qualifiers (this server does not unpack archives itself)",
            req.uris
        )))
    }
}

impl AssetService {
    /// Common checks of both pushes: clients may write, the URIs and the content exist.
    async fn check_push(&self, b: &Backend, uris: &[String], digest: &Digest) -> Result<(), Status> {
        if b.ac_writes == AcWrites::None {
            return Err(Status::permission_denied(
                "this server takes no records from clients (casfs serve --ac-writes none)",
            ));
        }
        if uris.is_empty() {
            return Err(Status::invalid_argument("a push needs at least one URI"));
        }
        if !digest.is_empty_blob() && !b.cas.find_missing(&[*digest]).await.map_err(status)?.is_empty() {
            return Err(Status::failed_precondition(format!("{digest} is not in the CAS; upload it first")));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Push for AssetService {
    async fn push_blob(
        &self,
        req: Request<asset::PushBlobRequest>,
    ) -> Result<Response<asset::PushBlobResponse>, Status> {
        let req = req.into_inner();
        let b = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function)?;
        let digest = digest_of(&req.blob_digest, "blob_digest")?;
        self.check_push(b, &req.uris, &digest).await?;
        if let Some(sri) = sri_of(&req.qualifiers).map_err(status)? {
            // A record must not name content its checksum does not describe.
            self.check_sri(b, &digest, &sri, &req.uris[0]).await.map_err(status)?;
        }
        let expires = system_time(&req.expire_at);
        for uri in &req.uris {
            self.record(b, Kind::Blob, uri, &req.qualifiers, digest, expires).await.map_err(status)?;
        }
        Ok(Response::new(asset::PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        req: Request<asset::PushDirectoryRequest>,
    ) -> Result<Response<asset::PushDirectoryResponse>, Status> {
        let req = req.into_inner();
        let b = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function)?;
        let digest = digest_of(&req.root_directory_digest, "root_directory_digest")?;
        self.check_push(b, &req.uris, &digest).await?;
        // The whole tree must be there and valid, not just its root.
        b.cas.get_tree(&digest).await.map_err(|e| match e {
            Error::MissingBlob(d) => Status::failed_precondition(format!("{d} of the tree is not in the CAS")),
            e => status(e),
        })?;
        let expires = system_time(&req.expire_at);
        for uri in &req.uris {
            self.record(b, Kind::Directory, uri, &req.qualifiers, digest, expires).await.map_err(status)?;
        }
        Ok(Response::new(asset::PushDirectoryResponse {}))
    }
}
