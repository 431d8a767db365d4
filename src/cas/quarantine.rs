//! A store's own disk going bad: blob files found corrupt are moved aside, not served and
//! not counted as present, so that the next upload (or fetch) of the blob heals it; a full
//! disk is warned about once, not once per refused blob.
//!
//! Checks are cheap by construction: a whole-blob read hashes what it streams anyway, and
//! a mismatch found at its end puts the file aside ([`verified_stream`]); small blobs are
//! hashed whole when read. A server's store hashes each file once in its life, unless the
//! file changed since (see `cas::trusted`). The folder of bad files keeps only the newest few.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use futures::StreamExt;

use super::trusted::Trusted;
use super::ByteStream;
use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};

/// Bad files kept for a person to look at; older ones are deleted.
const KEEP: usize = 16;

/// Where a store puts corrupt blob files, and how many it has put there.
#[derive(Clone)]
pub(crate) struct Quarantine {
    dir: PathBuf,
    count: Arc<AtomicU64>,
    /// Keep bad files aside (a server's storage); false deletes them (a cache's).
    pub(crate) keep: bool,
}

impl Quarantine {
    /// Bad files go to `dir` (created when first needed); `count` counts them.
    pub(crate) fn new(dir: PathBuf, count: Arc<AtomicU64>) -> Self {
        Quarantine { dir, count, keep: true }
    }

    /// Counts into another counter from now on (a metrics registry's).
    pub(crate) fn set_counter(&mut self, count: Arc<AtomicU64>) {
        count.fetch_add(self.count.load(Ordering::Relaxed), Ordering::Relaxed);
        self.count = count;
    }

    /// Moves the blob file at `path` aside, if it is still the file that was read (`ino`,
    /// when known: a file healed since is left alone). True when it was moved (or is gone).
    pub(crate) fn put_aside(&self, path: &Path, digest: &Digest, ino: Option<u64>, why: &str) -> bool {
        match std::fs::symlink_metadata(path) {
            Ok(m) if ino.is_some_and(|i| i != m.ino()) => return false,
            Ok(_) => {}
            Err(_) => return true,
        }
        let dest = self.dir.join(digest.to_path_form());
        let moved = match self.keep {
            true => std::fs::create_dir_all(&self.dir).and_then(|()| std::fs::rename(path, &dest)),
            false => Err(std::io::ErrorKind::Unsupported.into()),
        };
        let moved = moved.map(|()| true).or_else(|_| std::fs::remove_file(path).map(|()| false));
        self.count.fetch_add(1, Ordering::Relaxed);
        match moved {
            Ok(true) => tracing::warn!(digest = %digest, path = %path.display(), aside = %dest.display(), why,
                "corrupt blob in storage quarantined; it counts as missing until uploaded again"),
            Ok(false) => tracing::warn!(digest = %digest, path = %path.display(), why,
                "corrupt blob deleted; it counts as missing until stored again"),
            Err(e) => tracing::warn!(digest = %digest, path = %path.display(), why, error = %e,
                "corrupt blob in storage could not be moved aside; it counts as missing"),
        }
        self.trim();
        true
    }

    /// Deletes all but the newest [`KEEP`] bad files.
    fn trim(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return };
        let mut files: Vec<_> =
            rd.flatten().filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path()))).collect();
        if files.len() <= KEEP {
            return;
        }
        files.sort();
        for (_, p) in &files[..files.len() - KEEP] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Whether a store's last write was refused for want of space.
#[derive(Default)]
pub(crate) struct FullLatch(AtomicBool);

impl FullLatch {
    /// Records how a write into the store at `root` went: the first refusal for want of
    /// space is logged at WARN (later ones at DEBUG) until a write succeeds again.
    pub(crate) fn note<T>(&self, root: &Path, res: &Result<T>) {
        match res {
            Ok(_) => {
                if self.0.swap(false, Ordering::Relaxed) {
                    tracing::info!(root = %root.display(), "storage accepts writes again");
                }
            }
            Err(e) if e.is_disk_full() => {
                if !self.0.swap(true, Ordering::Relaxed) {
                    tracing::warn!(root = %root.display(), error = %e,
                        "storage is full: writes are refused (and logged at DEBUG) until one succeeds");
                } else {
                    tracing::debug!(error = %e, "write refused: storage full");
                }
            }
            Err(_) => {}
        }
    }
}

