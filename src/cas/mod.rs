//! The store contracts (`Cas`, `ActionCache`) and their backends (memory, disk, gRPC client),
//! the access-log decorator, and the client of a remote Execution service.
//!
//! Every backend honours the same rules, checked by one conformance suite
//! (`tests/it/conformance.rs`) run against each of them:
//! - the empty blob is always present: never reported missing, always readable;
//! - `write` hashes the bytes and refuses (`DigestMismatch`, nothing stored) when they do not
//!   match the digest; a write of a blob already present succeeds and changes nothing;
//! - `read` of an absent blob is `Error::MissingBlob(digest)`, never an empty buffer;
//! - whole reads are verified against the digest before they are returned; ranged reads return
//!   the bytes the backend has (already verified on the way in for local stores);
//! - `find_missing` returns the absent subset, each absent digest once, in request order.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::digest::{Digest, DigestFunction, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::proto::reapi;
use crate::tree::Directory;

pub mod access_log;
pub mod asset;
pub(crate) mod channel;
pub mod chunks;
pub mod compress;
pub(crate) mod disk;
pub mod execution;
pub(crate) mod grpc;
pub(crate) mod memory;
pub(crate) mod pipe;
mod quarantine;
mod read_ahead;
pub mod resume;
mod trusted;

pub use channel::{parse_header, Conn};
pub use disk::DiskStore;
pub use grpc::{GrpcStore, RemoteConfig};
pub use memory::MemoryStore;

/// A stream of blob chunks.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// Pages of Directories streamed by [`Cas::tree_pages`].
pub type TreePages = BoxStream<'static, Result<Vec<(Digest, Bytes, Directory)>>>;

/// Chunk size used when streaming blobs between files and stores.
pub const CHUNK: usize = 1 << 20;

/// A content-addressable blob store.
#[async_trait::async_trait]
pub trait Cas: Send + Sync + 'static {
    /// The subset of `digests` that the store does not hold, in request order, without repeats.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>>;

    /// Streams `limit` bytes (0 = to the end) from `offset`. An offset past the end is
    /// `InvalidArgument`; an absent blob is `MissingBlob`.
    async fn read_stream(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ByteStream>;

    /// Stores a blob from a stream of chunks, verifying the whole against `digest`.
    async fn write_stream(&self, digest: &Digest, data: ByteStream) -> Result<()>;

    /// Reads a whole blob, verified.
    async fn read(&self, digest: &Digest) -> Result<Bytes> {
        if digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        let mut stream = self.read_stream(digest, 0, 0).await?;
        let mut buf = Vec::with_capacity(digest.size() as usize);
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk?);
        }
        verify(digest, &buf)?;
        Ok(buf.into())
    }

    /// Reads part of a blob (`limit` 0 = to the end).
    async fn read_range(&self, digest: &Digest, offset: u64, limit: u64) -> Result<Bytes> {
        let mut stream = self.read_stream(digest, offset, limit).await?;
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk?);
        }
        Ok(buf.into())
    }

    /// Stores one in-memory blob.
    async fn write(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.write_stream(digest, futures::stream::once(async { Ok(data) }).boxed()).await
    }

    /// Reads many blobs; each gets its own result (one missing blob fails only itself).
    /// Backends batch this into as few round trips as their limits allow.
    async fn read_many(&self, digests: &[Digest]) -> Result<Vec<(Digest, Result<Bytes>)>> {
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            out.push((*d, self.read(d).await));
        }
        Ok(out)
    }

    /// Stores many in-memory blobs; each gets its own result.
    async fn write_many(&self, blobs: Vec<(Digest, Bytes)>) -> Result<Vec<(Digest, Result<()>)>> {
        let mut out = Vec::with_capacity(blobs.len());
        for (d, data) in blobs {
            out.push((d, self.write(&d, data).await));
        }
        Ok(out)
    }

    /// Stores a blob from a local file, streaming it in chunks.
    async fn write_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        let stream = file_stream(path.to_path_buf()).await?;
        self.write_stream(digest, stream).await
    }

    /// Writes a verified blob to a new local file (via a temporary file and rename, so a
    /// failed or corrupt download leaves nothing at `path`).
    async fn read_to_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        let stream = self.read_stream(digest, 0, 0).await?;
        stream_to_file(digest, stream, path).await
    }

    /// Every Directory reachable from `root`, root first, each validated and returned once.
    async fn get_tree(&self, root: &Digest) -> Result<Vec<(Digest, Directory)>> {
        walk_tree(self, root).await
    }

    /// The Directories under `root` as the store streams them in one call (REAPI GetTree),
    /// page by page, each with the digest of its encoding (and those bytes) but not checked
    /// against any parent: callers keep only those a Directory they trust names. `None`:
    /// the store has no such call (walk with [`Cas::read_many`]). Dropping the stream ends
    /// the call, so a caller bounds what it receives.
    async fn tree_pages(&self, _root: &Digest) -> Result<Option<TreePages>> {
        Ok(None)
    }

    /// The chunks a stored blob splits into as the store itself keeps or computes them
    /// (REAPI SplitBlob), in order, each stored. `None`: the store does not split blobs
    /// (a server then chunks the blob itself with [`chunks::split_stored`]). A chunk list
    /// proves nothing: whoever assembles the chunks verifies the whole against `digest`.
    async fn split(&self, _digest: &Digest) -> Result<Option<Vec<Digest>>> {
        Ok(None)
    }
}

