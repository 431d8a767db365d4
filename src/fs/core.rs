//! The protocol-neutral filesystem: lookups, attributes, listings, reads and xattrs over a
//! Directory tree or the browse namespace, with no FUSE types (`fuse.rs` translates).

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Arc, OnceLock, Weak};
use std::time::SystemTime;

use super::fetch::Fetcher;
use super::inode::{synthetic_ino, Inodes};
use super::node::{Attr, Listing, Node};
use super::tree_prefetch::TreePrefetch;
use crate::digest::Digest;
use crate::error::{Error, Result};

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
            // SAFETY: geteuid and getegid only read the calling process's credentials.
            uid: unsafe { libc::geteuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getegid() },
            dir_perm: 0o555,
            digest_xattr: "user.reapi.digest".into(),
            hash_xattr: "user.sha256".into(),
        }
    }
}

/// Puts a file inode's verified bytes into the kernel's page cache (a FUSE store
/// notification), so that reading them costs no round trip to the daemon.
pub type PageStore = Box<dyn Fn(u64, &[u8]) -> std::io::Result<()> + Send + Sync>;

/// Most files one push puts into the page cache ahead of a scan's reader.
const PUSH_AHEAD_FILES: usize = 8192;
/// Largest file pushed (a page cache fill of small files only).
const PUSH_MAX_BYTES: u64 = 64 << 10;

/// The filesystem over one root node: a CAS Directory or a namespace's root folder.
pub struct CasFs {
    inodes: Inodes,
    fetch: Arc<Fetcher>,
    cfg: FsConfig,
    tree: Arc<TreePrefetch>,
    recorder: OnceLock<Arc<super::record::Recorder>>,
    /// Directories a scan reached, for the page pusher (see [`CasFs::store_pages_with`]).
    push: OnceLock<mpsc::SyncSender<u64>>,
}

