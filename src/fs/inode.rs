//! The inode table: stable numbers for the life of a mount, freed again on FORGET.
//!
//! Files are keyed by (digest, executable): every path with the same content shares one inode,
//! so the page cache holds one copy however often a file appears. Directories and symlinks are
//! keyed by (parent inode, name): the kernel forbids a directory inode at two places. Numbers
//! are never reused within a mount and stay below 2^62 (synthetic readdir numbers use the
//! 2^62 bit), so tools like tar never mistake two files for hard links. An inode costs about
//! 110 bytes (a slot of 88 and its hash entry), so a walk of a million files fits in memory.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex};

use super::node::Node;
use crate::digest::Digest;

/// Inode number of the mount's root directory.
pub const ROOT: u64 = 1;

/// An inode number is a slot of the table (low 32 bits) and how often that slot was used
/// before (the bits above), so a number is never given out twice while slots are reused.
const SLOT_BITS: u32 = 32;
/// Uses of one slot before it is retired (keeps numbers below 2^62).
const MAX_GEN: u32 = (1 << 29) - 1;

/// What makes two lookups the same inode.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    File(Digest, bool),
    Named(u64, Arc<str>),
}

/// A key without owning its name (for probes).
#[derive(Clone, Copy, Hash)]
enum KeyRef<'a> {
    File(Digest, bool),
    Named(u64, &'a str),
}

impl<'a> KeyRef<'a> {
    fn of(parent: u64, name: &'a str, node: &Node) -> Self {
        match node {
            Node::File { digest, executable, .. } => KeyRef::File(*digest, *executable),
            _ => KeyRef::Named(parent, name),
        }
    }

    fn owned(self) -> Key {
        match self {
            KeyRef::File(d, x) => Key::File(d, x),
            KeyRef::Named(p, n) => Key::Named(p, Arc::from(n)),
        }
    }
}

/// One inode. Kept small: a walk of a million files holds a million of these. Its key is
/// not stored (it follows from the node, its parent and its name), and a file keeps no name
/// of its own (it has one per path; [`Inodes::path`] leaves that to the caller). The names
/// of directories and symlinks live in [`Table::names`], so files pay nothing for them.
struct Slot {
    /// `None` while the slot is free.
    node: Option<Node>,
    /// Kernel lookups not yet forgotten; at `u32::MAX` it sticks (the inode is kept for good
    /// rather than freed while the kernel may still use it).
    nlookup: u32,
    /// The directory holding it: for a directory the only one (it is keyed by it); for a
    /// file, where the kernel last looked it up (for log messages and sibling batching).
    parent: u64,
    /// Times the slot was used before.
    gen: u32,
}

/// The table: slots in a vector, found by number in O(1); keys found through a 32-bit hash
/// (8 bytes an inode), with the few keys whose hash is taken in `collided`.
struct Table {
    slots: Vec<Slot>,
    /// The name in its parent of each live directory or symlink slot.
    names: HashMap<u32, Arc<str>>,
    free: Vec<u32>,
    by_hash: HashMap<u32, u32>,
    collided: HashMap<Key, u32>,
    hasher: std::collections::hash_map::RandomState,
    /// Bits of the hash used (all but in tests, which force collisions).
    mask: u32,
    live: usize,
}

impl Table {
    fn hash(&self, key: KeyRef<'_>) -> u32 {
        self.hasher.hash_one(key) as u32 & self.mask
    }

    fn slot(&self, ino: u64) -> Option<&Slot> {
        let s = self.slots.get((ino & ((1 << SLOT_BITS) - 1)) as usize)?;
        (s.node.is_some() && u64::from(s.gen) == ino >> SLOT_BITS).then_some(s)
    }

    fn slot_mut(&mut self, ino: u64) -> Option<&mut Slot> {
        let s = self.slots.get_mut((ino & ((1 << SLOT_BITS) - 1)) as usize)?;
        (s.node.is_some() && u64::from(s.gen) == ino >> SLOT_BITS).then_some(s)
    }

    fn ino(&self, idx: u32) -> u64 {
        (u64::from(self.slots[idx as usize].gen) << SLOT_BITS) | u64::from(idx)
    }

