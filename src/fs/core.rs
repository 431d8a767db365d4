//! The protocol-neutral filesystem: lookups, attributes, listings, reads and xattrs over a
//! Directory tree, with no FUSE types (the adapter in `fuse.rs` translates).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use super::fetch::Fetcher;
use super::inode::{synthetic_ino, Inodes, NodeKind, ROOT};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::tree::{Directory, Entry};

/// Attribute and naming choices of a mount.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// Modification (and change, access) time of every node.
    pub mtime: SystemTime,
    /// Owner of every node.
    pub uid: u32,
    /// Group of every node.
    pub gid: u32,
    /// Name of the text digest xattr (`hash/size`).
    pub digest_xattr: String,
    /// Name of the raw-hash xattr, as Bazel's `--unix_digest_hash_attribute_name` reads it.
    pub hash_xattr: String,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            // 2000-01-01T00:00:00Z
            mtime: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(946_684_800),
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
            digest_xattr: "user.reapi.digest".into(),
            hash_xattr: "user.sha256".into(),
        }
    }
}

/// The kind of a node, as stat reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
}

/// What stat reports for a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Node kind.
    pub kind: Kind,
    /// Size in bytes (files: content; symlinks: target length; dirs: 0).
    pub size: u64,
    /// Permission bits.
    pub perm: u16,
}

/// The filesystem over one root Directory.
pub struct CasFs {
    inodes: Inodes,
    fetch: Arc<Fetcher>,
    cfg: FsConfig,
    fds: moka::sync::Cache<Digest, Arc<std::fs::File>>,
}

fn attr_of(ino: u64, node: &NodeKind) -> Attr {
    match node {
        NodeKind::Dir { .. } => Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            perm: 0o555,
        },
        NodeKind::File { digest, executable } => Attr {
            ino,
            kind: Kind::File,
            size: digest.size(),
            perm: if *executable { 0o555 } else { 0o444 },
        },
        NodeKind::Symlink { target } => Attr {
            ino,
            kind: Kind::Symlink,
            size: target.len() as u64,
            perm: 0o777,
        },
    }
}

fn node_of(parent: u64, entry: Entry<'_>) -> NodeKind {
    match entry {
        Entry::File(f) => NodeKind::File {
            digest: f.digest,
            executable: f.executable,
        },
        Entry::Dir(d) => NodeKind::Dir {
            digest: d.digest,
            parent,
        },
        Entry::Symlink(s) => NodeKind::Symlink {
            target: Arc::from(s.target.as_str()),
        },
    }
}

impl CasFs {
    /// A filesystem rooted at the Directory `root`.
    pub fn new(root: Digest, fetch: Arc<Fetcher>, cfg: FsConfig) -> Arc<Self> {
        Arc::new(CasFs {
            inodes: Inodes::new(root),
            fetch,
            cfg,
            fds: moka::sync::Cache::new(256),
        })
    }

