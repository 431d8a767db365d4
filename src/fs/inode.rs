//! The inode table: stable numbers for the life of a mount, freed again on FORGET.
//!
//! Files are keyed by (digest, executable): every path with the same content shares one inode,
//! so the page cache holds one copy however often a file appears. Directories and symlinks are
//! keyed by (parent inode, name): the kernel forbids a directory inode at two places. Numbers
//! are never reused within a mount and stay below 2^62 (synthetic readdir numbers use the
//! 2^62 bit), so tools like tar never mistake two files for hard links.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::node::Node;
use crate::digest::Digest;

/// Inode number of the mount's root directory.
pub const ROOT: u64 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Root,
    File(Digest, bool),
    Named(u64, Arc<str>),
}

impl Key {
    fn of(parent: u64, name: &str, node: &Node) -> Key {
        match node {
            Node::File { digest, executable, .. } => Key::File(*digest, *executable),
            _ => Key::Named(parent, Arc::from(name)),
        }
    }
}

struct Slot {
    node: Node,
    key: Key,
    nlookup: u64,
    /// The directory holding it: for a directory the only one (it is keyed by it); for a
    /// file, where the kernel last looked it up (for log messages and sibling batching).
    parent: u64,
    name: Arc<str>,
}

struct Table {
    nodes: HashMap<u64, Slot>,
    keys: HashMap<Key, u64>,
    next: u64,
}

/// Thread-safe inode table.
pub struct Inodes {
    table: Mutex<Table>,
}

impl Inodes {
    /// A table holding only the root.
    pub fn new(root: Node) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Slot { node: root, key: Key::Root, nlookup: 1, parent: ROOT, name: Arc::from("") });
        let keys = HashMap::from([(Key::Root, ROOT)]);
        Inodes { table: Mutex::new(Table { nodes, keys, next: ROOT + 1 }) }
    }

    /// What `ino` stands for, if the kernel still knows it.
    pub fn get(&self, ino: u64) -> Option<Node> {
        self.table.lock().unwrap().nodes.get(&ino).map(|n| n.node.clone())
    }

    /// The inode for entry `name` of directory `parent`, created if needed, with its lookup
    /// count raised by one (every entry reply the kernel receives must be counted).
    pub fn lookup(&self, parent: u64, name: &str, node: Node) -> u64 {
        let key = Key::of(parent, name, &node);
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
        t.nodes.insert(ino, Slot { node, key, nlookup: 1, parent, name: Arc::from(name) });
        ino
    }

    /// The inode `name` in `parent` would have if it is known, without counting a lookup.
    pub fn peek(&self, parent: u64, name: &str, node: &Node) -> Option<u64> {
        let key = Key::of(parent, name, node);
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

    /// The directory holding an inode (for a file, where it was last looked up; the root's
    /// is itself).
    pub fn parent(&self, ino: u64) -> u64 {
        self.table.lock().unwrap().nodes.get(&ino).map(|n| n.parent).unwrap_or(ROOT)
    }

    /// Inodes currently held (root included).
    pub fn len(&self) -> usize {
        self.table.lock().unwrap().nodes.len()
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

    fn remote() -> Arc<crate::fs::Remote> {
        Arc::new(crate::fs::Remote { cas: Arc::new(crate::cas::MemoryStore::new()), ac: None })
    }

    #[test]
    fn same_content_shares_an_inode_and_forget_frees_it() {
        let d = Digest::of_bytes(b"x");
        let r = remote();
        let dir = Node::Dir { digest: d, remote: r.clone() };
        let t = Inodes::new(dir.clone());
        let f = Node::File { digest: d, executable: false, remote: r.clone() };
        let a = t.lookup(ROOT, "a", f.clone());
        let b = t.lookup(ROOT, "b", f.clone());
        assert_eq!(a, b);
        let x = t.lookup(ROOT, "b", Node::File { digest: d, executable: true, remote: r });
        assert_ne!(a, x);
        let sub = t.lookup(ROOT, "sub", dir.clone());
        let sub2 = t.lookup(a, "sub", dir);
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
