//! The action-cache policy around an executor: look a result up before running, write it
//! after. One place for rules 12, 14 and 15 (CONFORMANCE.md), used by `casfs run` and the
//! server's scheduler; a worker under an external scheduler runs the bare executor.

use std::sync::Arc;
use std::time::SystemTime;

use super::run::{load_action, Executed, Executor};
use crate::cas::{verified_action_result, SharedActionCache};
use crate::digest::Digest;
use crate::error::{rpc_ok, Result};
use crate::metrics::Metrics;
use crate::proto::{reapi, rpc};

/// What a run through the action cache produced.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The ActionResult (present even on timeout: stdout, stderr and outputs attached).
    pub result: reapi::ActionResult,
    /// OK, DEADLINE_EXCEEDED, or an infrastructure failure.
    pub status: rpc::Status,
    /// Served from the action cache.
    pub cached: bool,
}

impl From<Executed> for Outcome {
    fn from(e: Executed) -> Self {
        Outcome { result: e.result, status: e.status, cached: false }
    }
}

/// An executor with an action cache in front of it (and behind it).
pub struct CachedExecutor {
    exec: Arc<Executor>,
    ac: SharedActionCache,
}

impl CachedExecutor {
    /// `exec` with results looked up in and written to `ac` (verified against the
    /// executor's CAS before they are served).
    /// Access profiles are kept in the same action cache.
    pub fn new(exec: Arc<Executor>, ac: SharedActionCache) -> Self {
        exec.share_profiles(ac.clone());
        CachedExecutor { exec, ac }
    }

    /// The executor behind the cache.
    pub fn executor(&self) -> &Arc<Executor> {
        &self.exec
    }

    /// The executor's metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.exec.metrics()
    }

    /// The cached result of `action`, served only while every blob it references exists
    /// (rule 15); never for `do_not_cache` actions (rule 12).
    pub async fn lookup(&self, digest: Digest, action: &reapi::Action) -> Result<Option<reapi::ActionResult>> {
        if action.do_not_cache {
            return Ok(None);
        }
        let found = verified_action_result(self.exec.cas().as_ref(), self.ac.as_ref(), &digest).await?;
        if found.is_some() {
            self.metrics().add("casfs_exec_cache_hits_total", 1);
        }
        Ok(found)
    }

    /// Writes a result worth keeping: the command exited 0 with an OK status, and the action
    /// may be cached (rules 12 and 15). A failed write is logged: the result still stands,
    /// only the next run will not find it.
    /// Whatever the outcome, the result's blobs are vouched for (a store with promises
    /// keeps them a while): the client is about to be told they exist.
    pub async fn record(&self, digest: Digest, action: &reapi::Action, done: &Executed) {
        let cas = self.exec.cas().as_ref();
        match crate::cas::result_blobs(cas, digest.function(), &done.result).await {
            Ok(refs) => {
                if let Err(e) = cas.find_missing(&refs).await {
                    tracing::debug!(action = %digest, error = %e, "could not vouch for the result's blobs");
                }
            }
            Err(e) => tracing::debug!(action = %digest, error = %e, "could not list the result's blobs"),
        }
        if done.result.exit_code == 0 && done.status.code == 0 && !action.do_not_cache {
            if let Err(e) = self.ac.update_action_result(&digest, &done.result).await {
                tracing::warn!(action = %digest, error = %e, "could not write the action result to the cache");
            }
        }
    }

    /// Looks the action up (unless `skip_cache_lookup`, rule 14), else executes and records
    /// it. Errors before the command starts are `Err`, as from [`Executor::execute`].
    pub async fn execute(&self, digest: Digest, skip_cache_lookup: bool) -> Result<Outcome> {
        let action = load_action(self.exec.cas(), digest).await?;
        if !skip_cache_lookup {
            if let Some(result) = self.lookup(digest, &action).await? {
                return Ok(Outcome { result, status: rpc_ok(), cached: true });
            }
        }
        let done = self.exec.execute(digest, &action, SystemTime::now()).await?;
        self.record(digest, &action, &done).await;
        Ok(done.into())
    }
}
