//! Blob files a store has hashed in this process's life, known by the file's identity, so that
//! reading one again need not hash it again.
//!
//! A store verifies a blob file the first time it reads it (and every file it writes), then
//! remembers the file by digest, inode, length and change time. Any change made through the
//! file system (a write, a truncation, a touch, a file put in its place) moves the change time
//! or the inode, so the next read hashes it again. What this gives up is catching silent media
//! corruption of a file already verified, until the process restarts; every REAPI client
//! verifies what it reads anyway, and casfs's own mounts and executors always do.
//!
//! Memory is fixed: a direct-mapped table of 64-bit fingerprints (keyed per process, so a
//! client cannot aim for a collision), where a newer entry may push an older one out. A
//! forgotten file is only hashed again.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::digest::Digest;

/// Files remembered at most (8 bytes each).
const SLOTS: usize = 1 << 18;

/// The table of verified blob files.
pub(crate) struct Trusted {
    slots: Box<[AtomicU64]>,
    keys: RandomState,
    /// Reads that skipped hashing.
    hits: Arc<AtomicU64>,
}

impl Trusted {
    /// An empty table; reads that skip hashing are counted in `hits`.
    pub(crate) fn new(hits: Arc<AtomicU64>) -> Self {
        Trusted { slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(), keys: RandomState::new(), hits }
    }

    fn fingerprint(&self, d: &Digest, m: &std::fs::Metadata) -> u64 {
        let mut h = self.keys.build_hasher();
        d.hash(&mut h);
        (m.dev(), m.ino(), m.len(), m.ctime(), m.ctime_nsec()).hash(&mut h);
        h.finish().max(1)
    }

    fn slot(&self, fp: u64) -> &AtomicU64 {
        &self.slots[(fp as usize) % SLOTS]
    }

    /// Whether the file with metadata `m` was verified as `d` and has not changed since.
    pub(crate) fn knows(&self, d: &Digest, m: &std::fs::Metadata) -> bool {
        let fp = self.fingerprint(d, m);
        let known = self.slot(fp).load(Ordering::Relaxed) == fp;
        if known {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        known
    }

    /// Records that the file with metadata `m` holds exactly the bytes of `d`.
    pub(crate) fn learn(&self, d: &Digest, m: &std::fs::Metadata) {
        let fp = self.fingerprint(d, m);
        self.slot(fp).store(fp, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_changed_in_place_is_not_known_any_more() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("blob");
        std::fs::write(&p, b"hello")?;
        let d = Digest::of_bytes(b"hello");
        let t = Trusted::new(Arc::default());
        let m = std::fs::metadata(&p)?;
        assert!(!t.knows(&d, &m));
        t.learn(&d, &m);
        assert!(t.knows(&d, &std::fs::metadata(&p)?));
        assert!(!t.knows(&Digest::of_bytes(b"other"), &m), "another digest");
        // Same length, new bytes: the change time moves.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&p, b"jello")?;
        assert!(!t.knows(&d, &std::fs::metadata(&p)?));
        assert_eq!(t.hits.load(Ordering::Relaxed), 1);
        Ok(())
    }
}
