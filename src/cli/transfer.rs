//! `casfs ls` and `casfs cat`: look at the CAS by digest.

use std::io::Write;

use casfs::cas::{Cas, GrpcStore};
use casfs::digest::Digest;
use casfs::error::{Error, Result};
use casfs::tree::Directory;

/// Lists a Directory (recursively with `recursive`).
pub async fn ls(store: &GrpcStore, root: &Digest, recursive: bool) -> Result<()> {
    let mut stack = vec![(String::new(), *root)];
    let mut out = std::io::stdout().lock();
    while let Some((prefix, digest)) = stack.pop() {
        let dir = Directory::decode(&digest, &store.read(&digest).await?)?;
        let mut lines = Vec::new();
        for f in &dir.files {
            let mode = if f.executable { "-r-xr-xr-x" } else { "-r--r--r--" };
            lines.push((f.name.clone(), format!("{mode} {:>12} {} {prefix}{}", f.digest.size(), f.digest, f.name)));
        }
        for d in &dir.dirs {
            lines.push((d.name.clone(), format!("dr-xr-xr-x {:>12} {} {prefix}{}/", "-", d.digest, d.name)));
        }
        for s in &dir.symlinks {
            lines.push((
                s.name.as_str().into(),
                format!("lrwxrwxrwx {:>12} {:>66} {prefix}{} -> {}", "-", "-", s.name, s.target),
            ));
        }
        lines.sort();
        for (_, l) in lines {
            writeln!(out, "{l}").map_err(|e| Error::io("writing to stdout", e))?;
        }
        if recursive {
            for d in dir.dirs.iter().rev() {
                stack.push((format!("{prefix}{}/", d.name), d.digest));
            }
        }
    }
    Ok(())
}

/// Writes a blob's verified bytes to stdout.
pub async fn cat(store: &GrpcStore, digest: &Digest) -> Result<()> {
    // Small blobs are verified in memory; large ones in a temporary file first, so nothing
    // unverified ever reaches standard output.
    let mut out = std::io::stdout().lock();
    if digest.size() <= 64 << 20 {
        let data = store.read(digest).await?;
        out.write_all(&data).map_err(|e| Error::io("writing to stdout", e))?;
    } else {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("creating a temporary folder", e))?;
        let path = tmp.path().join("blob");
        store.read_to_file(digest, &path).await?;
        let mut f = std::fs::File::open(&path).map_err(|e| Error::io("opening the fetched blob", e))?;
        std::io::copy(&mut f, &mut out).map_err(|e| Error::io("writing to stdout", e))?;
    }
    out.flush().map_err(|e| Error::io("writing to stdout", e))
}