/// A map from action digest to ActionResult.
#[async_trait::async_trait]
pub trait ActionCache: Send + Sync + 'static {
    /// The cached result, or `None` when there is none.
    async fn get_action_result(&self, action: &Digest) -> Result<Option<reapi::ActionResult>>;
    /// Stores (or replaces) the result of an action.
    async fn update_action_result(&self, action: &Digest, result: &reapi::ActionResult) -> Result<()>;
}

/// Shared handles used throughout the crate.
pub type SharedCas = Arc<dyn Cas>;
/// Shared action-cache handle.
pub type SharedActionCache = Arc<dyn ActionCache>;

/// Every blob digest an ActionResult of an action hashed by `f` points at (outputs, trees,
/// stdout/stderr).
pub fn referenced_blobs(f: DigestFunction, r: &reapi::ActionResult) -> Result<Vec<Digest>> {
    let parse = |d: &reapi::Digest| Digest::from_proto_with(f, d);
    let mut out = Vec::new();
    for f in &r.output_files {
        if let Some(d) = &f.digest {
            out.push(parse(d)?);
        }
    }
    for d in &r.output_directories {
        for x in [&d.tree_digest, &d.root_directory_digest].into_iter().flatten() {
            out.push(parse(x)?);
        }
    }
    for x in [&r.stdout_digest, &r.stderr_digest].into_iter().flatten() {
        out.push(parse(x)?);
    }
    Ok(out)
}

/// Trees up to this size have their files checked (and vouched for) on an action-cache hit.
const TREE_CHECK_MAX: u64 = 16 << 20;

/// Every blob an ActionResult references, including the files of each output directory's
/// Tree (read from `cas`, up to [`TREE_CHECK_MAX`]): a client that keeps only digests (Bazel's
/// --remote_download_minimal) fetches those files later.
pub async fn result_blobs(cas: &dyn Cas, f: DigestFunction, result: &reapi::ActionResult) -> Result<Vec<Digest>> {
    let mut refs = referenced_blobs(f, result)?;
    for d in &result.output_directories {
        let Some(tree) = d.tree_digest.as_ref().and_then(|t| Digest::from_proto_with(f, t).ok()) else { continue };
        if tree.size() > TREE_CHECK_MAX {
            continue;
        }
        let bytes = match cas.read(&tree).await {
            Ok(b) => b,
            Err(Error::MissingBlob(_)) => continue,
            Err(e) => return Err(e),
        };
        let tree = <reapi::Tree as prost::Message>::decode(bytes)
            .map_err(|e| Error::InvalidArgument(format!("undecodable Tree {tree}: {e}")))?;
        for dir in tree.root.iter().chain(tree.children.iter()) {
            for file in &dir.files {
                if let Some(fd) = &file.digest {
                    refs.push(Digest::from_proto_with(f, fd)?);
                }
            }
        }
    }
    Ok(refs)
}

