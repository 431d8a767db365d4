//! Small verified blobs served from memory while a background thread copies them to disk.
//!
//! A cold walk over many small files would otherwise create one cache file per blob before
//! each reader gets its bytes; here the reader is answered from memory and the file is made
//! later. Until a blob is on disk it stays reachable (`pending`), even if the bounded memory
//! cache drops it, so every blob is always either in memory or in the disk cache.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;

use crate::cas::DiskStore;
use crate::digest::Digest;

/// Most bytes waiting for the disk writer; past this, callers write themselves.
const MAX_PENDING_BYTES: u64 = 64 << 20;
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
    shared: Arc<Shared>,
    local: Arc<DiskStore>,
}

impl HotBlobs {
    /// A store holding up to `mem_bytes` of blobs in memory and writing them into `local`
    /// from its own thread.
    pub fn new(local: Arc<DiskStore>, mem_bytes: u64) -> Arc<Self> {
        let mem = moka::sync::Cache::builder()
            .max_capacity(mem_bytes)
            .weigher(|_, b: &Bytes| (b.len() + 64).min(u32::MAX as usize) as u32)
            .build();
        let shared =
            Arc::new(Shared { pending: Mutex::new(Pending::default()), work: Condvar::new(), done: Condvar::new() });
        let hot = Arc::new(HotBlobs { mem, shared: shared.clone(), local: local.clone() });
        let spawned =
            std::thread::Builder::new().name("casfs-cache-writer".into()).spawn(move || writer(&shared, &local));
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
        if self.local.contains(&digest) {
            return;
        }
        self.mem.insert(digest, data.clone());
        let overflow = {
            let mut p = self.shared.pending.lock().unwrap();
            if p.closed || p.bytes + data.len() as u64 > MAX_PENDING_BYTES || p.map.len() >= MAX_PENDING_BLOBS {
                true
            } else {
                if p.map.insert(digest, data.clone()).is_none() {
                    p.bytes += data.len() as u64;
                }
                false
            }
        };
        if overflow {
            store(&self.local, &digest, &data);
        } else {
            self.shared.work.notify_one();
        }
    }

    /// Makes sure a blob held here is in the disk cache now (for callers that need its file).
    pub fn persist(&self, digest: &Digest) {
        if self.local.contains(digest) {
            return;
        }
        if let Some(data) = self.get(digest) {
            store(&self.local, digest, &data);
        }
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
                for (d, b) in left {
                    store(&self.local, &d, &b);
                }
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

fn store(local: &DiskStore, digest: &Digest, data: &[u8]) {
    if let Err(e) = local.insert_verified(digest, data) {
        tracing::warn!(digest = %digest, error = %e, "could not write a blob to the local cache");
    }
}

/// The writer thread: takes waiting blobs in rounds, writes them, then lets readers forget
/// them (only after they are on disk, so a blob never falls between memory and disk).
fn writer(shared: &Shared, local: &DiskStore) {
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
        for (d, b) in &batch {
            store(local, d, b);
        }
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
