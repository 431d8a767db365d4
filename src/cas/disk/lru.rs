//! A disk store's bookkeeping: recency order (LRU), total bytes, and the promises
//! (`find_missing` vouches) that keep a blob from eviction for a grace period.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::digest::Digest;

/// Recency order of a store's blobs, their total size and the promises made about them.
#[derive(Default)]
pub(crate) struct Lru {
    /// digest -> recency tick
    pub(crate) ticks: HashMap<Digest, u64>,
    /// recency tick -> digest, oldest first
    pub(crate) order: BTreeMap<u64, Digest>,
    pub(crate) total: u64,
    pub(crate) next: u64,
    /// digest -> when it was last vouched for (kept while within the grace period)
    pub(crate) vouched: HashMap<Digest, Instant>,
    /// vouched digests whose file mtime is still to be refreshed
    pub(crate) stale_mtimes: Vec<Digest>,
}

impl Lru {
    pub(crate) fn touch(&mut self, d: &Digest) -> bool {
        let Some(t) = self.ticks.get_mut(d) else {
            return false;
        };
        self.order.remove(t);
        *t = self.next;
        self.order.insert(self.next, *d);
        self.next += 1;
        true
    }

    pub(crate) fn insert(&mut self, d: Digest) {
        if self.touch(&d) {
            return;
        }
        self.ticks.insert(d, self.next);
        self.order.insert(self.next, d);
        self.next += 1;
        self.total += d.size();
    }

    pub(crate) fn remove(&mut self, d: &Digest) {
        if let Some(t) = self.ticks.remove(d) {
            self.order.remove(&t);
            self.total -= d.size();
        }
        self.vouched.remove(d);
    }

    /// Whether `d` was vouched for less than `grace` ago.
    pub(crate) fn promised(&self, d: &Digest, grace: Duration, now: Instant) -> bool {
        self.vouched.get(d).is_some_and(|t| now.duration_since(*t) < grace)
    }

    /// The least recently used blobs to remove so that `extra` more bytes fit under `max`,
    /// never `keep` nor a promised blob; `None` when that is not possible. Walks from the
    /// oldest: vouching also marks a blob used, so promised blobs gather at the young end.
    pub(crate) fn victims(
        &mut self,
        max: u64,
        extra: u64,
        keep: Option<&Digest>,
        grace: Duration,
    ) -> Option<Vec<Digest>> {
        let now = Instant::now();
        if self.vouched.len() > 2 * self.ticks.len().max(1024) {
            // Forget lapsed promises now and then, so the map stays as small as the store.
            self.vouched.retain(|_, t| now.duration_since(*t) < grace);
        }
        let mut need = (self.total + extra).saturating_sub(max);
        let mut out = Vec::new();
        for d in self.order.values() {
            if need == 0 {
                break;
            }
            if Some(d) == keep || self.promised(d, grace, now) {
                continue;
            }
            need = need.saturating_sub(d.size());
            out.push(*d);
        }
        (need == 0).then_some(out)
    }
}

/// Counters of a store's evictions and refusals, when it reports metrics.
pub(crate) struct StoreMetrics {
    pub(crate) evictions: Arc<AtomicU64>,
    pub(crate) evicted_bytes: Arc<AtomicU64>,
    pub(crate) refused: Arc<AtomicU64>,
}
