//! The protocol-neutral filesystem: lookups, attributes, listings, reads and xattrs over a
//! Directory tree or the browse namespace, with no FUSE types (`fuse.rs` translates).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::SystemTime;

use super::browse::{self, BrowseNode};
use super::fetch::Fetcher;
use super::inode::{synthetic_ino, Inodes, NodeKind, ROOT};
use super::vdir::VNode;
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
    /// Permission bits of directories: 0o555; an executor running commands as another
    /// user makes them 0o755 with that user as owner, so an overlay on top is writable.
    pub dir_perm: u16,
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
            dir_perm: 0o555,
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

/// The entries of a directory-like node, ready to be listed or searched.
#[derive(Clone)]
pub enum Listing {
    /// A CAS Directory (entries made on the fly).
    Tree(Arc<Directory>, u16),
    /// A made-up directory: its entries in listing order.
    Fixed(Arc<Vec<(String, NodeKind)>>),
}

impl Listing {
    fn len(&self) -> usize {
        match self {
            Listing::Tree(d, _) => d.len(),
            Listing::Fixed(v) => v.len(),
        }
    }

    /// Entry `j` (files, then directories, then symlinks for a CAS Directory).
    fn nth(&self, parent: u64, j: usize) -> (String, NodeKind) {
        match self {
            Listing::Tree(dir, inst) => {
                let inst = *inst;
                let (nf, nd) = (dir.files.len(), dir.dirs.len());
                if j < nf {
                    let f = &dir.files[j];
                    (f.name.clone(), NodeKind::File { digest: f.digest, executable: f.executable, inst })
                } else if j < nf + nd {
                    let d = &dir.dirs[j - nf];
                    (d.name.clone(), NodeKind::Dir { digest: d.digest, parent, inst })
                } else {
                    let s = &dir.symlinks[j - nf - nd];
                    (s.name.clone(), NodeKind::Symlink { target: Arc::from(s.target.as_str()) })
                }
            }
            Listing::Fixed(v) => v[j].clone(),
        }
    }

    fn find(&self, parent: u64, name: &str) -> Option<NodeKind> {
        match self {
            Listing::Tree(dir, inst) => dir.lookup(name).map(|e| match e {
                Entry::File(f) => NodeKind::File { digest: f.digest, executable: f.executable, inst: *inst },
                Entry::Dir(d) => NodeKind::Dir { digest: d.digest, parent, inst: *inst },
                Entry::Symlink(s) => NodeKind::Symlink { target: Arc::from(s.target.as_str()) },
            }),
            Listing::Fixed(v) => v.iter().find(|(n, _)| n == name).map(|(_, k)| k.clone()),
        }
    }
}

/// The filesystem over one root Directory or over the browse namespace.
pub struct CasFs {
    inodes: Inodes,
    fetch: Arc<Fetcher>,
    cfg: FsConfig,
}

fn attr_of(ino: u64, node: &NodeKind) -> Attr {
    let dir = Attr { ino, kind: Kind::Dir, size: 0, perm: 0o555 };
    match node {
        NodeKind::Dir { .. } | NodeKind::Virtual { .. } | NodeKind::Browse { .. } => dir,
        NodeKind::File { digest, executable, .. } => {
            Attr { ino, kind: Kind::File, size: digest.size(), perm: if *executable { 0o555 } else { 0o444 } }
        }
        NodeKind::Synth { data, executable } => {
            Attr { ino, kind: Kind::File, size: data.len() as u64, perm: if *executable { 0o555 } else { 0o444 } }
        }
        NodeKind::Symlink { target } => Attr { ino, kind: Kind::Symlink, size: target.len() as u64, perm: 0o777 },
    }
}

fn vnode_kind(v: &VNode, parent: u64, inst: u16) -> NodeKind {
    match v {
        VNode::File { digest, executable } => NodeKind::File { digest: *digest, executable: *executable, inst },
        VNode::Symlink(t) => NodeKind::Symlink { target: t.clone() },
        VNode::Dir(d) => NodeKind::Dir { digest: *d, parent, inst },
        VNode::Virtual(v) => NodeKind::Virtual { dir: v.clone(), parent, inst },
        VNode::Synth(data) => NodeKind::Synth { data: data.clone(), executable: false },
    }
}

fn errno_err(code: i32, what: &str) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(code))
}