/// Hashes the file at `path` (blocking), reading at most one byte past `digest`'s size:
/// what it holds and its inode number, or `None` when there is no such file.
pub(crate) fn hash_file(path: &Path, digest: &Digest) -> Result<Option<(Digest, Option<u64>)>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("opening blob {digest}"), e)),
    };
    let ino = ino_of(&file);
    let mut hasher = Hasher::new_with(digest.function());
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf).ctx(|| format!("reading blob {digest}"))?;
        if n == 0 || hasher.len() > digest.size() {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Some((hasher.finish(), ino)))
}

/// Reads and verifies a whole small blob (blocking), refreshing its mtime when older than
/// `touch_after`. A file of the wrong length is a blob the store does not have. A file
/// `trusted` knows unchanged since it was verified is not hashed again; one verified now is
/// told to it.
pub(crate) fn read_whole(
    path: &Path,
    digest: &Digest,
    touch_after: Duration,
    trusted: Option<&Trusted>,
) -> Result<Bytes> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::MissingBlob(*digest)),
        Err(e) => return Err(Error::io(format!("opening blob {digest}"), e)),
    };
    let meta = file.metadata().ctx(|| format!("reading blob {digest}"))?;
    if meta.len() != digest.size() {
        return Err(Error::MissingBlob(*digest));
    }
    let meta = touch_if_older(&file, meta, touch_after, digest)?;
    let mut buf = Vec::with_capacity(digest.size() as usize);
    file.read_to_end(&mut buf).ctx(|| format!("reading blob {digest}"))?;
    if trusted.is_some_and(|t| t.knows(digest, &meta)) {
        return Ok(buf.into());
    }
    super::verify(digest, &buf)?;
    if let Some(t) = trusted {
        t.learn(digest, &meta);
    }
    Ok(buf.into())
}

/// Refreshes an open blob file's mtime (its recency) when older than `touch_after`; returns
/// its metadata as it is now (a touch moves the change time, which [`Trusted`] goes by).
pub(crate) fn touch_if_older(
    file: &std::fs::File,
    meta: std::fs::Metadata,
    touch_after: Duration,
    digest: &Digest,
) -> Result<std::fs::Metadata> {
    let stale = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age > touch_after);
    if stale && file.set_modified(SystemTime::now()).is_ok() {
        return file.metadata().ctx(|| format!("reading blob {digest}"));
    }
    Ok(meta)
}

/// The inode number of an open file (to tell later whether a path still names it).
pub(crate) fn ino_of(file: &std::fs::File) -> Option<u64> {
    file.metadata().ok().map(|m| m.ino())
}

/// `inner`, the whole of blob `digest`, hashed as it passes: when the bytes turn out wrong,
/// the last chunk is replaced by a `DigestMismatch` error and `on_bad` runs (once); when
/// they are right, `on_good` runs before the last chunk goes out.
pub(crate) fn verified_stream(
    inner: ByteStream,
    digest: Digest,
    on_bad: impl FnOnce() + Send + 'static,
    on_good: impl FnOnce() + Send + 'static,
) -> ByteStream {
    let out = async_stream::stream! {
        let mut inner = inner;
        let mut hasher = Hasher::new_with(digest.function());
        let (mut on_bad, mut on_good) = (Some(on_bad), Some(on_good));
        while let Some(chunk) = inner.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            hasher.update(&chunk);
            if hasher.len() >= digest.size() {
                let actual = std::mem::take(&mut hasher).finish();
                if actual != digest {
                    if let Some(f) = on_bad.take() {
                        f();
                    }
                    yield Err(Error::DigestMismatch { expected: Box::new(digest), actual: Box::new(actual) });
                    return;
                }
                if let Some(f) = on_good.take() {
                    f();
                }
            }
            yield Ok(chunk);
        }
    };
    out.boxed()
}
