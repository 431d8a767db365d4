//! gRPC client store: the `Cas` and `ActionCache` contracts over any REAPI server.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use tokio::sync::OnceCell;

pub use super::channel::RemoteConfig;
use super::channel::{connect, Conn, Retry};
use super::resume::{resuming, Open, Resume};
use super::{verify, ByteStream, Cas};
use upload::write_requests;

mod action_cache;
mod chunked;
mod compressed;
mod tree;
mod upload;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::proto::bytestream::byte_stream_client::ByteStreamClient;
use crate::proto::bytestream::{ReadRequest, WriteRequest};
use crate::proto::reapi;
use crate::proto::reapi::capabilities_client::CapabilitiesClient;
use crate::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use crate::tree::Directory;

/// The gRPC limit most servers enforce on one message.
pub const GRPC_MESSAGE_LIMIT: u64 = 4 << 20;
/// Room left in a batch for framing and digests.
const BATCH_MARGIN: u64 = 64 << 10;
/// Estimated bytes a blob's digest and framing add to a batch.
const PER_BLOB_OVERHEAD: u64 = 100;
/// Digests per FindMissingBlobs request.
const FIND_MISSING_CHUNK: usize = 8192;
/// Batch requests in flight at once.
const PARALLEL_BATCHES: usize = 4;

/// A `Cas` + `ActionCache` backed by a remote REAPI server (clones share the connection).
#[derive(Clone)]
pub struct GrpcStore {
    conn: Conn,
    instance: String,
    retry: Retry,
    /// The server's cache capabilities, asked once (`None`: it did not answer).
    caps: OnceCell<Option<reapi::CacheCapabilities>>,
    /// Whether large blobs may travel by their chunks (`cfg.chunking`).
    chunking_on: bool,
    compress_threshold: Option<u64>,
}

impl GrpcStore {
    /// Prepares a client; nothing is sent until the first call.
    pub fn new(cfg: &RemoteConfig) -> Result<Self> {
        Ok(GrpcStore {
            conn: connect(cfg)?,
            instance: cfg.instance_name.clone(),
            retry: Retry { retries: cfg.retries, timeout: cfg.rpc_timeout },
            caps: OnceCell::new(),
            chunking_on: cfg.chunking,
            compress_threshold: cfg.compress_threshold,
        })
    }

    fn cas(&self) -> ContentAddressableStorageClient<Conn> {
        ContentAddressableStorageClient::new(self.conn.clone()).max_decoding_message_size(64 << 20)
    }

    fn bytestream(&self) -> ByteStreamClient<Conn> {
        ByteStreamClient::new(self.conn.clone()).max_decoding_message_size(64 << 20)
    }

