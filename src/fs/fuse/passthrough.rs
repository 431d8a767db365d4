//! FUSE passthrough bookkeeping: one kernel backing id per inode, shared by its opens, and
//! the switch that makes `auto` stop answering opens.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};

#[derive(Default)]
struct Backing {
    by_ino: HashMap<u64, Weak<BackingId>>,
    by_fh: HashMap<u64, Arc<BackingId>>,
    next_fh: u64,
}

/// Passthrough bookkeeping, shared with the tasks that answer opens after a fetch.
#[derive(Default)]
pub(super) struct Passthrough {
    backing: Mutex<Backing>,
    /// Opens of small files answered so far (`auto`).
    small_opens: AtomicU64,
    /// Opens are refused with ENOSYS from now on (`auto`): the kernel stops asking.
    stop_opens: AtomicBool,
}

impl Passthrough {
    /// True once opens are refused (`auto` after small files dominated).
    pub(super) fn stopped(&self) -> bool {
        self.stop_opens.load(Ordering::Relaxed)
    }

    /// Counts an answered open of a small file; returns how many there were.
    pub(super) fn small_open(&self) -> u64 {
        self.small_opens.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Forgets the backing id an open file handle held.
    pub(super) fn release(&self, fh: u64) {
        self.backing.lock().unwrap_or_else(|e| e.into_inner()).by_fh.remove(&fh);
    }

    /// Refuses every later open with ENOSYS: the kernel then opens without asking.
    pub(super) fn stop(&self, why: &str, metrics: &crate::metrics::Metrics) {
        if !self.stop_opens.swap(true, Ordering::Relaxed) {
            let answered = self.small_opens.load(Ordering::Relaxed);
            tracing::info!(small_opens = answered, why, "no longer answering opens (no-open from now on)");
            metrics.add("casfs_fuse_opens_stopped_total", 1);
        }
    }

    /// Opens with passthrough to `file` (the blob's verified bytes), one backing id per inode
    /// shared by its opens; plain keep-cache opens if the kernel refuses (and, with
    /// `stop_on_refusal`, no more opens at all: they would only cost round trips).
    pub(super) fn reply(
        &self,
        ino: u64,
        file: &std::fs::File,
        reply: ReplyOpen,
        stop_on_refusal: bool,
        m: &crate::metrics::Metrics,
    ) {
        let mut b = self.backing.lock().unwrap();
        let id = match b.by_ino.get(&ino).and_then(Weak::upgrade) {
            Some(id) => id,
            None => match reply.open_backing(file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    b.by_ino.insert(ino, Arc::downgrade(&id));
                    id
                }
                Err(e) => {
                    drop(b);
                    tracing::warn!(error = %e, "kernel refused a passthrough backing file; serving through the daemon");
                    if stop_on_refusal {
                        self.stop("passthrough refused", m);
                    }
                    return reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
                }
            },
        };
        b.next_fh += 1;
        let fh = b.next_fh;
        b.by_fh.insert(fh, id.clone());
        b.by_ino.retain(|_, w| w.strong_count() > 0);
        drop(b);
        m.add("casfs_fuse_passthrough_opens_total", 1);
        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
    }
}
