//! The inode table: stable numbers for the life of a mount, freed again on FORGET.
//!
//! Files are keyed by (digest, executable): every path with the same content shares one inode,
//! so the page cache holds one copy however often a file appears. Directories and symlinks are
//! keyed by (parent inode, name): the kernel forbids a directory inode at two places. Numbers
//! are never reused within a mount and stay below 2^62 (synthetic readdir numbers use the
//! 2^62 bit), so tools like tar never mistake two files for hard links.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::browse::BrowseNode;
use super::vdir::VDir;
use crate::digest::Digest;

/// Inode number of the mount's root directory.
pub const ROOT: u64 = 1;

/// What an inode stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A CAS directory: its Directory digest, its parent's inode (itself for the root) and
    /// the instance it is fetched from.
    Dir { digest: Digest, parent: u64, inst: u16 },
    /// A CAS file.
    File { digest: Digest, executable: bool, inst: u16 },
    /// A symbolic link.
    Symlink { target: Arc<str> },
    /// A file whose bytes casfs made (exit codes, JSON renderings, inline stdout).
    Synth { data: Arc<[u8]>, executable: bool },
    /// A directory casfs made (an action's view, the folders above its outputs).
    Virtual { dir: Arc<VDir>, parent: u64, inst: u16 },
    /// A folder of the browse namespace.
    Browse { node: BrowseNode, parent: u64 },
}

impl NodeKind {
    /// The parent inode of a directory-like node.
    pub fn parent(&self) -> Option<u64> {
        match self {
            NodeKind::Dir { parent, .. } | NodeKind::Virtual { parent, .. } | NodeKind::Browse { parent, .. } => {
                Some(*parent)
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Root,
    File(Digest, bool),
    Named(u64, Arc<str>),
}

struct Node {
    kind: NodeKind,
    key: Key,
    nlookup: u64,
    /// Where the kernel last looked this inode up, for log messages.
    parent: u64,
    name: Arc<str>,
}

struct Table {
    nodes: HashMap<u64, Node>,
    keys: HashMap<Key, u64>,
    next: u64,
}

/// Thread-safe inode table.
pub struct Inodes {
    table: Mutex<Table>,
}

impl Inodes {
    /// A table holding only the root.
    pub fn new(root: NodeKind) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node { kind: root, key: Key::Root, nlookup: 1, parent: ROOT, name: Arc::from("") });
        let keys = HashMap::from([(Key::Root, ROOT)]);
        Inodes { table: Mutex::new(Table { nodes, keys, next: ROOT + 1 }) }
    }

    /// What `ino` stands for, if the kernel still knows it.
    pub fn get(&self, ino: u64) -> Option<NodeKind> {
        self.table.lock().unwrap().nodes.get(&ino).map(|n| n.kind.clone())
    }

    /// The inode for entry `name` of directory `parent`, created if needed, with its lookup
    /// count raised by one (every entry reply the kernel receives must be counted).
    pub fn lookup(&self, parent: u64, name: &str, kind: NodeKind) -> u64 {
        let key = match &kind {
            NodeKind::File { digest, executable, .. } => Key::File(*digest, *executable),
            _ => Key::Named(parent, Arc::from(name)),
        };
        let mut t = self.table.lock().unwrap();
        if let Some(&ino) = t.keys.get(&key) {
            if let Some(n) = t.nodes.get_mut(&ino) {
                n.nlookup += 1;
                if n.parent != parent || &*n.name != name {
                    n.parent = parent;
                    n.name = Arc::from(name);
                }
                return ino;
            }
        }
        let ino = t.next;
        t.next += 1;
        t.keys.insert(key.clone(), ino);
        t.nodes.insert(ino, Node { kind, key, nlookup: 1, parent, name: Arc::from(name) });
        ino
    }

    /// The inode `name` in `parent` would have if it is known, without counting a lookup.
    pub fn peek(&self, parent: u64, name: &str, kind: &NodeKind) -> Option<u64> {
        let key = match kind {
            NodeKind::File { digest, executable, .. } => Key::File(*digest, *executable),
            _ => Key::Named(parent, Arc::from(name)),
        };
        self.table.lock().unwrap().keys.get(&key).copied()
    }

    /// Drops `n` lookups; the inode is freed when none remain (the root never is).
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut t = self.table.lock().unwrap();
        let gone = match t.nodes.get_mut(&ino) {
            Some(node) => {
                node.nlookup = node.nlookup.saturating_sub(n);
                node.nlookup == 0
            }
            None => false,
        };
        if gone {
            if let Some(node) = t.nodes.remove(&ino) {
                t.keys.remove(&node.key);
            }
        }
    }

    /// A path for log messages: where the inode was last looked up (`?` past forgotten parents).
    pub fn path(&self, ino: u64) -> String {
        let t = self.table.lock().unwrap();
        let mut parts = Vec::new();
        let mut cur = ino;
        for _ in 0..256 {
            if cur == ROOT {
                break;
            }
            match t.nodes.get(&cur) {
                Some(n) => {
                    parts.push(n.name.to_string());
                    cur = n.parent;
                }
                None => {
                    parts.push("?".into());
                    break;
                }
            }
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    /// The directory an inode was last looked up in.
    pub fn last_parent(&self, ino: u64) -> u64 {
        self.table.lock().unwrap().nodes.get(&ino).map(|n| n.parent).unwrap_or(ROOT)
    }

    /// Inodes currently held (root included).
    pub fn len(&self) -> usize {
        self.table.lock().unwrap().nodes.len()
    }

    /// Never true: the root is always there.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// A stable number for a readdir entry the kernel has not looked up (plain readdir does not
/// count lookups, so it must not create table entries): the 2^62 bit plus a hash.
pub fn synthetic_ino(parent: u64, name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    name.hash(&mut h);
    (1 << 62) | (h.finish() & ((1 << 62) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_shares_an_inode_and_forget_frees_it() {
        let d = Digest::of_bytes(b"x");
        let t = Inodes::new(NodeKind::Dir { digest: d, parent: ROOT, inst: 0 });
        let f = NodeKind::File { digest: d, executable: false, inst: 0 };
        let a = t.lookup(ROOT, "a", f.clone());
        let b = t.lookup(ROOT, "b", f.clone());
        assert_eq!(a, b);
        let x = t.lookup(ROOT, "b", NodeKind::File { digest: d, executable: true, inst: 0 });
        assert_ne!(a, x);
        let sub = t.lookup(ROOT, "sub", NodeKind::Dir { digest: d, parent: ROOT, inst: 0 });
        let sub2 = t.lookup(a, "sub", NodeKind::Dir { digest: d, parent: a, inst: 0 });
        assert_ne!(sub, sub2, "directories are never shared");
        assert_eq!(t.len(), 5);
        t.forget(a, 1);
        assert!(t.get(a).is_some());
        t.forget(a, 1);
        assert!(t.get(a).is_none());
        let again = t.lookup(ROOT, "a", f);
        assert!(again > sub2, "numbers are not reused");
        t.forget(ROOT, 100);
        assert!(t.get(ROOT).is_some());
        assert!(synthetic_ino(1, "a") < 1 << 63);
    }
}
