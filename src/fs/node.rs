//! The filesystem's one node type, listings of directory-like nodes, and the trait a
//! namespace's computed folders implement.
//!
//! Every inode stands for a [`Node`]. CAS directories and files carry the [`Remote`] they are
//! fetched from; made-up files and directories carry their content; a [`Folder`] computes its
//! entries (the browse namespace is one set of folders; a new namespace is one new file of
//! `Folder`s, nothing else changes).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::fetch::Remote;
use crate::digest::Digest;
use crate::error::Result;
use crate::tree::{Directory, Entry};

/// What an inode stands for.
#[derive(Clone)]
pub enum Node {
    /// A CAS Directory, fetched from `remote` when first listed.
    Dir { digest: Digest, remote: Arc<Remote> },
    /// A CAS file, fetched from `remote` when first read.
    File { digest: Digest, executable: bool, remote: Arc<Remote> },
    /// A symbolic link.
    Symlink(Arc<str>),
    /// A file whose bytes casfs made (exit codes, JSON renderings, inline stdout).
    Synth { data: Arc<[u8]>, executable: bool },
    /// A directory casfs made, with fixed entries (an action's view, the folders above
    /// its outputs).
    Virtual(Arc<VDir>),
    /// A folder whose entries are computed by a namespace (the browse view).
    Folder(Arc<dyn Folder>),
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Dir { digest, .. } => write!(f, "Dir({digest})"),
            Node::File { digest, executable, .. } => write!(f, "File({digest}, x={executable})"),
            Node::Symlink(t) => write!(f, "Symlink({t:?})"),
            Node::Synth { data, .. } => write!(f, "Synth({} bytes)", data.len()),
            Node::Virtual(d) => write!(f, "Virtual({} entries)", d.len()),
            Node::Folder(_) => write!(f, "Folder"),
        }
    }
}

impl Node {
    /// A made-up read-only file holding `data`.
    pub fn text(data: impl Into<Vec<u8>>) -> Node {
        Node::Synth { data: Arc::from(data.into()), executable: false }
    }

    /// True for the kinds that have entries.
    pub fn is_dir(&self) -> bool {
        matches!(self, Node::Dir { .. } | Node::Virtual(_) | Node::Folder(_))
    }

    /// What stat reports for this node as inode `ino`.
    pub fn attr(&self, ino: u64) -> Attr {
        let file = |size: u64, executable: bool| Attr {
            ino,
            kind: Kind::File,
            size,
            perm: if executable { 0o555 } else { 0o444 },
        };
        match self {
            Node::Dir { .. } | Node::Virtual(_) | Node::Folder(_) => Attr::dir(ino),
            Node::File { digest, executable, .. } => file(digest.size(), *executable),
            Node::Synth { data, executable } => file(data.len() as u64, *executable),
            Node::Symlink(target) => Attr { ino, kind: Kind::Symlink, size: target.len() as u64, perm: 0o777 },
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

impl Attr {
    /// The attributes of a directory.
    pub fn dir(ino: u64) -> Attr {
        Attr { ino, kind: Kind::Dir, size: 0, perm: 0o555 }
    }
}

/// A made-up directory: entries sorted by name, found by binary search.
#[derive(Clone, Default)]
pub struct VDir {
    entries: Vec<(String, Node)>,
}

impl VDir {
    /// A directory with these entries.
    pub fn new(entries: BTreeMap<String, Node>) -> Self {
        VDir { entries: entries.into_iter().collect() }
    }

    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&Node> {
        self.entries.binary_search_by(|(n, _)| n.as_str().cmp(name)).ok().map(|i| &self.entries[i].1)
    }

    /// Entry `i` in name order.
    pub fn nth(&self, i: usize) -> Option<&(String, Node)> {
        self.entries.get(i)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True without entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl FromIterator<(String, Node)> for VDir {
    fn from_iter<I: IntoIterator<Item = (String, Node)>>(iter: I) -> Self {
        VDir::new(iter.into_iter().collect())
    }
}

/// A folder whose entries a namespace computes. Lookups of names it does not have are
/// `Error::NotFound`; a folder may refuse to list what it can look up (digest folders).
#[async_trait::async_trait]
pub trait Folder: Send + Sync {
    /// Its listing when that needs no I/O (`None`: call [`Folder::list`]).
    fn list_now(&self) -> Option<VDir>;

    /// Its listing, doing I/O if needed.
    async fn list(&self) -> Result<VDir>;

    /// The entry `name`, doing I/O if needed.
    async fn lookup(&self, name: &str) -> Result<Node>;
}

/// The entries of a directory-like node, ready to be listed or searched.
#[derive(Clone)]
pub enum Listing {
    /// A CAS Directory; its entries are fetched from `remote`.
    Tree { dir: Arc<Directory>, remote: Arc<Remote> },
    /// A made-up directory.
    Fixed(Arc<VDir>),
}

impl Listing {
    /// Number of entries (without `.` and `..`).
    pub fn len(&self) -> usize {
        match self {
            Listing::Tree { dir, .. } => dir.len(),
            Listing::Fixed(v) => v.len(),
        }
    }

    /// True without entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `j`: for a CAS Directory files, then directories, then symlinks.
    pub fn nth(&self, j: usize) -> Option<(String, Node)> {
        match self {
            Listing::Tree { dir, remote } => {
                let (nf, nd) = (dir.files.len(), dir.dirs.len());
                if j < nf {
                    let f = &dir.files[j];
                    Some((f.name.to_string(), file_node(f.digest, f.executable, remote)))
                } else if j < nf + nd {
                    let d = &dir.dirs[j - nf];
                    Some((d.name.to_string(), Node::Dir { digest: d.digest, remote: remote.clone() }))
                } else {
                    let s = dir.symlinks.get(j - nf - nd)?;
                    Some((s.name.clone(), Node::Symlink(Arc::from(s.target.as_str()))))
                }
            }
            Listing::Fixed(v) => v.nth(j).cloned(),
        }
    }

    /// The entry called `name`.
    pub fn find(&self, name: &str) -> Option<Node> {
        match self {
            Listing::Tree { dir, remote } => dir.lookup(name).map(|e| match e {
                Entry::File(f) => file_node(f.digest, f.executable, remote),
                Entry::Dir(d) => Node::Dir { digest: d.digest, remote: remote.clone() },
                Entry::Symlink(s) => Node::Symlink(Arc::from(s.target.as_str())),
            }),
            Listing::Fixed(v) => v.get(name).cloned(),
        }
    }
}

fn file_node(digest: Digest, executable: bool, remote: &Arc<Remote>) -> Node {
    Node::File { digest, executable, remote: remote.clone() }
}