impl CasFs {
    /// A filesystem showing `root`: a CAS Directory ([`Node::Dir`]) or a namespace's root
    /// folder (such as [`super::browse::root`]), read through `fetch`.
    pub fn new(root: Node, fetch: Arc<Fetcher>, cfg: FsConfig) -> Arc<Self> {
        let tree = Arc::new(TreePrefetch::new(fetch.clone()));
        Arc::new(CasFs {
            inodes: Inodes::new(root),
            fetch,
            cfg,
            tree,
            recorder: Default::default(),
            push: Default::default(),
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

    /// Records every successful lookup from now on into `r` (an action's access profile).
    pub fn record_into(&self, r: Arc<super::record::Recorder>) {
        let _ = self.recorder.set(r);
    }

    /// Notes a successful lookup for the recorder, if one is attached.
    fn note(&self, parent: u64, name: &str, n: &Node) {
        let Some(r) = self.recorder.get() else { return };
        let file = match n {
            Node::File { digest, .. } => Some(*digest),
            n if n.is_dir() => None,
            _ => return,
        };
        r.note(&self.inodes.path(parent).0, name, file);
    }

    /// Inodes currently known to the kernel.
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// A path for log messages.
    pub fn path(&self, ino: u64) -> String {
        let (dir, file_in) = self.inodes.path(ino);
        let Some(parent) = file_in else { return dir };
        // A file inode keeps no name: find it in its directory's listing, if that is at hand.
        let name = match (self.inodes.get(ino), self.listing_now(parent)) {
            (Some(Node::File { digest, executable, .. }), Ok(Some(Listing::Tree { dir, .. }))) => {
                dir.files.iter().find(|f| f.digest == digest && f.executable == executable).map(|f| f.name.clone())
            }
            _ => None,
        };
        format!("{}/{}", dir.trim_end_matches('/'), name.as_deref().unwrap_or("?"))
    }

    fn node(&self, ino: u64) -> Result<Node> {
        self.inodes.get(ino).ok_or_else(|| Error::NotFound(format!("inode {ino}")))
    }

    /// Attributes of a known inode (never fetches: sizes come from the Directory protos).
    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        Ok(self.node(ino)?.attr(ino))
    }

    /// The listing of a directory-like inode if it needs no I/O now.
    pub fn listing_now(&self, ino: u64) -> Result<Option<Listing>> {
        match self.node(ino)? {
            Node::Dir { digest, remote } => Ok(self.fetch.cached_dir(&digest).map(|dir| Listing::Tree { dir, remote })),
            Node::Virtual(dir) => Ok(Some(Listing::Fixed(dir))),
            Node::Folder(f) => Ok(f.list_now().map(|l| Listing::Fixed(Arc::new(l)))),
            _ => Err(Error::NotADirectory(self.path(ino))),
        }
    }

    /// The listing of a directory-like inode, fetching if needed.
    pub async fn listing(&self, ino: u64) -> Result<Listing> {
        if let Some(l) = self.listing_now(ino)? {
            return Ok(l);
        }
        match self.node(ino)? {
            Node::Dir { digest, remote } => match self.fetch.dir(digest, &remote).await {
                Ok(dir) => {
                    self.tree.below(digest, &dir, &remote);
                    Ok(Listing::Tree { dir, remote })
                }
                Err(e) => {
                    tracing::warn!(digest = %digest, path = %self.path(ino), error = %e, "cannot load directory");
                    Err(e)
                }
            },
            Node::Folder(f) => Ok(Listing::Fixed(Arc::new(f.list().await?))),
            _ => Err(Error::NotADirectory(self.path(ino))),
        }
    }

    /// A directory is being listed: the Directories below it not yet in memory are fetched
    /// in the background, in one stream.
    pub fn listed(&self, ino: u64, l: &Listing) {
        if let (Listing::Tree { dir, remote }, Some(Node::Dir { digest, .. })) = (l, self.inodes.get(ino)) {
            self.tree.below(digest, dir, remote);
        }
    }

    /// A file is being read: when that continues a scan (files of a directory, or
    /// directories of a parent, in order), the next directories' small files are fetched
    /// ahead of the reader, and pushed into the page cache (see
    /// [`CasFs::store_pages_with`]).
    pub fn note_read(&self, ino: u64) {
        if !self.tree.scans() {
            return;
        }
        let dir = self.inodes.parent(ino);
        if !self.tree.note_read(dir, |d| self.inodes.parent(d)) {
            return;
        }
        let parent = self.inodes.parent(dir);
        if let (Ok(Some(Listing::Tree { dir: pdir, remote })), Some(Node::Dir { digest, .. })) =
            (self.listing_now(parent), self.inodes.get(dir))
        {
            self.tree.scan_ahead(pdir, digest, remote);
        }
        if let Some(tx) = self.push.get() {
            // Full: the pusher is busy with an earlier directory of the same scan.
            let _ = tx.try_send(dir);
        }
    }

    /// From now on a scan (see [`CasFs::note_read`]) also puts the small files of the
    /// directory it reached and of the directories after it into the kernel's page cache
    /// with `store`, from a thread of its own, as far as their bytes are in memory and the
    /// kernel knows their inodes: the reader then finds them cached instead of asking the
    /// daemon for each file. Only verified bytes from the local cache are pushed.
    pub fn store_pages_with(self: &Arc<Self>, store: PageStore) {
        if !self.tree.scans() {
            return;
        }
        let (tx, rx) = mpsc::sync_channel::<u64>(16);
        if self.push.set(tx).is_err() {
            return;
        }
        let fs: Weak<CasFs> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("casfs-pages".into()).spawn(move || {
            let mut done = HashSet::new();
            // Ends when the filesystem (and with it the sender) is dropped.
            while let Ok(dir) = rx.recv() {
                let Some(fs) = fs.upgrade() else { return };
                fs.push_ahead(dir, &store, &mut done);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no page pusher thread; scans read file by file");
        }
    }

    /// Pushes directory inode `dir` and its later siblings, in listing order, up to the
    /// first one not ready (see [`CasFs::push_dir`]); `done` holds directories pushed whole.
    fn push_ahead(&self, dir: u64, store: &PageStore, done: &mut HashSet<u64>) {
        let parent = self.inodes.parent(dir);
        let (Ok(Some(Listing::Tree { dir: pdir, remote })), Some(Node::Dir { digest, .. })) =
            (self.listing_now(parent), self.inodes.get(dir))
        else {
            return;
        };
        let Some(start) = pdir.dirs.iter().position(|c| c.digest == digest) else { return };
        let mut files = 0;
        for c in &pdir.dirs[start..] {
            if files >= PUSH_AHEAD_FILES {
                break;
            }
            let node = Node::Dir { digest: c.digest, remote: remote.clone() };
            let Some(ino) = self.inodes.peek(parent, &c.name, &node) else { break };
            if done.contains(&ino) {
                continue;
            }
            match self.push_dir(ino, store) {
                Some(n) => {
                    done.insert(ino);
                    files += n;
                }
                None => break,
            }
        }
    }

    /// Pushes the small files of directory inode `dir` into the page cache; `None` when one
    /// is not ready (its bytes not in the local cache yet, or its inode not known to the
    /// kernel: listed by readdirplus or looked up), to be tried again later.
    fn push_dir(&self, dir: u64, store: &PageStore) -> Option<usize> {
        let Ok(Some(Listing::Tree { dir: d, remote })) = self.listing_now(dir) else { return None };
        let m = self.fetch.metrics();
        let mut pushed = 0;
        for f in &d.files {
            if f.digest.size() > PUSH_MAX_BYTES || f.digest.is_empty_blob() {
                continue;
            }
            let node = Node::File { digest: f.digest, executable: f.executable, remote: remote.clone() };
            // Verified bytes only: the local cache holds nothing else.
            let ready = self.inodes.peek(dir, &f.name, &node).zip(self.fetch.bytes_now(&f.digest));
            let refused = match &ready {
                Some((ino, bytes)) => store(*ino, bytes).inspect_err(|e| {
                    tracing::debug!(ino, error = %e, "the kernel refused a page cache fill");
                    m.add("casfs_pages_refused_total", 1);
                }),
                None => Ok(()),
            };
            if ready.is_none() || refused.is_err() {
                m.add("casfs_pages_pushed_total", pushed as u64);
                return None;
            }
            pushed += 1;
        }
        m.add("casfs_pages_pushed_total", pushed as u64);
        Some(pushed)
    }

    fn enter(&self, parent: u64, name: &str, node: Node) -> Attr {
        let attr = node.attr(0);
        let ino = self.inodes.lookup(parent, name, node);
        Attr { ino, ..attr }
    }

    /// Looks `name` up without I/O when possible (`None`: call [`CasFs::lookup`]). Counts a
    /// kernel lookup on success.
    pub fn lookup_now(&self, parent: u64, name: &str) -> Option<Result<Attr>> {
        match self.node(parent) {
            Ok(Node::Folder(_)) => None,
            Ok(_) => match self.listing_now(parent) {
                Ok(Some(l)) => Some(
                    l.find(name)
                        .map(|n| {
                            self.note(parent, name, &n);
                            self.enter(parent, name, n)
                        })
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
        if let Node::Folder(f) = self.node(parent)? {
            return match f.lookup(name).await {
                Ok(n) => Ok(self.enter(parent, name, n)),
                Err(e) => {
                    if e.errno() != libc::ENOENT {
                        tracing::warn!(path = %self.path(parent), name, error = %e, "lookup in a folder failed");
                    } else {
                        tracing::debug!(path = %self.path(parent), name, error = %e, "no such entry");
                    }
                    Err(e)
                }
            };
        }
        let l = self.listing(parent).await?;
        l.find(name)
            .map(|n| {
                self.note(parent, name, &n);
                self.enter(parent, name, n)
            })
            .ok_or_else(|| Error::NotFound(name.to_string()))
    }

    /// Drops kernel lookups of an inode.
    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n)
    }

    /// The parent inode of a directory (itself for the root).
    pub fn parent_of(&self, ino: u64) -> u64 {
        self.inodes.parent(ino)
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
                (n.to_string(), Attr::dir(x))
            } else {
                let Some((name, node)) = l.nth((i - 2) as usize) else { break };
                let x = self.inodes.peek(ino, &name, &node).unwrap_or_else(|| synthetic_ino(ino, &name));
                (name, node.attr(x))
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
        let (name, node) = l.nth(index)?;
        let a = self.enter(ino, &name, node);
        Some((name, a))
    }

    /// The target of a symlink inode.
    pub fn readlink(&self, ino: u64) -> Result<Arc<str>> {
        match self.node(ino)? {
            Node::Symlink(target) => Ok(target),
            _ => Err(Error::NotASymlink(self.path(ino))),
        }
    }

    /// The content digest of a CAS file inode.
    pub fn file_digest(&self, ino: u64) -> Result<Digest> {
        match self.node(ino)? {
            Node::File { digest, .. } => Ok(digest),
            Node::Synth { .. } => Err(Error::NoBlob(self.path(ino))),
            n if n.is_dir() => Err(Error::IsADirectory(self.path(ino))),
            _ => Err(Error::NotASymlink(self.path(ino))),
        }
    }

    /// An open file holding a CAS file's content if it is local now (`None` also for
    /// made-up files, which have no backing file).
    pub fn backing_now(&self, ino: u64) -> Result<Option<Arc<std::fs::File>>> {
        match self.node(ino)? {
            Node::File { digest, .. } => self.fetch.file_now(&digest),
            Node::Synth { .. } => Ok(None),
            _ => Err(Error::IsADirectory(self.path(ino))),
        }
    }

    /// Makes a file's content local (fetched once, verified) and returns an open file
    /// holding it, for passthrough.
    pub async fn fetch_backing(&self, ino: u64) -> Result<Arc<std::fs::File>> {
        let (digest, remote) = self.cas_file(ino)?;
        self.fetch.open_blob(digest, &remote, self.parent_dir(ino)).await.inspect_err(|e| {
            tracing::warn!(digest = %digest, path = %self.path(ino), error = %e, "cannot fetch file");
        })
    }

    /// The digest and remote of a CAS file inode.
    fn cas_file(&self, ino: u64) -> Result<(Digest, Arc<super::fetch::Remote>)> {
        match self.node(ino)? {
            Node::File { digest, remote, .. } => Ok((digest, remote)),
            Node::Synth { .. } => Err(Error::NoBlob(self.path(ino))),
            _ => Err(Error::IsADirectory(self.path(ino))),
        }
    }

    /// The Directory a file was last looked up in (for sibling batching).
    fn parent_dir(&self, ino: u64) -> Option<Digest> {
        match self.inodes.get(self.inodes.parent(ino)) {
            Some(Node::Dir { digest, .. }) => Some(digest),
            _ => None,
        }
    }

    /// Makes a file's content readable (fetched once, verified): small files land in memory,
    /// large ones in memory files until they are in the disk cache. Cheaper than
    /// [`CasFs::fetch_backing`] when no file is needed.
    pub async fn load_file(&self, ino: u64) -> Result<()> {
        let (digest, remote) = self.cas_file(ino)?;
        self.fetch.load(digest, &remote, self.parent_dir(ino)).await.inspect_err(|e| {
            tracing::warn!(digest = %digest, path = %self.path(ino), error = %e, "cannot fetch file");
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
            Ok(Node::Synth { data, .. }) => Some(slice(&data)),
            Ok(Node::File { digest, .. }) => self.fetch.bytes_now(&digest).map(|b| slice(&b)),
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
            Ok(Node::Synth { .. }) => None,
            Ok(Node::File { digest, .. }) => match self.fetch.file_now(&digest) {
                Ok(Some(f)) => Some(self.read_file(&digest, &f, offset, size)),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            },
            Ok(_) => Some(Err(Error::IsADirectory(self.path(ino)))),
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
            self.fetch.cache().drop_file(digest);
            return Err(Error::Internal(format!("cached blob {digest} is shorter than its digest says")));
        }
        Ok(buf)
    }

    /// The value of an xattr, `None` when the node has no such attribute.
    pub fn getxattr(&self, ino: u64, name: &str) -> Result<Option<Vec<u8>>> {
        let node = self.node(ino)?;
        let digest = match &node {
            Node::File { digest, .. } | Node::Dir { digest, .. } => *digest,
            _ => return Ok(None),
        };
        if name == self.cfg.digest_xattr {
            return Ok(Some(digest.to_string().into_bytes()));
        }
        if name == self.cfg.hash_xattr && matches!(node, Node::File { .. }) {
            return Ok(Some(digest.hash_bytes().to_vec()));
        }
        Ok(None)
    }

    /// NUL-separated xattr names of a node.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let names: Vec<&String> = match self.node(ino)? {
            Node::File { .. } => vec![&self.cfg.digest_xattr, &self.cfg.hash_xattr],
            Node::Dir { .. } => vec![&self.cfg.digest_xattr],
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