    /// The key of a live slot.
    fn key(&self, idx: u32) -> Option<KeyRef<'_>> {
        let s = &self.slots[idx as usize];
        match s.node.as_ref()? {
            Node::File { digest, executable, .. } => Some(KeyRef::File(*digest, *executable)),
            _ => Some(KeyRef::Named(s.parent, self.names.get(&idx).map_or("", |n| n))),
        }
    }

    fn has_key(&self, idx: u32, key: KeyRef<'_>) -> bool {
        match (self.key(idx), key) {
            (Some(KeyRef::File(a, x)), KeyRef::File(b, y)) => a == b && x == y,
            (Some(KeyRef::Named(p, n)), KeyRef::Named(q, m)) => p == q && n == m,
            _ => false,
        }
    }

    fn find(&self, key: KeyRef<'_>) -> Option<u32> {
        if let Some(&i) = self.by_hash.get(&self.hash(key)) {
            if self.has_key(i, key) {
                return Some(i);
            }
        }
        if self.collided.is_empty() {
            return None;
        }
        self.collided.get(&key.owned()).copied()
    }

    fn insert(&mut self, key: KeyRef<'_>, node: Node, parent: u64) -> u64 {
        let name = match key {
            KeyRef::Named(_, n) => Some(Arc::from(n)),
            KeyRef::File(..) => None,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                let s = &mut self.slots[i as usize];
                s.gen += 1;
                (s.node, s.nlookup, s.parent) = (Some(node), 1, parent);
                i
            }
            None => {
                self.slots.push(Slot { node: Some(node), nlookup: 1, parent, gen: 0 });
                (self.slots.len() - 1) as u32
            }
        };
        if let Some(name) = name {
            self.names.insert(idx, name);
        }
        let h = self.hash(key);
        match self.by_hash.entry(h) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(idx);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(key.owned(), idx);
            }
        }
        self.live += 1;
        self.ino(idx)
    }

    fn remove(&mut self, ino: u64) {
        let idx = (ino & ((1 << SLOT_BITS) - 1)) as u32;
        if self.slot(ino).is_none() {
            return;
        }
        let Some(key) = self.key(idx) else { return };
        let h = self.hash(key);
        if self.by_hash.get(&h) == Some(&idx) {
            self.by_hash.remove(&h);
        } else {
            let owned = key.owned();
            self.collided.remove(&owned);
        }
        self.names.remove(&idx);
        self.slots[idx as usize].node = None;
        if self.slots[idx as usize].gen < MAX_GEN {
            self.free.push(idx);
        }
        self.live -= 1;
    }
}

/// Thread-safe inode table.
pub struct Inodes {
    table: Mutex<Table>,
}

impl Inodes {
    /// A table holding only the root.
    pub fn new(root: Node) -> Self {
        Self::with_mask(root, u32::MAX)
    }

    fn with_mask(root: Node, mask: u32) -> Self {
        let unused = Slot { node: None, nlookup: 0, parent: 0, gen: MAX_GEN };
        let root = Slot { node: Some(root), nlookup: 1, parent: ROOT, gen: 0 };
        let table = Table {
            slots: vec![unused, root],
            names: HashMap::new(),
            free: Vec::new(),
            by_hash: HashMap::new(),
            collided: HashMap::new(),
            hasher: Default::default(),
            mask,
            live: 1,
        };
        Inodes { table: Mutex::new(table) }
    }

    /// What `ino` stands for, if the kernel still knows it.
    pub fn get(&self, ino: u64) -> Option<Node> {
        self.table.lock().unwrap().slot(ino).and_then(|s| s.node.clone())
    }

    /// The inode for entry `name` of directory `parent`, created if needed, with its lookup
    /// count raised by one (every entry reply the kernel receives must be counted).
    pub fn lookup(&self, parent: u64, name: &str, node: Node) -> u64 {
        let key = KeyRef::of(parent, name, &node);
        let mut t = self.table.lock().unwrap();
        if let Some(idx) = t.find(key) {
            let s = &mut t.slots[idx as usize];
            s.nlookup = s.nlookup.saturating_add(1);
            // Only a file can be met under another parent (directories are keyed by it).
            s.parent = parent;
            return t.ino(idx);
        }
        t.insert(key, node, parent)
    }

