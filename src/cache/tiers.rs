//! The cache's two on-disk tiers: blob files (one per blob) and pack files (small blobs
//! appended in batches), with the bound split between them.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::pack::{PackStore, MAX_BLOB};
use crate::cas::DiskStore;
use crate::digest::Digest;
use crate::error::Result;

/// Share of the bound the packs get (one in this many bytes).
const PACK_SHARE: u64 = 4;

/// Blob files and packs under one folder.
pub(crate) struct OnDisk {
    /// One file per blob under `cas/`.
    pub(crate) files: Arc<DiskStore>,
    /// Small blobs under `packs/`; `None` if the packs cannot be opened (small blobs then
    /// get files of their own).
    packs: Option<PackStore>,
}

impl OnDisk {
    /// Opens both tiers under `dir`: packs get a quarter of `max_bytes` (0 = unbounded).
    pub(crate) fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        let share = max_bytes / PACK_SHARE;
        let packs = match PackStore::open(dir.join("packs"), share) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "no pack store; small blobs get files");
                None
            }
        };
        let files_bound = if packs.is_some() { max_bytes - share } else { max_bytes };
        Ok(OnDisk { files: Arc::new(DiskStore::open(dir, files_bound)?), packs })
    }

    /// Blob files only, in a store that already exists (a server's own storage, whose blobs
    /// its executor reads in place).
    pub(crate) fn over(files: Arc<DiskStore>) -> Self {
        OnDisk { files, packs: None }
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
            if let Err(e) = p.append_verified(&packed) {
                tracing::warn!(blobs = packed.len(), error = %e, "could not append blobs to the local cache's packs");
            }
        }
        for (d, data) in files {
            if let Err(e) = self.files.insert_verified(&d, &data) {
                tracing::warn!(digest = %d, error = %e, "could not write a blob to the local cache");
            }
        }
    }
}