    fn prefix(&self) -> String {
        if self.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.instance)
        }
    }

    /// The connection, for other services on the same server (Execution).
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// The instance name calls carry.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// ByteStream resource name for reading a blob.
    pub fn read_resource(&self, d: &Digest) -> String {
        format!("{}blobs/{}{}/{}", self.prefix(), function_segment(d), d.hash_hex(), d.size())
    }

    /// ByteStream resource name for uploading a blob (fresh uuid each time).
    pub fn write_resource(&self, d: &Digest) -> String {
        let (uuid, f) = (uuid::Uuid::new_v4(), function_segment(d));
        format!("{}uploads/{uuid}/blobs/{f}{}/{}", self.prefix(), d.hash_hex(), d.size())
    }

    /// The server's capabilities.
    pub async fn capabilities(&self) -> Result<reapi::ServerCapabilities> {
        let req = reapi::GetCapabilitiesRequest { instance_name: self.instance.clone() };
        self.retry
            .unary("GetCapabilities", &CapabilitiesClient::new(self.conn.clone()), &req, |mut c, r| async move {
                c.get_capabilities(r).await
            })
            .await
    }

    /// The server's cache capabilities, asked once for the batch size, compression and
    /// chunking (`None` when it does not answer: then nothing is assumed offered).
    async fn cache_caps(&self) -> Option<&reapi::CacheCapabilities> {
        self.caps
            .get_or_init(|| async {
                match self.capabilities().await {
                    Ok(c) => Some(c.cache_capabilities.unwrap_or_default()),
                    Err(e) => {
                        tracing::warn!(error = %e, "GetCapabilities failed; default batch size, no compression or chunking");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    /// The batch budget: the server's `max_batch_total_size_bytes`, capped below the 4 MiB
    /// gRPC limit (servers without Capabilities get the cap).
    pub async fn max_batch_bytes(&self) -> u64 {
        let cap = GRPC_MESSAGE_LIMIT - BATCH_MARGIN;
        match self.cache_caps().await.map_or(0, |c| c.max_batch_total_size_bytes) {
            server if server > 0 => (server as u64).saturating_sub(BATCH_MARGIN.min(server as u64 / 16)).min(cap),
            _ => cap,
        }
    }

    /// Splits digests into batches within the budget; blobs too big for any batch go apart.
    fn plan(digests: &[Digest], budget: u64) -> (Vec<Vec<Digest>>, Vec<Digest>) {
        let mut batches = Vec::new();
        let mut large = Vec::new();
        let mut cur = Vec::new();
        let mut cur_size = 0;
        for d in digests {
            let cost = d.size() + PER_BLOB_OVERHEAD;
            if cost > budget {
                large.push(*d);
                continue;
            }
            // One function per batch: the request names it once for all its digests.
            if cur_size + cost > budget || cur.last().is_some_and(|l: &Digest| l.function() != d.function()) {
                batches.push(std::mem::take(&mut cur));
                cur_size = 0;
            }
            cur.push(*d);
            cur_size += cost;
        }
        if !cur.is_empty() {
            batches.push(cur);
        }
        (batches, large)
    }

    async fn batch_read(&self, batch: Vec<Digest>) -> Result<Vec<(Digest, Result<Bytes>)>> {
        let f = function_of(batch.iter());
        let req = reapi::BatchReadBlobsRequest {
            instance_name: self.instance.clone(),
            digests: batch.iter().map(|d| d.to_proto()).collect(),
            acceptable_compressors: self.acceptable(&batch).await,
            digest_function: f.proto_value(),
        };
        let resp = self
            .retry
            .unary("BatchReadBlobs", &self.cas(), &req, |mut c, r| async move { c.batch_read_blobs(r).await })
            .await?;
        let mut got: HashMap<Digest, Result<Bytes>> = HashMap::new();
        for r in resp.responses {
            let Some(Ok(d)) = r.digest.as_ref().map(|d| Digest::from_proto_with(f, d)) else {
                continue;
            };
            let code = r.status.as_ref().map(|s| s.code).unwrap_or(0);
            let res = if code == tonic::Code::Ok as i32 {
                compressed::batch_data(&d, r.compressor, &r.data).and_then(|data| verify(&d, &data).map(|_| data))
            } else if code == tonic::Code::NotFound as i32 {
                Err(Error::MissingBlob(d))
            } else {
                let msg = r.status.map(|s| s.message).unwrap_or_default();
                Err(Error::Remote { context: format!("BatchReadBlobs {d}"), code: code.into(), message: msg })
            };
            got.insert(d, res);
        }
        Ok(batch
            .into_iter()
            .map(|d| {
                let res = got.remove(&d).unwrap_or_else(|| {
                    Err(Error::Remote {
                        context: format!("BatchReadBlobs {d}"),
                        code: tonic::Code::Internal,
                        message: "server sent no response for this digest".into(),
                    })
                });
                (d, res)
            })
            .collect())
    }

    async fn batch_write(&self, batch: Vec<(Digest, Bytes)>) -> Result<Vec<(Digest, Result<()>)>> {
        let f = function_of(batch.iter().map(|(d, _)| d));
        let entries = self.batch_entries(&batch).await;
        let req = reapi::BatchUpdateBlobsRequest {
            instance_name: self.instance.clone(),
            requests: batch
                .iter()
                .zip(entries)
                .map(|((d, _), (data, compressor))| reapi::batch_update_blobs_request::Request {
                    digest: Some(d.to_proto()),
                    data,
                    compressor,
                })
                .collect(),
            digest_function: f.proto_value(),
        };
        let resp = self
            .retry
            .unary("BatchUpdateBlobs", &self.cas(), &req, |mut c, r| async move { c.batch_update_blobs(r).await })
            .await?;
        let mut failed: HashMap<Digest, Error> = HashMap::new();
        for r in resp.responses {
            let Some(Ok(d)) = r.digest.as_ref().map(|d| Digest::from_proto_with(f, d)) else {
                continue;
            };
            if let Some(s) = r.status.filter(|s| s.code != 0) {
                failed.insert(
                    d,
                    Error::Remote { context: format!("BatchUpdateBlobs {d}"), code: s.code.into(), message: s.message },
                );
            }
        }
        Ok(batch.into_iter().map(|(d, _)| (d, failed.remove(&d).map_or(Ok(()), Err))).collect())
    }

    /// One ByteStream Write of a blob (a `'static` future: it owns its client), through
    /// `compressed-blobs/zstd` when `zstd`.
    fn bytestream_write(
        &self,
        digest: Digest,
        data: ByteStream,
        zstd: bool,
    ) -> BoxFuture<'static, std::result::Result<(), tonic::Status>> {
        let mut client = self.bytestream();
        let size = digest.size();
        // The request stream is fed from a task through a channel: a concrete stream type
        // keeps the client future provably Send (a boxed stream trips a rustc HRTB limit).
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let (mut reqs, sent) = if zstd {
            write_requests(self.compressed_write_resource(&digest), crate::cas::compress::compress_stream(data))
        } else {
            write_requests(self.write_resource(&digest), data)
        };
        tokio::spawn(async move {
            while let Some(r) = reqs.next().await {
                if tx.send(r).await.is_err() {
                    break;
                }
            }
        });
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        Box::pin(async move {
            let resp = client.write(requests).await?.into_inner();
            // A compressed upload commits the compressed bytes sent (or -1: already there).
            let sent = sent.load(std::sync::atomic::Ordering::Relaxed) as i64;
            if resp.committed_size != size as i64 && resp.committed_size != -1 && !(zstd && resp.committed_size == sent)
            {
                return Err(tonic::Status::data_loss(format!(
                    "server committed {} of {size} bytes of {digest}",
                    resp.committed_size
                )));
            }
            Ok(())
        })
    }

    async fn read_stream_once(
        &self,
        digest: &Digest,
        offset: u64,
        limit: u64,
    ) -> std::result::Result<ByteStream, tonic::Status> {
        // Compressed reads carry no limit; read_offset counts uncompressed bytes.
        let zstd = limit == 0 && self.zstd_stream(digest).await;
        let req = ReadRequest {
            resource_name: if zstd { self.compressed_read_resource(digest) } else { self.read_resource(digest) },
            read_offset: offset as i64,
            read_limit: limit as i64,
        };
        let stream = self.bytestream().read(req).await?.into_inner();
        let digest = *digest;
        let timeout = self.retry.timeout;
        let s = futures::stream::unfold(stream, move |mut s| async move {
            match tokio::time::timeout(timeout, s.message()).await {
                Ok(Ok(Some(m))) => Some((Ok(m.data), s)),
                Ok(Ok(None)) => None,
                Ok(Err(st)) => Some((Err(status_for(&digest, st)), s)),
                Err(_) => Some((Err(Error::DeadlineExceeded(format!("reading {digest}: stalled"))), s)),
            }
        });
        if zstd {
            let what = format!("ByteStream.Read {digest}");
            return Ok(crate::cas::compress::decompress_stream(s.boxed(), digest.size().saturating_sub(offset), what));
        }
        Ok(s.boxed())
    }
}

impl GrpcStore {
    /// The whole of a blob as one stream that resumes where a broken or stalled read stopped
    /// (at most `rpc_timeout` without a byte, `retries` attempts in a row without progress).
    /// Not verified: the caller hashes what passes.
    fn read_resuming<'a>(&'a self, digest: &Digest) -> futures::stream::BoxStream<'a, Result<Bytes>> {
        let digest = *digest;
        let open: Open<'a> = Box::new(move |offset| async move { self.read_stream(&digest, offset, 0).await }.boxed());
        let policy = Resume { idle: self.retry.timeout, retries: self.retry.retries };
        resuming(digest, open, policy, |_| {})
    }
}

/// Runs `call` on every batch, `PARALLEL_BATCHES` at a time, and joins the per-blob results.
async fn in_parallel<B, T, F, Fut>(batches: Vec<B>, call: F) -> Result<Vec<(Digest, T)>>
where
    F: Fn(B) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<(Digest, T)>>>,
{
    let done: Vec<Vec<(Digest, T)>> =
        futures::stream::iter(batches).map(call).buffer_unordered(PARALLEL_BATCHES).try_collect().await?;
    Ok(done.into_iter().flatten().collect())
}

/// The function of a batch's digests (batches hold one function; empty: SHA-256).
fn function_of<'a>(mut digests: impl Iterator<Item = &'a Digest>) -> DigestFunction {
    digests.next().map(|d| d.function()).unwrap_or_default()
}