    /// The attribute choices.
    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    /// The fetcher (caches, metrics).
    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetch
    }

    /// Inodes currently known to the kernel.
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// A path for log messages.
    pub fn path(&self, ino: u64) -> String {
        self.inodes.path(ino)
    }

    fn node(&self, ino: u64) -> Result<NodeKind> {
        self.inodes
            .get(ino)
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))
    }

    /// Attributes of a known inode (never fetches: sizes come from the Directory protos).
    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        Ok(attr_of(ino, &self.node(ino)?))
    }

    /// The Directory digest behind a directory inode.
    pub fn dir_digest(&self, ino: u64) -> Result<Digest> {
        match self.node(ino)? {
            NodeKind::Dir { digest, .. } => Ok(digest),
            _ => Err(Error::io(
                "not a directory",
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            )),
        }
    }

    /// The Directory of a directory inode if it is in memory now.
    pub fn dir_now(&self, ino: u64) -> Result<Option<Arc<Directory>>> {
        let d = self.dir_digest(ino)?;
        Ok(self.fetch.cached_dir(&d))
    }

    /// The Directory of a directory inode, fetched if needed.
    pub async fn dir(&self, ino: u64) -> Result<Arc<Directory>> {
        let d = self.dir_digest(ino)?;
        self.fetch.dir(d).await.map_err(|e| {
            tracing::warn!(digest = %d, path = %self.path(ino), error = %e, "cannot load directory");
            shared_err(&e)
        })
    }

    /// Looks `name` up in a loaded directory; counts a kernel lookup on success.
    pub fn lookup_in(&self, parent: u64, dir: &Directory, name: &str) -> Result<Attr> {
        let entry = dir
            .lookup(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let node = node_of(parent, entry);
        let ino = self.inodes.lookup(parent, name, node.clone());
        Ok(attr_of(ino, &node))
    }

    /// Looks `name` up in directory `parent`, fetching the parent's Directory if needed.
    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        let dir = self.dir(parent).await?;
        self.lookup_in(parent, &dir, name)
    }

    /// Drops kernel lookups of an inode.
    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n)
    }

    /// `.`, `..` and every entry after `offset` entries, as (offset of next, entry).
    pub fn list(&self, ino: u64, dir: &Directory, offset: u64) -> Result<Vec<(u64, String, Attr)>> {
        let parent = match self.node(ino)? {
            NodeKind::Dir { parent, .. } => parent,
            _ => {
                return Err(Error::io(
                    "not a directory",
                    std::io::Error::from_raw_os_error(libc::ENOTDIR),
                ))
            }
        };
        let mut out = Vec::new();
        let specials = [(".", ino), ("..", parent)];
        let total = 2 + dir.len() as u64;
        for i in offset..total {
            let (name, attr) = if i < 2 {
                let (n, x) = specials[i as usize];
                (
                    n.to_string(),
                    Attr {
                        ino: x,
                        kind: Kind::Dir,
                        size: 0,
                        perm: 0o555,
                    },
                )
            } else {
                let j = (i - 2) as usize;
                let (name, node) = nth_entry(ino, dir, j);
                let x = self
                    .inodes
                    .peek(ino, &name, &node)
                    .unwrap_or_else(|| synthetic_ino(ino, &name));
                let a = attr_of(x, &node);
                (name, a)
            };
            out.push((i + 1, name, attr));
            if out.len() >= 1024 {
                break;
            }
        }
        Ok(out)
    }

    /// Entry `offset - 2` of a directory for readdirplus, counting a kernel lookup.
    pub fn list_plus_entry(
        &self,
        ino: u64,
        dir: &Directory,
        index: usize,
    ) -> Option<(String, Attr)> {
        if index >= dir.len() {
            return None;
        }
        let (name, node) = nth_entry(ino, dir, index);
        let x = self.inodes.lookup(ino, &name, node.clone());
        Some((name, attr_of(x, &node)))
    }

    /// The parent inode of a directory (itself for the root).
    pub fn parent_of(&self, ino: u64) -> u64 {
        match self.inodes.get(ino) {
            Some(NodeKind::Dir { parent, .. }) => parent,
            _ => ROOT,
        }
    }

    /// The target of a symlink inode.
    pub fn readlink(&self, ino: u64) -> Result<Arc<str>> {
        match self.node(ino)? {
            NodeKind::Symlink { target } => Ok(target),
            _ => Err(Error::io(
                "not a symlink",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }

    /// The content digest of a file inode.
    pub fn file_digest(&self, ino: u64) -> Result<Digest> {
        match self.node(ino)? {
            NodeKind::File { digest, .. } => Ok(digest),
            NodeKind::Dir { .. } => Err(Error::io(
                "is a directory",
                std::io::Error::from_raw_os_error(libc::EISDIR),
            )),
            _ => Err(Error::io(
                "not a file",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }

    /// The local cache path of a file's content if it is there now.
    pub fn local_now(&self, ino: u64) -> Result<Option<PathBuf>> {
        let d = self.file_digest(ino)?;
        Ok(self.fetch.local_path(&d))
    }

    /// Makes a file's content local (fetched once, verified) and returns its cache path.
    pub async fn fetch_file(&self, ino: u64) -> Result<PathBuf> {
        let d = self.file_digest(ino)?;
        let parent_dir = match self.inodes.get(self.inodes_parent(ino)) {
            Some(NodeKind::Dir { digest, .. }) => Some(digest),
            _ => None,
        };
        self.fetch.blob(d, parent_dir).await.map_err(|e| {
            tracing::warn!(digest = %d, path = %self.path(ino), error = %e, "cannot fetch file");
            shared_err(&e)
        })
    }

    fn inodes_parent(&self, ino: u64) -> u64 {
        // Files record where they were last looked up; the path walk gives that parent.
        self.inodes.last_parent(ino)
    }

    /// Reads from a file already in the local cache.
    pub fn read_local(
        &self,
        digest: &Digest,
        path: &std::path::Path,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>> {
        let end = digest.size().min(offset.saturating_add(size as u64));
        if offset >= end {
            return Ok(Vec::new());
        }
        let file = match self.fds.get(digest) {
            Some(f) => f,
            None => {
                let f = Arc::new(
                    std::fs::File::open(path)
                        .map_err(|e| Error::io(format!("opening cached {digest}"), e))?,
                );
                self.fds.insert(*digest, f.clone());
                f
            }
        };
        let mut buf = vec![0u8; (end - offset) as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(format!("reading cached {digest}"), e)),
            }
        }
        if done < buf.len() {
            self.fds.invalidate(digest);
            return Err(Error::Internal(format!(
                "cached blob {digest} is shorter than its digest says"
            )));
        }
        Ok(buf)
    }

    /// The value of an xattr, `None` when the node has no such attribute.
    pub fn getxattr(&self, ino: u64, name: &str) -> Result<Option<Vec<u8>>> {
        let digest = match self.node(ino)? {
            NodeKind::File { digest, .. } | NodeKind::Dir { digest, .. } => digest,
            NodeKind::Symlink { .. } => return Ok(None),
        };
        if name == self.cfg.digest_xattr {
            return Ok(Some(digest.to_string().into_bytes()));
        }
        if name == self.cfg.hash_xattr && matches!(self.node(ino)?, NodeKind::File { .. }) {
            return Ok(Some(digest.hash_bytes().to_vec()));
        }
        Ok(None)
    }

    /// NUL-separated xattr names of a node.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        match self.node(ino)? {
            NodeKind::File { .. } => {
                for n in [&self.cfg.digest_xattr, &self.cfg.hash_xattr] {
                    out.extend_from_slice(n.as_bytes());
                    out.push(0);
                }
            }
            NodeKind::Dir { .. } => {
                out.extend_from_slice(self.cfg.digest_xattr.as_bytes());
                out.push(0);
            }
            NodeKind::Symlink { .. } => {}
        }
        Ok(out)
    }
}

fn nth_entry(parent: u64, dir: &Directory, j: usize) -> (String, NodeKind) {
    let (nf, nd) = (dir.files.len(), dir.dirs.len());
    if j < nf {
        let f = &dir.files[j];
        (
            f.name.clone(),
            NodeKind::File {
                digest: f.digest,
                executable: f.executable,
            },
        )
    } else if j < nf + nd {
        let d = &dir.dirs[j - nf];
        (
            d.name.clone(),
            NodeKind::Dir {
                digest: d.digest,
                parent,
            },
        )
    } else {
        let s = &dir.symlinks[j - nf - nd];
        (
            s.name.clone(),
            NodeKind::Symlink {
                target: Arc::from(s.target.as_str()),
            },
        )
    }
}

/// Copies a shared fetch error into an owned one with the same code and errno.
pub fn shared_err(e: &Arc<Error>) -> Error {
    match &**e {
        Error::MissingBlob(d) => Error::MissingBlob(*d),
        Error::NotFound(s) => Error::NotFound(s.clone()),
        Error::DeadlineExceeded(s) => Error::DeadlineExceeded(s.clone()),
        other => Error::Unavailable(other.to_string()),
    }
}
