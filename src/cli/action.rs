//! `casfs ls --action` and `casfs cat --action`: the browse view of an action, without a mount.

use std::io::Write;
use std::sync::Arc;

use casfs::cache::{CacheConfig, LocalCache};
use casfs::digest::Digest;
use casfs::error::{Error, Result};
use casfs::fs::{browse, Attr, CasFs, FetchConfig, Fetcher, FsConfig, Kind, Remote};
use casfs::metrics::Metrics;

use super::{CmdResult, RemoteArgs};

/// The browse filesystem over one remote, and the inode of `path` in the action's view.
async fn resolve(remote: &RemoteArgs, action: &Digest, path: &str) -> Result<(Arc<CasFs>, Attr, tempfile::TempDir)> {
    let store = Arc::new(remote.store()?);
    let tmp = tempfile::tempdir().map_err(|e| Error::io("creating a temporary cache", e))?;
    let metrics = Metrics::new();
    let cache = LocalCache::open(&CacheConfig::new(tmp.path(), 0), &metrics)?;
    let fetcher = Fetcher::new(cache, FetchConfig::default(), metrics);
    let root = browse::root(fetcher.clone(), browse::Instances::single(Remote::new(store.clone(), Some(store))));
    let fs = CasFs::new(root, fetcher, FsConfig::default());
    let root = fs.resolve(casfs::fs::ROOT, &format!("_/actions/sha256/{}", action.to_path_form())).await;
    let root = root.map_err(|e| match e.errno() {
        libc::ENOENT => Error::NotFound(format!("no cached result for action {action}")),
        _ => e,
    })?;
    let attr = fs.resolve(root.ino, path).await?;
    Ok((fs, attr, tmp))
}

fn mode(a: &Attr) -> &'static str {
    match (a.kind, a.perm) {
        (Kind::Dir, _) => "dr-xr-xr-x",
        (Kind::Symlink, _) => "lrwxrwxrwx",
        (Kind::File, 0o555) => "-r-xr-xr-x",
        (Kind::File, _) => "-r--r--r--",
    }
}

/// Lists a path of an action's view (recursively with `recursive`).
pub async fn ls(remote: &RemoteArgs, action: &Digest, path: &str, recursive: bool) -> CmdResult {
    let (fs, attr, _tmp) = resolve(remote, action, path).await?;
    let mut out = std::io::stdout().lock();
    let mut stack = vec![(String::new(), attr)];
    while let Some((prefix, dir)) = stack.pop() {
        if dir.kind != Kind::Dir {
            writeln!(out, "{} {:>12} {}", mode(&dir), dir.size, path).map_err(|e| Error::io("writing to stdout", e))?;
            continue;
        }
        let listing = fs.listing(dir.ino).await?;
        let entries = fs.list(dir.ino, &listing, 2)?;
        let mut subdirs = Vec::new();
        for (_, name, a) in entries {
            let a = fs.lookup(dir.ino, &name).await.unwrap_or(a);
            let shown = format!("{prefix}{name}");
            let line = match a.kind {
                Kind::Symlink => format!("{} {:>12} {shown} -> {}", mode(&a), "-", fs.readlink(a.ino)?),
                Kind::Dir => format!("{} {:>12} {shown}/", mode(&a), "-"),
                Kind::File => format!("{} {:>12} {shown}", mode(&a), a.size),
            };
            writeln!(out, "{line}").map_err(|e| Error::io("writing to stdout", e))?;
            if recursive && a.kind == Kind::Dir {
                subdirs.push((format!("{shown}/"), a));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// Writes a file of an action's view to stdout.
pub async fn cat(remote: &RemoteArgs, action: &Digest, path: &str) -> CmdResult {
    let (fs, attr, _tmp) = resolve(remote, action, path).await?;
    if attr.kind != Kind::File {
        return Err(Error::InvalidArgument(format!("{path} is not a file")).into());
    }
    let mut out = std::io::stdout().lock();
    let mut offset = 0;
    while offset < attr.size {
        let chunk = fs.read(attr.ino, offset, 1 << 20).await?;
        if chunk.is_empty() {
            break;
        }
        offset += chunk.len() as u64;
        out.write_all(&chunk).map_err(|e| Error::io("writing to stdout", e))?;
    }
    out.flush().map_err(|e| Error::io("writing to stdout", e))?;
    Ok(())
}