/// The `FUNCTION/` segment of a resource name. REAPI leaves it out for the functions that
/// predate the field (their hash length tells them apart; servers such as buildbox-casd
/// 1.4.25 refuse it there), so only a function sharing a length with another gets one.
fn function_segment(d: &Digest) -> String {
    match d.function() {
        f if DigestFunction::from_hex_len(f.hex_len()) == Some(f) => String::new(),
        f => format!("{f}/"),
    }
}

fn status_for(digest: &Digest, st: tonic::Status) -> Error {
    if st.code() == tonic::Code::NotFound {
        Error::MissingBlob(*digest)
    } else {
        Error::remote(format!("ByteStream.Read {digest}"), st)
    }
}

fn missing_or(digest: &Digest, e: Error) -> Error {
    match e {
        Error::Remote { code: tonic::Code::NotFound, .. } => Error::MissingBlob(*digest),
        e => e,
    }
}

#[async_trait::async_trait]
impl Cas for GrpcStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut seen = HashSet::new();
        let wanted: Vec<Digest> = digests.iter().filter(|d| !d.is_empty_blob() && seen.insert(**d)).copied().collect();
        let mut missing = HashSet::new();
        for chunk in wanted.chunk_by(|a, b| a.function() == b.function()).flat_map(|c| c.chunks(FIND_MISSING_CHUNK)) {
            let f = function_of(chunk.iter());
            let req = reapi::FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: chunk.iter().map(|d| d.to_proto()).collect(),
                digest_function: f.proto_value(),
            };
            let resp = self
                .retry
                .unary("FindMissingBlobs", &self.cas(), &req, |mut c, r| async move { c.find_missing_blobs(r).await })
                .await?;
            for d in &resp.missing_blob_digests {
                missing.insert(Digest::from_proto_with(f, d)?);
            }
        }
        Ok(wanted.into_iter().filter(|d| missing.contains(d)).collect())
    }

    async fn read_stream(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ByteStream> {
        if digest.is_empty_blob() && offset == 0 {
            return Ok(futures::stream::empty().boxed());
        }
        self.retry
            .run(&format!("ByteStream.Read {digest}"), || self.read_stream_once(digest, offset, limit))
            .await
            .map_err(|e| missing_or(digest, e))
    }

    async fn write_stream(&self, digest: &Digest, data: ByteStream) -> Result<()> {
        // A consumed stream cannot be replayed, so this path is not retried; `write` and
        // `write_file` retry with a fresh source.
        let zstd = self.zstd_stream(digest).await;
        self.bytestream_write(*digest, data, zstd)
            .await
            .map_err(|e| Error::remote(format!("ByteStream.Write {digest}"), e))
    }

    async fn read(&self, digest: &Digest) -> Result<Bytes> {
        if digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        if digest.size() + PER_BLOB_OVERHEAD <= self.max_batch_bytes().await {
            let mut out = self.batch_read(vec![*digest]).await?;
            return out.pop().map(|(_, r)| r).unwrap_or(Err(Error::MissingBlob(*digest)));
        }
        let mut buf = Vec::with_capacity(digest.size() as usize);
        let mut s = self.read_resuming(digest);
        while let Some(chunk) = s.next().await {
            buf.extend_from_slice(&chunk?);
        }
        verify(digest, &buf)?;
        Ok(buf.into())
    }

    async fn write(&self, digest: &Digest, data: Bytes) -> Result<()> {
        if digest.is_empty_blob() {
            return verify(digest, &data);
        }
        if digest.size() + PER_BLOB_OVERHEAD <= self.max_batch_bytes().await {
            let mut out = self.batch_write(vec![(*digest, data)]).await?;
            return out.pop().map(|(_, r)| r).unwrap_or(Ok(()));
        }
        let zstd = self.zstd_stream(digest).await;
        self.retry
            .run(&format!("ByteStream.Write {digest}"), || {
                let d = data.clone();
                self.bytestream_write(*digest, futures::stream::once(async move { Ok(d) }).boxed(), zstd)
            })
            .await
    }

    async fn read_many(&self, digests: &[Digest]) -> Result<Vec<(Digest, Result<Bytes>)>> {
        let budget = self.max_batch_bytes().await;
        let (batches, large) = Self::plan(digests, budget);
        let mut out = in_parallel(batches, |b| self.batch_read(b)).await?;
        for d in large {
            out.push((d, self.read(&d).await));
        }
        Ok(out)
    }

    async fn write_many(&self, blobs: Vec<(Digest, Bytes)>) -> Result<Vec<(Digest, Result<()>)>> {
        let budget = self.max_batch_bytes().await;
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        let mut by_digest: HashMap<Digest, Bytes> = blobs.into_iter().collect();
        let (batches, large) = Self::plan(&digests, budget);
        let batches: Vec<Vec<(Digest, Bytes)>> = batches
            .into_iter()
            .map(|b| b.into_iter().filter_map(|d| by_digest.remove(&d).map(|x| (d, x))).collect())
            .collect();
        let mut out = in_parallel(batches, |b| self.batch_write(b)).await?;
        for d in large {
            if let Some(data) = by_digest.remove(&d) {
                out.push((d, self.write(&d, data).await));
            }
        }
        Ok(out)
    }

    async fn write_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        if let Some(done) = self.upload_chunked(digest, path).await {
            return done;
        }
        let path = path.to_path_buf();
        let zstd = self.zstd_stream(digest).await;
        self.retry
            .run(&format!("ByteStream.Write {digest} from {}", path.display()), || {
                let path = path.clone();
                async move {
                    let stream = super::file_stream(path).await.map_err(tonic::Status::from)?;
                    self.bytestream_write(*digest, stream, zstd).await
                }
            })
            .await
    }

    async fn read_to_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        if let Some(chunks) = self.read_chunked(digest).await {
            // Bytes that do not match are the server's lie, not a reason to ask again.
            match super::stream_to_file(digest, chunks, path).await {
                Err(e) if !matches!(e, Error::DigestMismatch { .. }) => {
                    tracing::warn!(digest = %digest, error = %e, "chunked read failed; reading the blob whole")
                }
                done => return done,
            }
        }
        super::stream_to_file(digest, self.read_resuming(digest), path).await
    }

    async fn split(&self, digest: &Digest) -> Result<Option<Vec<Digest>>> {
        self.split_rpc(digest).await
    }

    async fn tree_pages(&self, root: &Digest) -> Result<Option<super::TreePages>> {
        Ok(Some(self.tree_page_stream(root)))
    }

    async fn get_tree(&self, root: &Digest) -> Result<Vec<(Digest, Directory)>> {
        match self.get_tree_rpc(root).await {
            Ok(t) => Ok(t),
            Err(e @ Error::InvalidDirectory { .. }) | Err(e @ Error::MissingBlob(_)) => Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "GetTree unusable; walking the tree with batch reads");
                super::walk_tree(self, root).await
            }
        }
    }
}
