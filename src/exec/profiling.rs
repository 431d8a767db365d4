//! One run's access-profile session: records the lazy input root's lookups, looks the
//! action's profile up and prefetches beside the command (its paths, or with no profile the
//! whole tree within the budget), and afterwards stores what this run looked up as the new
//! profile. Nothing here ever holds up the command or changes what it sees: the prefetch
//! only warms the local cache through the verifying fetcher.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::profile::{self, Found, ProfileConfig};
use crate::cas::{SharedActionCache, SharedCas};
use crate::digest::Digest;
use crate::fs::prefetch::{Prefetch, Progress, Want};
use crate::fs::record::{Entry, Recorder};
use crate::fs::{CasFs, Remote};
use crate::metrics::Metrics;

/// A profile session around one run.
pub(crate) struct Session {
    key: Digest,
    recorder: Arc<Recorder>,
    progress: Arc<Progress>,
    loaded: Arc<Mutex<Option<Vec<Entry>>>>,
    task: tokio::task::JoinHandle<()>,
    cas: SharedCas,
    ac: SharedActionCache,
    metrics: Arc<Metrics>,
}

/// What a session needs from the executor.
pub(crate) struct Start<'a> {
    pub cfg: ProfileConfig,
    pub cas: &'a SharedCas,
    pub ac: &'a SharedActionCache,
    pub metrics: &'a Arc<Metrics>,
    pub fs: &'a Arc<CasFs>,
    pub key: Digest,
    pub root: Digest,
}

impl Session {
    /// Starts recording `fs` and, in the background, the lookup and the prefetch.
    pub(crate) fn start(s: Start<'_>) -> Session {
        let recorder = Arc::new(Recorder::new());
        s.fs.record_into(recorder.clone());
        let progress = Arc::new(Progress::default());
        let loaded = Arc::new(Mutex::new(None));
        let prefetch = Prefetch {
            fetch: s.fs.fetcher().clone(),
            remote: Remote::new(s.cas.clone(), None),
            budget: s.cfg.budget,
            progress: progress.clone(),
        };
        let (cas, ac, metrics, key, root, into) =
            (s.cas.clone(), s.ac.clone(), s.metrics.clone(), s.key, s.root, loaded.clone());
        let task = tokio::spawn(async move {
            let want = match profile::load(cas.as_ref(), ac.as_ref(), &key).await {
                Ok(Found::Hit(entries)) => {
                    metrics.add("casfs_profile_hits_total", 1);
                    let w = Want::from_entries(&entries);
                    *into.lock().unwrap_or_else(|e| e.into_inner()) = Some(entries);
                    Some(w)
                }
                Ok(Found::Miss) => {
                    metrics.add("casfs_profile_misses_total", 1);
                    None
                }
                Ok(Found::Invalid(why)) => {
                    metrics.add("casfs_profile_misses_total", 1);
                    metrics.add("casfs_profile_invalid_total", 1);
                    tracing::warn!(key = %key, why, "ignoring an unusable access profile");
                    None
                }
                Err(e) => {
                    metrics.add("casfs_profile_misses_total", 1);
                    tracing::debug!(key = %key, error = %e, "access profile lookup failed");
                    None
                }
            };
            prefetch.run(root, want).await;
        });
        Session {
            key: s.key,
            recorder,
            progress,
            loaded,
            task,
            cas: s.cas.clone(),
            ac: s.ac.clone(),
            metrics: s.metrics.clone(),
        }
    }

    /// Stops the prefetch, counts what it brought in and what of that went unused, and
    /// (when `store`) writes this run's lookups as the profile unless they are what it said.
    pub(crate) async fn finish(self, store: bool) {
        let task = self.task;
        task.abort();
        let _ = task.await;
        let rec = self.recorder.snapshot();
        let p = &self.progress;
        let files = p.files.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let unused: u64 = files.iter().filter(|d| !rec.files.contains(d)).map(|d| d.size()).sum();
        self.metrics.add("casfs_prefetch_blobs_total", p.blobs.load(Ordering::Relaxed));
        self.metrics.add("casfs_prefetch_bytes_total", p.bytes.load(Ordering::Relaxed));
        self.metrics.add("casfs_prefetch_unused_bytes_total", unused);
        let same = self.loaded.lock().unwrap_or_else(|e| e.into_inner()).as_ref() == Some(&rec.entries);
        if !store || rec.entries.is_empty() || same {
            return;
        }
        match profile::store(self.cas.as_ref(), self.ac.as_ref(), &self.key, &rec.entries).await {
            Ok(()) => self.metrics.add("casfs_profile_writes_total", 1),
            Err(e) => tracing::warn!(key = %self.key, error = %e, "could not store the access profile"),
        }
        if rec.truncated {
            tracing::info!(key = %self.key, "the access profile reached its caps and was truncated");
        }
    }
}