/// The cached result of `action`, served only while every blob it references still exists
/// in `cas` (an entry whose outputs were evicted is a miss, so the action runs again). The
/// check is a `find_missing`, which a server's store takes as a promise to keep them.
pub async fn verified_action_result(
    cas: &dyn Cas,
    ac: &dyn ActionCache,
    action: &Digest,
) -> Result<Option<reapi::ActionResult>> {
    let Some(result) = ac.get_action_result(action).await? else { return Ok(None) };
    let refs = result_blobs(cas, action.function(), &result).await?;
    if let Some(m) = cas.find_missing(&refs).await?.first() {
        tracing::info!(action = %action, missing = %m, "action result refers to an evicted blob; treating as a miss");
        return Ok(None);
    }
    Ok(Some(result))
}

/// Checks that `data` hashes to `digest`.
pub fn verify(digest: &Digest, data: &[u8]) -> Result<()> {
    let actual = Digest::of_bytes_with(digest.function(), data);
    if actual != *digest {
        return Err(Error::DigestMismatch { expected: Box::new(*digest), actual: Box::new(actual) });
    }
    Ok(())
}

/// Breadth-first walk of a tree with batched reads; validates every Directory.
pub async fn walk_tree<C: Cas + ?Sized>(cas: &C, root: &Digest) -> Result<Vec<(Digest, Directory)>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut level = vec![*root];
    seen.insert(*root);
    while !level.is_empty() {
        let mut next = Vec::new();
        for (digest, data) in cas.read_many(&level).await? {
            let dir = Directory::decode(&digest, &data?)?;
            for child in &dir.dirs {
                if seen.insert(child.digest) {
                    next.push(child.digest);
                }
            }
            out.push((digest, dir));
        }
        level = next;
    }
    Ok(out)
}

/// Streams bytes `offset..offset + limit` (`limit` 0 = to the end) of an open file that holds
/// `digest`'s bytes, in `CHUNK`-sized pieces read on a blocking thread. A file shorter than
/// the digest says ends the stream with an error.
pub fn file_range_stream(file: Arc<std::fs::File>, digest: Digest, offset: u64, limit: u64) -> ByteStream {
    use std::os::unix::fs::FileExt;
    let end = if limit == 0 { digest.size() } else { digest.size().min(offset.saturating_add(limit)) };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut pos = offset;
        while pos < end {
            let mut buf = vec![0u8; ((end - pos) as usize).min(CHUNK)];
            let res = match file.read_exact_at(&mut buf, pos) {
                Ok(()) => Ok(Bytes::from(buf)),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Err(Error::Internal(format!("blob {digest} is shorter than its digest says")))
                }
                Err(e) => Err(Error::io(format!("reading blob {digest}"), e)),
            };
            let failed = res.is_err();
            pos += CHUNK as u64;
            if tx.blocking_send(res).is_err() || failed {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

/// Streams a local file in `CHUNK`-sized pieces, read on a blocking thread.
pub async fn file_stream(path: std::path::PathBuf) -> Result<ByteStream> {
    use std::io::Read;
    let mut file = std::fs::File::open(&path).ctx(|| format!("opening {}", path.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || loop {
        let mut buf = vec![0u8; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Error::io(format!("reading {}", path.display()), e)));
                    return;
                }
            }
        }
        if filled == 0 {
            return;
        }
        buf.truncate(filled);
        if tx.blocking_send(Ok(buf.into())).is_err() {
            return;
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
}

/// Writes a stream to `path` through a temporary file in the same folder, verifying the digest
/// before the rename.
pub async fn stream_to_file(digest: &Digest, mut stream: BoxStream<'_, Result<Bytes>>, path: &Path) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".casfs-tmp-")
        .tempfile_in(dir)
        .ctx(|| format!("creating a temporary file in {}", dir.display()))?;
    let (file, tmp_path) = tmp.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = Hasher::new_with(digest.function());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        file.write_all(&chunk).await.ctx(|| format!("writing {}", path.display()))?;
    }
    let actual = hasher.finish();
    if actual != *digest {
        return Err(Error::DigestMismatch { expected: Box::new(*digest), actual: Box::new(actual) });
    }
    file.flush().await.ctx(|| format!("writing {}", path.display()))?;
    tmp_path.persist(path).map_err(|e| Error::io(format!("renaming to {}", path.display()), e.error))?;
    Ok(())
}

/// `n` pseudo-random bytes (xorshift), different for every `seed`: incompressible test data
/// that needs no random-number crate.
#[cfg(test)]
pub(crate) fn pseudo_random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