    /// The inode `name` in `parent` would have if it is known, without counting a lookup.
    pub fn peek(&self, parent: u64, name: &str, node: &Node) -> Option<u64> {
        let t = self.table.lock().unwrap();
        t.find(KeyRef::of(parent, name, node)).map(|i| t.ino(i))
    }

    /// Drops `n` lookups; the inode is freed when none remain (the root never is).
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut t = self.table.lock().unwrap();
        let gone = match t.slot_mut(ino) {
            Some(s) if s.nlookup < u32::MAX => {
                s.nlookup = s.nlookup.saturating_sub(n.min(u32::MAX as u64) as u32);
                s.nlookup == 0
            }
            Some(_) => false,
            None => false,
        };
        if gone {
            t.remove(ino);
        }
    }

    /// A path for log messages: where the inode was last looked up (`?` past forgotten
    /// parents). A file's own name is not kept: the second value is its directory's inode,
    /// for the caller to find the name in the listing (`None` for a directory or symlink).
    pub fn path(&self, ino: u64) -> (String, Option<u64>) {
        let t = self.table.lock().unwrap();
        let mut parts = Vec::new();
        let mut cur = ino;
        let mut file_in = None;
        if let Some(Slot { node: Some(Node::File { .. }), parent, .. }) = t.slot(ino) {
            file_in = Some(*parent);
            cur = *parent;
        }
        for _ in 0..256 {
            if cur == ROOT {
                break;
            }
            match t.slot(cur) {
                Some(n) => {
                    let idx = (cur & ((1 << SLOT_BITS) - 1)) as u32;
                    parts.push(t.names.get(&idx).map_or("?", |n| n).to_string());
                    cur = n.parent;
                }
                None => {
                    parts.push("?".into());
                    break;
                }
            }
        }
        parts.reverse();
        (format!("/{}", parts.join("/")), file_in)
    }

    /// The directory holding an inode (for a file, where it was last looked up; the root's
    /// is itself).
    pub fn parent(&self, ino: u64) -> u64 {
        self.table.lock().unwrap().slot(ino).map(|n| n.parent).unwrap_or(ROOT)
    }

    /// Inodes currently held (root included).
    pub fn len(&self) -> usize {
        self.table.lock().unwrap().live
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

    #[test]
    fn keys_whose_hashes_collide_stay_apart() {
        let r = remote();
        let t = Inodes::with_mask(Node::Dir { digest: Digest::of_bytes(b"root"), remote: r.clone() }, 0);
        let file =
            |i: u32| Node::File { digest: Digest::of_bytes(&i.to_le_bytes()), executable: false, remote: r.clone() };
        let inos: Vec<u64> = (0..50).map(|i| t.lookup(ROOT, "f", file(i))).collect();
        let dir = t.lookup(ROOT, "d", Node::Dir { digest: Digest::of_bytes(b"d"), remote: r.clone() });
        assert_eq!(t.len(), 52);
        for (i, ino) in inos.iter().enumerate() {
            assert_eq!(t.peek(ROOT, "f", &file(i as u32)), Some(*ino));
        }
        // Freeing the key that owns the shared hash leaves the others findable.
        t.forget(inos[0], 1);
        assert_eq!(t.peek(ROOT, "f", &file(0)), None);
        assert_eq!(t.lookup(ROOT, "f", file(7)), inos[7]);
        assert_eq!(t.peek(ROOT, "d", &Node::Dir { digest: Digest::of_bytes(b"d"), remote: r.clone() }), Some(dir));
        let again = t.lookup(ROOT, "f", file(0));
        assert_ne!(again, inos[0], "numbers are not reused");
        assert!(t.get(inos[0]).is_none());
        t.forget(inos[7], 2);
        assert!(t.get(inos[7]).is_none());
        assert_eq!(t.len(), 51);
    }
}
