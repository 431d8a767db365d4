//! Eager materialization, for hosts without FUSE or overlayfs: the whole input root is made
//! local (verified, in the blob cache) and laid out with hard links, as BuildBox and
//! Buildfarm do. Executables are copied so a shared inode never needs two modes.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use super::capture::Unchanged;
use crate::cache::LocalCache;
use crate::cas::SharedCas;
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::tree::Directory;

/// Files up to this size are fetched in batches.
const SMALL: u64 = 1 << 20;

/// What was laid out: for each input file, its inode and digest, so capture can tell which
/// outputs the command left alone.
pub struct Materialized {
    root: PathBuf,
    files: HashMap<PathBuf, (Stamp, Digest)>,
}

/// What tells an untouched hard link from a changed one: a write changes the size or the
/// times (to the nanosecond: an append within the second of linking must still count).
#[derive(PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Stamp {
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

impl Unchanged for Materialized {
    fn digest(&self, rel: &Path) -> Option<Digest> {
        let (stamp, d) = self.files.get(rel)?;
        // The hard link the command was given, untouched.
        let meta = std::fs::symlink_metadata(self.root.join(rel)).ok()?;
        (Stamp::of(&meta) == *stamp).then_some(*d)
    }
}

/// Makes every blob of the tree `root` local (fetching only what the cache lacks, in any of
/// its tiers). Fetched blobs go straight to blob files: each is about to be linked.
async fn fetch_all(cas: &SharedCas, cache: &LocalCache, digests: Vec<Digest>) -> Result<()> {
    let missing: Vec<Digest> = digests.into_iter().filter(|d| !cache.contains(d)).collect();
    let (small, large): (Vec<Digest>, Vec<Digest>) = missing.into_iter().partition(|d| d.size() <= SMALL);
    let mut missing_inputs = Vec::new();
    for chunk in small.chunks(512) {
        for (d, r) in cas.read_many(chunk).await? {
            match r {
                // `read_many` returns verified bytes only.
                Ok(bytes) => cache.write_file(&d, &bytes)?,
                Err(Error::MissingBlob(m)) => missing_inputs.push(m),
                Err(e) => return Err(e),
            }
        }
    }
    futures::stream::iter(large)
        .map(|d| async move {
            let s = cas.read_stream(&d, 0, 0).await?;
            cache.write_file_stream(&d, s).await
        })
        .buffer_unordered(4)
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| match e {
            Error::MissingBlob(m) => Error::MissingInputs(vec![m]),
            e => e,
        })?;
    if !missing_inputs.is_empty() {
        return Err(Error::MissingInputs(missing_inputs));
    }
    Ok(())
}

/// Every blob to a file of its own, for hard links: (digest, blob file path).
async fn link_sources(cache: &LocalCache, digests: impl Iterator<Item = Digest>) -> Result<HashMap<Digest, PathBuf>> {
    let mut out = HashMap::new();
    for d in digests.filter(|d| !d.is_empty_blob()) {
        let path = cache.link_source(&d).await?.ok_or(Error::MissingInputs(vec![d]))?;
        out.insert(d, path);
    }
    Ok(out)
}

/// Lays the tree of `root` out under `dest` (an existing empty folder).
pub async fn materialize(cas: &SharedCas, cache: &Arc<LocalCache>, root: Digest, dest: &Path) -> Result<Materialized> {
    let dirs: HashMap<Digest, Directory> = match cas.get_tree(&root).await {
        Err(Error::MissingBlob(m)) => return Err(Error::MissingInputs(vec![m])),
        other => other?.into_iter().collect(),
    };
    let mut layout = crate::transfer::Layout::default();
    crate::transfer::lay_out(&dirs, &root, dest.to_path_buf(), &mut layout, 0)?;
    fetch_all(cas, cache, layout.files.keys().copied().collect()).await?;
    let sources = link_sources(cache, layout.files.keys().copied()).await?;
    let empty = dest.join(".casfs-empty");
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<Materialized> {
        for d in &layout.dirs {
            std::fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
        }
        let mut out = Materialized { root: dest.clone(), files: HashMap::new() };
        let mut linked_paths = Vec::new();
        for (digest, paths) in &layout.files {
            let src = match sources.get(digest) {
                Some(p) => p.clone(),
                None => {
                    std::fs::write(&empty, b"").ctx(|| "creating an empty file".into())?;
                    empty.clone()
                }
            };
            let mut linked = false;
            for (p, exec) in paths {
                if *exec {
                    std::fs::copy(&src, p).ctx(|| format!("copying to {}", p.display()))?;
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o555))
                        .ctx(|| format!("chmod {}", p.display()))?;
                } else {
                    if !linked {
                        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o444))
                            .ctx(|| format!("chmod {}", src.display()))?;
                        linked = true;
                    }
                    std::fs::hard_link(&src, p).ctx(|| format!("linking {}", p.display()))?;
                    linked_paths.push((p, *digest));
                }
            }
        }
        // Stamped once every link exists: each new link changes the shared inode's ctime.
        for (p, digest) in linked_paths {
            let m = std::fs::symlink_metadata(p).ctx(|| format!("stat {}", p.display()))?;
            let rel = p.strip_prefix(&dest).unwrap_or(p).to_path_buf();
            out.files.insert(rel, (Stamp::of(&m), digest));
        }
        let _ = std::fs::remove_file(&empty);
        for (p, target) in &layout.symlinks {
            std::os::unix::fs::symlink(target, p).ctx(|| format!("symlink {}", p.display()))?;
        }
        Ok(out)
    })
    .await
    .map_err(|e| Error::Internal(format!("materialize task: {e}")))?
}
