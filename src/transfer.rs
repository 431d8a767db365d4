//! Whole-tree transfers: upload a local folder as a Directory tree, download one back.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cas::Cas;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, IoContext, Result};
use crate::tree::{build_local_tree_with, count_bytes, Directory, TreeStats};

/// Files up to this size are read into memory and sent in batches; larger ones stream.
const SMALL_FILE: u64 = 1 << 20;
/// Bytes of small files gathered into one group of batch writes or reads.
const GROUP_BYTES: u64 = 16 << 20;
/// Groups or large blobs in flight at once.
const PARALLEL: usize = 4;

/// What an upload did.
#[derive(Clone, Debug)]
pub struct UploadReport {
    /// Digest of the root Directory.
    pub root: Digest,
    /// What the walk found.
    pub stats: TreeStats,
    /// Distinct blobs the tree needs (files and Directories).
    pub blobs: usize,
    /// Blobs the server lacked and that were sent.
    pub uploaded_blobs: usize,
    /// Bytes sent.
    pub uploaded_bytes: u64,
}

fn bar(show: bool, total: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn check_all<T>(results: Vec<(Digest, Result<T>)>) -> Result<()> {
    for (_, r) in results {
        r?;
    }
    Ok(())
}

/// Uploads a local folder: hashes it into canonical Directories, asks the store which blobs it
/// lacks, and sends only those (small files in batches, large ones streamed). `progress` shows
/// bars on stderr when it is a terminal.
pub async fn upload_dir<C: Cas + ?Sized>(cas: &C, dir: &Path, progress: bool) -> Result<UploadReport> {
    upload_dir_with(DigestFunction::Sha256, cas, dir, progress).await
}

/// [`upload_dir`] with files and Directory messages hashed by `f`.
pub async fn upload_dir_with<C: Cas + ?Sized>(
    f: DigestFunction,
    cas: &C,
    dir: &Path,
    progress: bool,
) -> Result<UploadReport> {
    let dir = dir.to_path_buf();
    let total = if progress { count_bytes(&dir) } else { 0 };
    let hash_bar = bar(progress, total, "hashing");
    let hb = hash_bar.clone();
    let tree = tokio::task::spawn_blocking(move || build_local_tree_with(f, &dir, &move |n| hb.inc(n)))
        .await
        .map_err(|e| Error::Internal(format!("hashing task: {e}")))??;
    hash_bar.finish_and_clear();

    // A Directory and a file can share a digest (the empty one): count each blob once.
    let mut all: Vec<Digest> = tree.directories.keys().copied().collect();
    all.extend(tree.files.keys().filter(|d| !tree.directories.contains_key(d)).copied());
    let missing = cas.find_missing(&all).await?;
    let mut blobs = Vec::new();
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut bytes = 0;
    for d in &missing {
        bytes += d.size();
        if let Some(data) = tree.directories.get(d) {
            blobs.push((*d, Bytes::from(data.clone())));
        } else if let Some(path) = tree.files.get(d) {
            if d.size() <= SMALL_FILE {
                small.push((*d, path.clone()));
            } else {
                large.push((*d, path.clone()));
            }
        }
    }
    let up_bar = Arc::new(bar(progress, bytes, "uploading"));

    // Small files: read a group on a blocking thread, send it as batches.
    let mut groups: Vec<Vec<(Digest, PathBuf)>> = Vec::new();
    let mut cur_bytes = 0;
    for item in small {
        if groups.is_empty() || cur_bytes + item.0.size() > GROUP_BYTES {
            groups.push(Vec::new());
            cur_bytes = 0;
        }
        cur_bytes += item.0.size();
        groups.last_mut().expect("a group").push(item);
    }
    let dir_bytes: u64 = blobs.iter().map(|(d, _)| d.size()).sum();
    check_all(cas.write_many(blobs).await?)?;
    up_bar.inc(dir_bytes);
    futures::stream::iter(groups)
        .map(|group| {
            let up_bar = up_bar.clone();
            async move {
                let n: u64 = group.iter().map(|(d, _)| d.size()).sum();
                let loaded = tokio::task::spawn_blocking(move || -> Result<Vec<(Digest, Bytes)>> {
                    group
                        .into_iter()
                        .map(|(d, p)| {
                            Ok((d, Bytes::from(std::fs::read(&p).ctx(|| format!("reading {}", p.display()))?)))
                        })
                        .collect()
                })
                .await
                .map_err(|e| Error::Internal(format!("reading task: {e}")))??;
                // A file changed since it was hashed would be refused by the server; say so.
                for (d, data) in &loaded {
                    crate::cas::verify(d, data).map_err(|_| {
                        Error::FailedPrecondition(format!("a file with digest {d} changed during upload"))
                    })?;
                }
                check_all(cas.write_many(loaded).await?)?;
                up_bar.inc(n);
                Ok::<_, Error>(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    futures::stream::iter(large)
        .map(|(d, path)| {
            let up_bar = up_bar.clone();
            async move {
                cas.write_file(&d, &path).await?;
                up_bar.inc(d.size());
                Ok::<_, Error>(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    up_bar.finish_and_clear();
    Ok(UploadReport {
        root: tree.root,
        stats: tree.stats,
        blobs: all.len(),
        uploaded_blobs: missing.len(),
        uploaded_bytes: bytes,
    })
}

/// Every file and symlink of a tree with its path, plus every directory path.
#[derive(Default)]
pub(crate) struct Layout {
    pub(crate) dirs: Vec<PathBuf>,
    pub(crate) files: HashMap<Digest, Vec<(PathBuf, bool)>>,
    pub(crate) symlinks: Vec<(PathBuf, String)>,
}

pub(crate) fn lay_out(
    dirs: &HashMap<Digest, Directory>,
    digest: &Digest,
    path: PathBuf,
    out: &mut Layout,
    depth: usize,
) -> Result<()> {
    if depth > 4096 {
        return Err(Error::InvalidArgument(format!("tree deeper than 4096 levels at {}", path.display())));
    }
    let dir = dirs.get(digest).ok_or(Error::MissingBlob(*digest))?;
    out.dirs.push(path.clone());
    for f in &dir.files {
        out.files.entry(f.digest).or_default().push((path.join(&f.name), f.executable));
    }
    for s in &dir.symlinks {
        out.symlinks.push((path.join(&s.name), s.target.clone()));
    }
    for d in &dir.dirs {
        lay_out(dirs, &d.digest, path.join(&d.name), out, depth + 1)?;
    }
    Ok(())
}

fn place_copies(first: &Path, rest: &[(PathBuf, bool)], exec: bool) -> Result<()> {
    let mode = if exec { 0o755 } else { 0o644 };
    std::fs::set_permissions(first, std::fs::Permissions::from_mode(mode))
        .ctx(|| format!("chmod {}", first.display()))?;
    for (p, exec) in rest {
        std::fs::copy(first, p).ctx(|| format!("copying to {}", p.display()))?;
        let mode = if *exec { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).ctx(|| format!("chmod {}", p.display()))?;
    }
    Ok(())
}

/// Downloads the tree of a Directory digest into `dest` (which must not exist or be empty).
/// Returns the counts of what was written.
pub async fn download_dir<C: Cas + ?Sized>(cas: &C, root: &Digest, dest: &Path, progress: bool) -> Result<TreeStats> {
    if dest.exists() && std::fs::read_dir(dest).ctx(|| format!("reading {}", dest.display()))?.next().is_some() {
        return Err(Error::InvalidArgument(format!("{} exists and is not empty", dest.display())));
    }
    let dirs: HashMap<Digest, Directory> = cas.get_tree(root).await?.into_iter().collect();
    let mut layout = Layout::default();
    lay_out(&dirs, root, dest.to_path_buf(), &mut layout, 0)?;
    for d in &layout.dirs {
        std::fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
    }
    let mut stats =
        TreeStats { dirs: layout.dirs.len() as u64, symlinks: layout.symlinks.len() as u64, ..Default::default() };
    for paths in layout.files.values() {
        stats.files += paths.len() as u64;
    }
    let total: u64 = layout.files.keys().map(|d| d.size()).sum();
    stats.bytes = layout.files.iter().map(|(d, p)| d.size() * p.len() as u64).sum();
    let pb = Arc::new(bar(progress, total, "fetching"));
    let mut small: Vec<Digest> = layout.files.keys().filter(|d| d.size() <= SMALL_FILE).copied().collect();
    small.sort();
    let large: Vec<Digest> = layout.files.keys().filter(|d| d.size() > SMALL_FILE).copied().collect();
    let mut groups: Vec<Vec<Digest>> = Vec::new();
    let mut cur = 0;
    for d in small {
        if groups.is_empty() || cur + d.size() > GROUP_BYTES {
            groups.push(Vec::new());
            cur = 0;
        }
        cur += d.size();
        groups.last_mut().expect("a group").push(d);
    }
    let layout = Arc::new(layout);
    futures::stream::iter(groups)
        .map(|group| {
            let (layout, pb) = (layout.clone(), pb.clone());
            async move {
                let got = cas.read_many(&group).await?;
                tokio::task::spawn_blocking(move || -> Result<()> {
                    for (d, data) in got {
                        let data = data?;
                        let paths = &layout.files[&d];
                        let (first, exec) = &paths[0];
                        std::fs::write(first, &data).ctx(|| format!("writing {}", first.display()))?;
                        place_copies(first, &paths[1..], *exec)?;
                        pb.inc(d.size());
                    }
                    Ok(())
                })
                .await
                .map_err(|e| Error::Internal(format!("writing task: {e}")))?
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    futures::stream::iter(large)
        .map(|d| {
            let (layout, pb) = (layout.clone(), pb.clone());
            async move {
                let paths = &layout.files[&d];
                let (first, exec) = &paths[0];
                cas.read_to_file(&d, first).await?;
                place_copies(first, &paths[1..], *exec)?;
                pb.inc(d.size());
                Ok::<_, Error>(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    for (p, target) in &layout.symlinks {
        std::os::unix::fs::symlink(target, p).ctx(|| format!("symlink {}", p.display()))?;
    }
    pb.finish_and_clear();
    Ok(stats)
}
