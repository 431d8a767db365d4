//! Small verified blobs served from memory while a background thread copies them to disk.
//!
//! A cold walk over many small files would otherwise write each blob to the disk cache
//! before its reader gets the bytes; here the reader is answered from memory and the writer
//! appends the blobs to the cache's pack files in batches (one write per batch, where one
//! file per blob cost 55-800 us each on ext4). Until a blob is on disk it stays reachable
//! (`pending`), even if the bounded memory cache drops it, so every blob is always either in
//! memory or in the disk cache.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;

use super::tiers::OnDisk;
use crate::digest::Digest;

/// Most blobs waiting for the disk writer (bounds how long a final flush takes).
const MAX_PENDING_BLOBS: usize = 50_000;
/// Blobs the writer takes per round.
const WRITER_BATCH: usize = 256;

#[derive(Default)]
struct Pending {
    map: HashMap<Digest, Bytes>,
    bytes: u64,
    closed: bool,
    /// Blobs the writer took and has not finished yet.
    busy: usize,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when work arrives or the store closes.
    work: Condvar,
    /// Signalled when the writer finished a round.
    done: Condvar,
}

/// Verified small blobs in memory, persisted to the disk cache in the background.
pub struct HotBlobs {
    mem: moka::sync::Cache<Digest, Bytes>,
    /// Most bytes waiting for the disk writer; past this, callers write themselves.
    max_pending: u64,
    shared: Arc<Shared>,
    disk: Arc<OnDisk>,
}

impl HotBlobs {
    /// A store holding up to `mem_bytes` of blobs in memory and writing them to `disk`
    /// from its own thread, with up to `max_pending` bytes waiting for it.
    pub(crate) fn new(disk: Arc<OnDisk>, mem_bytes: u64, max_pending: u64) -> Arc<Self> {
        let mem = moka::sync::Cache::builder()
            .max_capacity(mem_bytes)
            .weigher(|_, b: &Bytes| (b.len() + 64).min(u32::MAX as usize) as u32)
            .build();
        let shared =
            Arc::new(Shared { pending: Mutex::new(Pending::default()), work: Condvar::new(), done: Condvar::new() });
        let hot = Arc::new(HotBlobs { mem, max_pending, shared: shared.clone(), disk: disk.clone() });
        let spawned =
            std::thread::Builder::new().name("casfs-cache-writer".into()).spawn(move || writer(&shared, &disk));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no background cache writer; blobs are written as they arrive");
            hot.shared.pending.lock().unwrap().closed = true;
        }
        hot
    }

    /// The bytes of a blob held in memory or still waiting for the disk.
    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        if let Some(b) = self.mem.get(digest) {
            return Some(b);
        }
        self.shared.pending.lock().unwrap().map.get(digest).cloned()
    }

    /// True when the blob is in memory or on its way to the disk.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.mem.contains_key(digest) || self.shared.pending.lock().unwrap().map.contains_key(digest)
    }

    /// Takes a blob whose bytes were checked against `digest`: readers see it at once, the
    /// disk cache gets it soon. Blocks (writing it itself) only when the writer is far behind,
    /// so call it from a blocking context or accept a short write.
    pub fn insert(&self, digest: Digest, data: Bytes) {
        self.insert_as(digest, data, true)
    }

    /// As [`HotBlobs::insert`], but kept in memory only until it is on disk: for bytes the
    /// caller holds in another form (a decoded Directory), which would be counted twice.
    pub fn insert_cold(&self, digest: Digest, data: Bytes) {
        self.insert_as(digest, data, false)
    }

    fn insert_as(&self, digest: Digest, data: Bytes, keep: bool) {
        if self.disk.contains(&digest) {
            return;
        }
        if keep {
            self.mem.insert(digest, data.clone());
        }
        let overflow = {
            let mut p = self.shared.pending.lock().unwrap();
            if p.closed || p.bytes + data.len() as u64 > self.max_pending || p.map.len() >= MAX_PENDING_BLOBS {
                true
            } else {
                if p.map.insert(digest, data.clone()).is_none() {
                    p.bytes += data.len() as u64;
                }
                false
            }
        };
        if overflow {
            self.disk.store(&[(digest, data)]);
        } else {
            self.shared.work.notify_one();
        }
    }

    /// Keeps bytes that are already in the disk cache in memory too (a pack read).
    pub fn remember(&self, digest: Digest, data: Bytes) {
        self.mem.insert(digest, data);
    }

    /// Waits until every blob taken so far is in the disk cache.
    pub fn flush(&self) {
        let mut p = self.shared.pending.lock().unwrap();
        while !p.map.is_empty() || p.busy > 0 {
            if p.closed && p.busy == 0 {
                // No writer: write what is left here.
                let left: Vec<(Digest, Bytes)> = p.map.drain().collect();
                p.bytes = 0;
                drop(p);
                self.disk.store(&left);
                return;
            }
            self.shared.work.notify_one();
            p = self.shared.done.wait(p).unwrap();
        }
    }
}

impl Drop for HotBlobs {
    fn drop(&mut self) {
        self.flush();
        self.shared.pending.lock().unwrap().closed = true;
        self.shared.work.notify_all();
    }
}

/// Lowers the calling thread's CPU priority (nice 10): copies to the disk cache yield to
/// readers and the fetches they wait on. Best effort.
pub fn background_priority() {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: on Linux a thread id names one thread for setpriority; no memory is touched.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower a writer thread's priority");
    }
}

/// The writer thread: takes waiting blobs in rounds, writes them, then lets readers forget
/// them (only after they are on disk, so a blob never falls between memory and disk).
fn writer(shared: &Shared, disk: &OnDisk) {
    background_priority();
    loop {
        let batch: Vec<(Digest, Bytes)> = {
            let mut p = shared.pending.lock().unwrap();
            while p.map.is_empty() && !p.closed {
                p = shared.work.wait(p).unwrap();
            }
            if p.map.is_empty() {
                return;
            }
            let batch: Vec<(Digest, Bytes)> = p.map.iter().take(WRITER_BATCH).map(|(d, b)| (*d, b.clone())).collect();
            p.busy = batch.len();
            batch
        };
        disk.store(&batch);
        let mut p = shared.pending.lock().unwrap();
        for (d, b) in &batch {
            if p.map.remove(d).is_some() {
                p.bytes -= b.len() as u64;
            }
        }
        p.busy = 0;
        drop(p);
        shared.done.notify_all();
    }
}