impl CasFs {
    /// A filesystem showing the tree of the Directory `root` (fetched from instance 0).
    pub fn new(root: Digest, fetch: Arc<Fetcher>, cfg: FsConfig) -> Arc<Self> {
        Self::with_root(NodeKind::Dir { digest: root, parent: ROOT, inst: 0 }, fetch, cfg)
    }

    /// A filesystem showing the browse namespace.
    pub fn browse(fetch: Arc<Fetcher>, cfg: FsConfig) -> Arc<Self> {
        Self::with_root(NodeKind::Browse { node: BrowseNode::Root, parent: ROOT }, fetch, cfg)
    }

    fn with_root(root: NodeKind, fetch: Arc<Fetcher>, cfg: FsConfig) -> Arc<Self> {
        Arc::new(CasFs { inodes: Inodes::new(root), fetch, cfg })
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
        self.inodes.get(ino).ok_or_else(|| Error::NotFound(format!("inode {ino}")))
    }

    /// Attributes of a known inode (never fetches: sizes come from the Directory protos).
    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        Ok(attr_of(ino, &self.node(ino)?))
    }

    /// The listing of a directory-like inode if it needs no I/O now.
    pub fn listing_now(&self, ino: u64) -> Result<Option<Listing>> {
        match self.node(ino)? {
            NodeKind::Dir { digest, inst, .. } => Ok(self.fetch.cached_dir(&digest).map(|d| Listing::Tree(d, inst))),
            NodeKind::Virtual { dir, parent: _, inst } => Ok(Some(Listing::Fixed(Arc::new(
                dir.entries.iter().map(|(n, v)| (n.clone(), vnode_kind(v, ino, inst))).collect(),
            )))),
            NodeKind::Browse { node: BrowseNode::Instance(_), .. } => Ok(None),
            NodeKind::Browse { node, .. } => Ok(Some(Listing::Fixed(Arc::new(browse::children(&node, ino))))),
            _ => Err(errno_err(libc::ENOTDIR, "not a directory")),
        }
    }

    /// The listing of a directory-like inode, fetching if needed.
    pub async fn listing(&self, ino: u64) -> Result<Listing> {
        if let Some(l) = self.listing_now(ino)? {
            return Ok(l);
        }
        match self.node(ino)? {
            NodeKind::Dir { digest, inst, .. } => match self.fetch.dir(digest, inst).await {
                Ok(d) => Ok(Listing::Tree(d, inst)),
                Err(e) => {
                    tracing::warn!(digest = %digest, path = %self.path(ino), error = %e, "cannot load directory");
                    Err(shared_err(&e))
                }
            },
            NodeKind::Browse { node: BrowseNode::Instance(name), .. } => {
                Ok(Listing::Fixed(Arc::new(browse::instance_children(&self.fetch, &name, ino)?)))
            }
            _ => Err(errno_err(libc::ENOTDIR, "not a directory")),
        }
    }

    fn enter(&self, parent: u64, name: &str, node: NodeKind) -> Attr {
        let ino = self.inodes.lookup(parent, name, node.clone());
        attr_of(ino, &node)
    }

    /// Looks `name` up without I/O when possible (`None`: call [`CasFs::lookup`]). Counts a
    /// kernel lookup on success.
    pub fn lookup_now(&self, parent: u64, name: &str) -> Option<Result<Attr>> {
        match self.node(parent) {
            Ok(NodeKind::Browse { .. }) => None,
            Ok(_) => match self.listing_now(parent) {
                Ok(Some(l)) => Some(
                    l.find(parent, name)
                        .map(|n| self.enter(parent, name, n))
                        .ok_or_else(|| Error::NotFound(name.to_string())),
                ),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            },
            Err(e) => Some(Err(e)),
        }
    }

    /// Looks `name` up in directory `parent`, fetching what is needed.
    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        if let NodeKind::Browse { node, .. } = self.node(parent)? {
            return match browse::lookup(&self.fetch, &node, parent, name).await {
                Ok(n) => Ok(self.enter(parent, name, n)),
                Err(e) => {
                    if e.errno() != libc::ENOENT {
                        tracing::warn!(path = %self.path(parent), name, error = %e, "browse lookup failed");
                    } else {
                        tracing::debug!(path = %self.path(parent), name, error = %e, "no such entry");
                    }
                    Err(e)
                }
            };
        }
        let l = self.listing(parent).await?;
        l.find(parent, name).map(|n| self.enter(parent, name, n)).ok_or_else(|| Error::NotFound(name.to_string()))
    }

    /// Drops kernel lookups of an inode.
    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n)
    }

    /// The parent inode of a directory (itself for the root).
    pub fn parent_of(&self, ino: u64) -> u64 {
        self.inodes.get(ino).and_then(|n| n.parent()).unwrap_or(ROOT)
    }

    /// `.`, `..` and the entries from `offset` on, as (offset of next, name, attributes).
    /// Plain readdir does not count lookups, so unknown entries get synthetic numbers.
    pub fn list(&self, ino: u64, l: &Listing, offset: u64) -> Result<Vec<(u64, String, Attr)>> {
        let parent = self.parent_of(ino);
        let mut out = Vec::new();
        let total = 2 + l.len() as u64;
        for i in offset..total {
            let (name, attr) = if i < 2 {
                let (n, x) = if i == 0 { (".", ino) } else { ("..", parent) };
                (n.to_string(), Attr { ino: x, kind: Kind::Dir, size: 0, perm: 0o555 })
            } else {
                let (name, node) = l.nth(ino, (i - 2) as usize);
                let x = self.inodes.peek(ino, &name, &node).unwrap_or_else(|| synthetic_ino(ino, &name));
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

    /// Entry `index` of a listing for readdirplus, counting a kernel lookup.
    pub fn list_plus_entry(&self, ino: u64, l: &Listing, index: usize) -> Option<(String, Attr)> {
        if index >= l.len() {
            return None;
        }
        let (name, node) = l.nth(ino, index);
        let a = self.enter(ino, &name, node);
        Some((name, a))
    }

    /// The target of a symlink inode.
    pub fn readlink(&self, ino: u64) -> Result<Arc<str>> {
        match self.node(ino)? {
            NodeKind::Symlink { target } => Ok(target),
            _ => Err(errno_err(libc::EINVAL, "not a symlink")),
        }
    }

    /// The content digest of a CAS file inode.
    pub fn file_digest(&self, ino: u64) -> Result<Digest> {
        match self.node(ino)? {
            NodeKind::File { digest, .. } => Ok(digest),
            NodeKind::Synth { .. } => Err(errno_err(libc::ENODATA, "made-up file")),
            n if n.parent().is_some() => Err(errno_err(libc::EISDIR, "is a directory")),
            _ => Err(errno_err(libc::EINVAL, "not a file")),
        }
    }

    /// An open file holding a CAS file's content if it is local now (`None` also for
    /// made-up files, which have no backing file).
    pub fn backing_now(&self, ino: u64) -> Result<Option<Arc<std::fs::File>>> {
        match self.node(ino)? {
            NodeKind::File { digest, .. } => self.fetch.file_now(&digest),
            NodeKind::Synth { .. } => Ok(None),
            _ => Err(errno_err(libc::EISDIR, "not a file")),
        }
    }

    /// Makes a file's content local (fetched once, verified) and returns an open file
    /// holding it, for passthrough.
    pub async fn fetch_backing(&self, ino: u64) -> Result<Arc<std::fs::File>> {
        let NodeKind::File { digest, inst, .. } = self.node(ino)? else {
            return Err(errno_err(libc::EINVAL, "not a CAS file"));
        };
        self.fetch.open_blob(digest, inst, self.parent_dir(ino)).await.map_err(|e| {
            tracing::warn!(digest = %digest, path = %self.path(ino), error = %e, "cannot fetch file");
            shared_err(&e)
        })
    }

    /// The Directory a file was last looked up in (for sibling batching).
    fn parent_dir(&self, ino: u64) -> Option<Digest> {
        match self.inodes.get(self.inodes.last_parent(ino)) {
            Some(NodeKind::Dir { digest, .. }) => Some(digest),
            _ => None,
        }
    }

    /// Makes a file's content readable (fetched once, verified): small files land in memory,
    /// large ones in memory files until they are in the disk cache. Cheaper than
    /// [`CasFs::fetch_backing`] when no file is needed.
    pub async fn load_file(&self, ino: u64) -> Result<()> {
        let NodeKind::File { digest, inst, .. } = self.node(ino)? else {
            return Err(errno_err(libc::EINVAL, "not a CAS file"));
        };
        self.fetch.load(digest, inst, self.parent_dir(ino)).await.map_err(|e| {
            tracing::warn!(digest = %digest, path = %self.path(ino), error = %e, "cannot fetch file");
            shared_err(&e)
        })
    }

    /// Reads from memory only: made-up files and small blobs held in memory (`None`: the
    /// bytes are elsewhere, try [`CasFs::read_now`]).
    pub fn read_mem(&self, ino: u64, offset: u64, size: u32) -> Option<Vec<u8>> {
        let slice = |data: &[u8]| {
            let start = (offset as usize).min(data.len());
            let end = start.saturating_add(size as usize).min(data.len());
            data[start..end].to_vec()
        };
        match self.node(ino) {
            Ok(NodeKind::Synth { data, .. }) => Some(slice(&data)),
            Ok(NodeKind::File { digest, .. }) => self.fetch.bytes_now(&digest).map(|b| slice(&b)),
            _ => None,
        }
    }

    /// Reads without waiting on a fetch when the bytes are at hand (`None`: call
    /// [`CasFs::read`]). May read the disk cache.
    pub fn read_now(&self, ino: u64, offset: u64, size: u32) -> Option<Result<Vec<u8>>> {
        if let Some(data) = self.read_mem(ino, offset, size) {
            return Some(Ok(data));
        }
        match self.node(ino) {
            Ok(NodeKind::Synth { .. }) => None,
            Ok(NodeKind::File { digest, .. }) => match self.fetch.file_now(&digest) {
                Ok(Some(f)) => Some(self.read_file(&digest, &f, offset, size)),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            },
            Ok(_) => Some(Err(errno_err(libc::EISDIR, "not a file"))),
            Err(e) => Some(Err(e)),
        }
    }

    /// Reads, fetching the file's content first if needed.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        if let Some(r) = self.read_now(ino, offset, size) {
            return r;
        }
        self.load_file(ino).await?;
        self.read_now(ino, offset, size)
            .unwrap_or_else(|| Err(Error::Internal("fetched blob left the cache at once".into())))
    }

    /// Reads from an open file holding a blob's verified bytes.
    fn read_file(&self, digest: &Digest, file: &std::fs::File, offset: u64, size: u32) -> Result<Vec<u8>> {
        let end = digest.size().min(offset.saturating_add(size as u64));
        if offset >= end {
            return Ok(Vec::new());
        }
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
            self.fetch.drop_file(digest);
            return Err(Error::Internal(format!("cached blob {digest} is shorter than its digest says")));
        }
        Ok(buf)
    }

    /// The value of an xattr, `None` when the node has no such attribute.
    pub fn getxattr(&self, ino: u64, name: &str) -> Result<Option<Vec<u8>>> {
        let node = self.node(ino)?;
        let digest = match &node {
            NodeKind::File { digest, .. } | NodeKind::Dir { digest, .. } => *digest,
            _ => return Ok(None),
        };
        if name == self.cfg.digest_xattr {
            return Ok(Some(digest.to_string().into_bytes()));
        }
        if name == self.cfg.hash_xattr && matches!(node, NodeKind::File { .. }) {
            return Ok(Some(digest.hash_bytes().to_vec()));
        }
        Ok(None)
    }

    /// NUL-separated xattr names of a node.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let names: Vec<&String> = match self.node(ino)? {
            NodeKind::File { .. } => vec![&self.cfg.digest_xattr, &self.cfg.hash_xattr],
            NodeKind::Dir { .. } => vec![&self.cfg.digest_xattr],
            _ => vec![],
        };
        let mut out = Vec::new();
        for n in names {
            out.extend_from_slice(n.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    /// Resolves a slash-separated path below `ino` (for tools that browse without a mount).
    pub async fn resolve(&self, mut ino: u64, path: &str) -> Result<Attr> {
        let mut attr = self.getattr(ino)?;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            attr = self.lookup(ino, part).await?;
            ino = attr.ino;
        }
        Ok(attr)
    }
}

/// Copies a shared fetch error into an owned one with the same code and errno.
pub fn shared_err(e: &Arc<Error>) -> Error {
    match &**e {
        Error::MissingBlob(d) => Error::MissingBlob(*d),
        Error::NotFound(s) => Error::NotFound(s.clone()),
        Error::DeadlineExceeded(s) => Error::DeadlineExceeded(s.clone()),
        Error::InvalidDirectory { digest, reason } => {
            Error::InvalidDirectory { digest: digest.clone(), reason: reason.clone() }
        }
        other => Error::Unavailable(other.to_string()),
    }
}
