//! The cache's two on-disk tiers: blob files (one per blob) and pack files (small blobs
//! appended in batches), with the bound split between them.
//!
//! Pack records are checked on every read. A blob file is hashed whole once before it is
//! first served in a process's life (bit rot between two mounts is never served); the
//! digests checked or written in this life are remembered, so later reads cost nothing.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::pack::{PackStore, MAX_BLOB};
use crate::cas::DiskStore;
use crate::digest::Digest;
use crate::error::Result;

/// Share of the bound the packs get (one in this many bytes).
const PACK_SHARE: u64 = 4;
/// Checked digests remembered at most (then forgotten all at once and checked again).
const MAX_CHECKED: usize = 1 << 20;

/// Blob files and packs under one folder.
pub(crate) struct OnDisk {
    /// One file per blob under `cas/`.
    pub(crate) files: Arc<DiskStore>,
    /// Small blobs under `packs/`; `None` if the packs cannot be opened (small blobs then
    /// get files of their own).
    packs: Option<PackStore>,
    /// Blob files are checked before their first use (false: a server's storage, read in
    /// place, which checks whole reads itself).
    check: bool,
    /// Blob files checked (or written from verified bytes) in this process's life.
    checked: Mutex<HashSet<Digest>>,
}

impl OnDisk {
    /// Opens both tiers under `dir`: packs get a quarter of `max_bytes` (0 = unbounded).
    /// Corrupt blob files found are deleted and counted in `corrupt`.
    pub(crate) fn open(dir: &Path, max_bytes: u64, corrupt: Arc<AtomicU64>) -> Result<Self> {
        let share = max_bytes / PACK_SHARE;
        let packs = match PackStore::open(dir.join("packs"), share) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "no pack store; small blobs get files");
                None
            }
        };
        let files_bound = if packs.is_some() { max_bytes - share } else { max_bytes };
        let files = DiskStore::open(dir, files_bound)?.delete_corrupt().count_quarantined_in(corrupt);
        Ok(OnDisk { files: Arc::new(files), packs, check: true, checked: Mutex::default() })
    }

    /// Blob files only, in a store that already exists (a server's own storage, whose blobs
    /// its executor reads in place).
    pub(crate) fn over(files: Arc<DiskStore>) -> Self {
        OnDisk { files, packs: None, check: false, checked: Mutex::default() }
    }

    /// True when the blob is in a pack.
    pub(crate) fn in_pack(&self, digest: &Digest) -> bool {
        self.packs.as_ref().is_some_and(|p| p.contains(digest))
    }

    /// True when a blob file may be served without hashing it first (checked or written in
    /// this life, or a store that is not checked).
    pub(crate) fn trusted(&self, digest: &Digest) -> bool {
        !self.check || self.checked.lock().unwrap().contains(digest)
    }

    fn mark_checked(&self, digest: &Digest) {
        let mut c = self.checked.lock().unwrap();
        if c.len() >= MAX_CHECKED {
            c.clear();
        }
        c.insert(*digest);
    }

    /// Hashes a blob file not yet checked in this life (blocking): true when it is good
    /// (remembered), false when it is absent or was corrupt (then deleted and counted).
    pub(crate) fn check_file(&self, digest: &Digest) -> Result<bool> {
        if self.trusted(digest) {
            return Ok(self.files.contains(digest));
        }
        let good = self.files.verify_file(digest)?;
        if good {
            self.mark_checked(digest);
        }
        Ok(good)
    }

    /// Writes a blob file from verified bytes (blocking); it needs no check in this life.
    pub(crate) fn write_file(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        let fresh = !self.files.contains(digest);
        let res = self.files.insert_verified(digest, data);
        self.wrote(digest, fresh, &res);
        res
    }

    /// Writes a blob file from an open file of verified bytes (blocking).
    pub(crate) fn write_file_from(&self, digest: &Digest, src: &std::fs::File) -> Result<()> {
        let fresh = !self.files.contains(digest);
        let res = self.files.insert_verified_file(digest, src);
        self.wrote(digest, fresh, &res);
        res
    }

    /// Writes a blob file from a stream, verifying it.
    pub(crate) async fn write_file_stream(&self, digest: &Digest, data: crate::cas::ByteStream) -> Result<()> {
        use crate::cas::Cas;
        let fresh = !self.files.contains(digest);
        let res = self.files.write_stream(digest, data).await;
        self.wrote(digest, fresh, &res);
        res
    }

    /// Remembers a blob file this process wrote (one that was there already is not vouched for).
    fn wrote(&self, digest: &Digest, fresh: bool, res: &Result<()>) {
        if fresh && res.is_ok() {
            self.mark_checked(digest);
        }
    }

    /// True when the blob is in a pack or a file.
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.packs.as_ref().is_some_and(|p| p.contains(digest)) || self.files.contains(digest)
    }

    /// A small blob's bytes from the packs, checked against its digest (`None`: not there,
    /// or unreadable, which is logged: the caller fetches it again).
    pub(crate) fn packed(&self, digest: &Digest) -> Option<Bytes> {
        match self.packs.as_ref()?.read(digest) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "cannot read the local cache's packs");
                None
            }
        }
    }

    /// Writes verified blobs (blocking): appended to the packs in one write, or one file
    /// each where a blob is too large for a pack or there are no packs. Failures are logged:
    /// the blobs stay where the caller holds them.
    pub(crate) fn store(&self, blobs: &[(Digest, Bytes)]) {
        let (packed, files): (Vec<_>, Vec<_>) =
            blobs.iter().cloned().partition(|(d, _)| self.packs.is_some() && d.size() <= MAX_BLOB);
        if let Some(p) = self.packs.as_ref().filter(|_| !packed.is_empty()) {
            let res = p.append_verified(&packed);
            // A full disk is warned about once, by the blob files' store.
            self.files.note_write(&res);
            match res {
                Err(e) if !e.is_disk_full() => {
                    tracing::warn!(blobs = packed.len(), error = %e, "could not append blobs to the local cache's packs")
                }
                _ => {}
            }
        }
        for (d, data) in files {
            match self.write_file(&d, &data) {
                Err(e) if !e.is_disk_full() => {
                    tracing::warn!(digest = %d, error = %e, "could not write a blob to the local cache")
                }
                _ => {}
            }
        }
    }
}
